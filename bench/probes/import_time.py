"""What the deferred registration of the transformers plugin buys (issue 26, point 7).

`import optimum_owl` installs a meta-path finder that registers `quant_method="owl"` only once transformers imports
its quantizer registry (`transformers.quantizers.auto`, which every `from_pretrained` imports). The alternative is to
import that registry at `import optimum_owl`. Each round starts fresh interpreters and times, in one: `import
optimum_owl`, then the registry (with our registration, which the finder runs); in another: the registry alone, then
our plugin. Rounds alternate; the medians are printed and written as JSON.

    python -m bench.probes.import_time --rounds 5 --out bench/results/import_time.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from optimum_owl.utils import atomic_write_text

DEFERRED = """
import time; t = time.perf_counter(); import optimum_owl; a = time.perf_counter()
import transformers.quantizers.auto; b = time.perf_counter()
print(a - t, b - a)
"""
REGISTRY_FIRST = """
import time; t = time.perf_counter(); import transformers.quantizers.auto; a = time.perf_counter()
import optimum_owl.integration.transformers; b = time.perf_counter()
print(a - t, b - a)
"""


def _run(code: str) -> list[float]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return [float(x) for x in out.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows: dict[str, list[float]] = {"import_optimum_owl": [], "registry_and_registration": [], "registry_alone": [],
                                    "registration_alone": []}
    for _ in range(args.rounds):
        a, b = _run(DEFERRED)
        c, d = _run(REGISTRY_FIRST)
        for key, value in zip(rows, (a, b, c, d)):
            rows[key].append(value)
    result = {key: round(statistics.median(values), 3) for key, values in rows.items()}
    result["rounds"] = args.rounds
    print(json.dumps(result, indent=1))
    if args.out:
        atomic_write_text(args.out, json.dumps({"medians_s": result, "samples_s": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
