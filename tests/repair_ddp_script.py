"""Run `repair()` on a tiny pruned model; under `accelerate launch` every rank saves what it ends with.

Usage: python tests/repair_ddp_script.py OUT_DIR GLOBAL_BATCH [METHOD ...]
Two CPU processes (torchrun + gloo): ACCELERATE_USE_CPU=True accelerate launch --multi_gpu --num_processes 2 ...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repair_helpers import prune_, random_windows, tiny_llama  # noqa: E402

from optimum_owl.repair import RepairConfig, repair, zero_masks  # noqa: E402


def run(out: Path, global_batch: int, method: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    model = prune_(tiny_llama(), 0.5, (2, 4))
    cfg = RepairConfig(
        method=method, r=4, seqlen=16, max_steps=4, per_device_train_batch_size=global_batch // world,
        learning_rate=1e-2, weight_decay=0.1, logging_steps=2, warmup_ratio=0.0, lr_scheduler_type="constant",
    )
    masks_before = zero_masks(model)
    merged, report = repair(model, train_data=random_windows(32, 16), config=cfg)
    torch.save(
        {
            "world": world,
            "masks_before": masks_before,
            "masks_after": zero_masks(merged),
            "state": {k: v.detach().clone() for k, v in merged.state_dict().items()},
            "zeros_preserved": report.zeros_preserved,
            "steps": report.steps,
        },
        out / f"{method}-world{world}-rank{rank}.pt",
    )


def main() -> None:
    methods = sys.argv[3:] or ["masked_lora", "full_ft"]
    for method in methods:
        run(Path(sys.argv[1]), int(sys.argv[2]), method)


if __name__ == "__main__":
    main()
