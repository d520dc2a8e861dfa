"""The files of a compact checkpoint: THE checkpoint-file finder, THE safetensors metadata keys, header reading.

Every reader of a checkpoint folder (`verify_checkpoint`, `size_summary`, `load_sparse`) finds its files with
`checkpoint_files` and reads the writer's metadata under these keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import OWLCheckpointError

# safetensors header metadata written into every shard of a compact checkpoint
METADATA_FORMAT_KEY = "owl_format"
# `{name: [CRC-32 of values, of bitmask, of shape, values dtype]}` of every compressed weight
METADATA_CRC_KEY = "owl_crc32"
# `{name: [CRC-32, dtype]}` of every tensor stored as is (embeddings, norms, biases, weights not worth compressing)
METADATA_DENSE_CRC_KEY = "owl_crc32_dense"

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a local checkpoint folder written by `save_pretrained`: the shards listed in
    `model.safetensors.index.json` when sharded, else `model.safetensors`.

    Raises `FileNotFoundError` naming the folder when it is not a folder or holds neither file.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder.")
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise OWLCheckpointError(f"{index} is not a safetensors index ({err}); re-save the checkpoint.") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return [single]
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" (it holds {', '.join(others)})" if others else ""
    raise FileNotFoundError(
        f"No {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {folder}{hint}; point to a folder written by "
        "`save_pretrained`."
    )


def read_headers(files: list[Path]) -> dict[str, tuple[str, list[int], int]]:
    """`{tensor: (dtype, shape, nbytes)}` from the safetensors headers (data is not read)."""
    out: dict[str, tuple[str, list[int], int]] = {}
    for file in files:
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise OWLCheckpointError(f"{file} is truncated (no safetensors header).")
            size = int.from_bytes(raw, "little")
            if size > os.path.getsize(file) - 8:
                raise OWLCheckpointError(f"{file} is truncated or corrupt (header size {size} beyond the file).")
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            out[name] = (info["dtype"], list(info["shape"]), end - start)
    return out

