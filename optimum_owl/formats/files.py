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
# `owl_format` of a compressed-tensors `sparse-bitmask` checkpoint written by optimum-owl (`formats.compressed_tensors`);
# its `owl_crc32_dense` table covers every tensor in the file, the four parts of each compressed weight included
CT_FORMAT_NAME = "compressed-tensors-sparse-bitmask"
# files holding int8 values (`owl-bitmask-v2`) only: the value form ("int8") and the group size ("0": one scale per
# output row, else the number of inputs per scale, e.g. "128")
METADATA_VALUES_KEY = "owl_values"
METADATA_GROUP_SIZE_KEY = "owl_group_size"

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


def group_size_of(metadata: dict[str, str] | None, file: str | os.PathLike = "") -> int | None:
    """The group size the int8 values of a file with this safetensors `metadata` use: `None` for one scale per output
    row (`owl_group_size` "0" or absent); raises `OWLCheckpointError` naming the file for anything but "int8" values
    and a non-negative integer."""
    metadata = metadata or {}
    values = metadata.get(METADATA_VALUES_KEY, "int8")
    raw = metadata.get(METADATA_GROUP_SIZE_KEY, "0")
    if values != "int8" or not raw.isdigit():
        raise OWLCheckpointError(
            f"{file or 'A checkpoint file'} has `{METADATA_VALUES_KEY}`={values!r}, `{METADATA_GROUP_SIZE_KEY}`={raw!r}; "
            "this optimum-owl reads int8 values with a group size of 0 (per row) or a positive integer. The file is "
            "corrupt, or it was written by a newer optimum-owl (`pip install -U optimum-owl`)."
        )
    return int(raw) or None


def _read_header(file: str | os.PathLike) -> dict:
    """The JSON header of one safetensors file (the data is not read)."""
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise OWLCheckpointError(f"{file} is truncated (no safetensors header).")
        size = int.from_bytes(raw, "little")
        if size > os.path.getsize(file) - 8:
            raise OWLCheckpointError(f"{file} is truncated or corrupt (header size {size} beyond the file).")
        try:
            return json.loads(fh.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise OWLCheckpointError(f"{file} has a corrupt safetensors header ({err}).") from None


def read_metadata(file: str | os.PathLike) -> dict[str, str]:
    """The safetensors `__metadata__` of one file (header only; `{}` when it has none)."""
    header = _read_header(file)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def read_headers(files: list[Path]) -> dict[str, tuple[str, list[int], int]]:
    """`{tensor: (dtype, shape, nbytes)}` from the safetensors headers (data is not read)."""
    out: dict[str, tuple[str, list[int], int]] = {}
    for file in files:
        header = _read_header(file)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            out[name] = (info["dtype"], list(info["shape"]), end - start)
    return out

