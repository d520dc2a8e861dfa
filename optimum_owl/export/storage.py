"""Compact storage of pruned weights inside an ONNX graph.

Three layouts, chosen per model with `storage=`:

- `"bitmask"` (default): every pruned initializer `W` is replaced by two initializers, `W.owl_mask` (the keep
  mask packed 8 weights per byte) and `W.owl_values` (the non-zeros, row-major), plus a small subgraph of standard
  ONNX operators (`Reshape`, `BitShift`, `Mod`, `Cast`, `CumSum`, `Mul`, `Concat`, `Gather`) that rebuilds `W`. All its
  inputs are constant, so onnxruntime's constant folding turns it back into the dense `W` at session creation and
  inference runs the unchanged dense kernels.
- `"sparse_initializer"`: ONNX's own `SparseTensorProto` (COO, linear int64 indices) for engines that consume it;
  onnxruntime densifies these at load. Only smaller than dense above 66.7% sparsity (fp32) or 80% (fp16).
- `"dense"`: the export as is.

A tensor is only converted when the compact form is smaller than the dense one, so dense weights (embeddings,
norms) and unpruned models stay dense. Both compact layouts also store tied weights once: an initializer that is
an exact copy or transpose of another (the tracer writes a transposed copy of a tied embedding for the LM head)
becomes an `Identity` or `Transpose` of it, again folded at session creation.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np

from .packing import bitmask_nbytes, coo_nbytes, encode_bitmask

logger = logging.getLogger(__name__)

STORAGES = ("bitmask", "sparse_initializer", "dense")
MASK_SUFFIX = ".owl_mask"
VALUES_SUFFIX = ".owl_values"
# Smallest opset whose standard operators cover the decoder (BitShift-11, Mod-13, CumSum-14 int64).
MIN_OPSET = 14


@dataclass
class StorageStats:
    """What a storage pass did.

    Attributes:
        storage: the layout applied.
        converted: names of the initializers stored compactly.
        dense_bytes: raw bytes of all floating-point initializers before the pass.
        compact_bytes: raw bytes of those initializers after the pass (mask + values, or COO).
        zeros / numel: zeros and elements over all floating-point initializers.
    """

    storage: str
    converted: list[str] = field(default_factory=list)
    aliased: dict[str, str] = field(default_factory=dict)
    dense_bytes: int = 0
    compact_bytes: int = 0
    zeros: int = 0
    numel: int = 0

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def to_dict(self) -> dict:
        return {
            "storage": self.storage,
            "num_converted": len(self.converted),
            "tied_copies_removed": len(self.aliased),
            "dense_weight_bytes": self.dense_bytes,
            "compact_weight_bytes": self.compact_bytes,
            "initializer_sparsity": self.sparsity,
        }


def _float_types():
    from onnx import TensorProto

    return {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


def _opset(model) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


class _Builder:
    """Adds the shared constants and the per-weight decoder nodes of the bitmask layout."""

    def __init__(self, graph):
        from onnx import helper, numpy_helper

        self.graph = graph
        self.helper = helper
        self.nh = numpy_helper
        self.nodes = []
        self.inits = []
        self._consts: dict[str, str] = {}
        self._count = 0

    def const(self, key: str, array: np.ndarray) -> str:
        if key not in self._consts:
            name = f"owlc.{key}"
            self.inits.append(self.nh.from_array(np.asarray(array), name))
            self._consts[key] = name
        return self._consts[key]

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        # Short, unique intermediate names and unnamed nodes: a decoder costs a few hundred bytes of graph.
        self.nodes.append(self.helper.make_node(op, inputs, [output], **attrs))
        return output

    def decoder(self, name: str, weight: np.ndarray) -> None:
        """Nodes rebuilding `name` (dense, original shape and dtype) from its mask and values initializers."""
        numel = weight.size
        packed, values = encode_bitmask(weight)
        mask_name, values_name = name + MASK_SUFFIX, name + VALUES_SUFFIX
        self.inits.append(self.nh.from_array(packed, mask_name))
        self.inits.append(self.nh.from_array(np.ascontiguousarray(values), values_name))
        p = f"owl{self._count}"
        self._count += 1
        col = self.node("Reshape", [mask_name, self.const("shape_col", np.array([-1, 1], np.int64))], p + ".col")
        shifts = self.const("shifts", np.arange(8, dtype=np.uint8).reshape(1, 8))
        shifted = self.node("BitShift", [col, shifts], p + ".shifted", direction="RIGHT")
        bits = self.node("Mod", [shifted, self.const("two_u8", np.array(2, np.uint8))], p + ".bits")
        flat = self.node("Reshape", [bits, self.const("shape_flat", np.array([-1], np.int64))], p + ".flat")
        if packed.size * 8 != numel:
            flat = self.node(
                "Slice",
                [
                    flat,
                    self.const("zero_i64", np.array([0], np.int64)),
                    self.const(f"len_{numel}", np.array([numel], np.int64)),
                ],
                p + ".trim",
            )
        # rank of each kept weight among the kept ones (1-based), 0 where pruned; index 0 of `padded` is a zero, so
        # one Gather rebuilds the dense tensor (Gather is typed for every dtype, unlike Where in onnxruntime).
        as_i64 = self.node("Cast", [flat], p + ".i64", to=self.helper.np_dtype_to_tensor_dtype(np.dtype(np.int64)))
        rank = self.node("CumSum", [as_i64, self.const("axis0", np.array(0, np.int64))], p + ".rank")
        index = self.node("Mul", [rank, as_i64], p + ".index")
        zero = self.const(f"zero_{values.dtype.name}", np.zeros((1,), dtype=values.dtype))
        padded = self.node("Concat", [zero, values_name], p + ".padded", axis=0)
        dense = self.node("Gather", [padded, index], p + ".dense", axis=0)
        shape = self.const(f"shape_{'x'.join(map(str, weight.shape)) or 'scalar'}", np.array(weight.shape, np.int64))
        self.node("Reshape", [dense, shape], name)


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def find_tied_copies(arrays: dict[str, np.ndarray]) -> dict[str, tuple[str, bool]]:
    """Initializers that repeat another one exactly, as is or transposed (2-D).

    Args:
        arrays (`dict[str, np.ndarray]`): floating-point initializers by name, in graph order.

    Returns:
        `dict`: `copy_name -> (source_name, transposed)`; the first occurrence of each content is the source.
    """
    seen: dict[tuple, str] = {}
    copies: dict[str, tuple[str, bool]] = {}
    shapes = {(a.dtype.str, a.shape) for a in arrays.values()}
    for name, array in arrays.items():
        key = (array.dtype.str, array.shape, _digest(array))
        if key in seen:
            copies[name] = (seen[key], False)
            continue
        if array.ndim == 2 and (array.dtype.str, array.shape[::-1]) in shapes:
            tkey = (array.dtype.str, array.shape[::-1], _digest(array.T))
            if tkey in seen:
                copies[name] = (seen[tkey], True)
                continue
        seen[key] = name
    return copies


def apply_storage(model, storage: str = "bitmask", min_numel: int = 64) -> StorageStats:
    """Rewrite the floating-point initializers of an ONNX `ModelProto` in place into the chosen layout.

    Args:
        model (`onnx.ModelProto`): a model whose weights are all in memory (no external data references).
        storage (`str`, *optional*, defaults to `"bitmask"`): `"bitmask"`, `"sparse_initializer"` or `"dense"`.
        min_numel (`int`, *optional*, defaults to 64): tensors with fewer elements stay dense.

    Returns:
        `StorageStats`: which tensors were converted and the byte counts before/after.

    Example:

    ```python
    >>> stats = apply_storage(onnx_model, "bitmask")  # doctest: +SKIP
    >>> stats.compact_bytes / stats.dense_bytes  # doctest: +SKIP
    0.33
    ```
    """
    from onnx import helper, numpy_helper

    if storage not in STORAGES:
        raise ValueError(f"`storage` must be one of {', '.join(map(repr, STORAGES))}, got {storage!r}.")
    if storage == "bitmask" and _opset(model) < MIN_OPSET:
        raise ValueError(
            f"`storage='bitmask'` needs ONNX opset >= {MIN_OPSET}, the model has {_opset(model)}; export with "
            f"opset={MIN_OPSET} or higher, or use storage='dense'."
        )
    graph = model.graph
    stats = StorageStats(storage=storage)
    floats = _float_types()
    builder = _Builder(graph)
    keep_inits = []
    graph_inputs = {i.name for i in graph.input}
    arrays = {
        init.name: numpy_helper.to_array(init)
        for init in graph.initializer
        if init.data_type in floats and init.name not in graph_inputs
    }
    copies = {} if storage == "dense" else find_tied_copies(arrays)
    alias_nodes = []
    for init in graph.initializer:
        if init.name not in arrays:
            keep_inits.append(init)
            continue
        array = arrays[init.name]
        if init.name in copies:
            source, transposed = copies[init.name]
            stats.aliased[init.name] = source
            stats.numel += array.size
            stats.zeros += array.size - int(np.count_nonzero(array))
            stats.dense_bytes += array.nbytes
            op = "Transpose" if transposed else "Identity"
            alias_nodes.append(helper.make_node(op, [source], [init.name], name=f"{init.name}.owl_tied"))
            continue
        itemsize = array.dtype.itemsize
        nnz = int(np.count_nonzero(array))
        stats.numel += array.size
        stats.zeros += array.size - nnz
        stats.dense_bytes += array.nbytes
        compact = None
        if storage == "bitmask" and nnz > 0:
            compact = bitmask_nbytes(array.size, nnz, itemsize)
        elif storage == "sparse_initializer":
            compact = coo_nbytes(nnz, itemsize)
        if (
            storage == "dense"
            or compact is None
            or array.size < min_numel
            or compact >= array.nbytes
        ):
            keep_inits.append(init)
            stats.compact_bytes += array.nbytes
            continue
        stats.converted.append(init.name)
        stats.compact_bytes += compact
        if storage == "bitmask":
            builder.decoder(init.name, array)
        else:
            flat = array.reshape(-1)
            idx = np.flatnonzero(flat).astype(np.int64)
            values = numpy_helper.from_array(np.ascontiguousarray(flat[idx]), init.name)
            indices = numpy_helper.from_array(idx, init.name + ".indices")
            graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(array.shape)))
    if storage == "dense" or not (stats.converted or stats.aliased):
        return stats
    del graph.initializer[:]
    graph.initializer.extend(keep_inits + builder.inits)
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(builder.nodes + alias_nodes + old)
    logger.info(
        "%s storage: %d initializers converted, %d tied copies removed, weights %.1f KiB -> %.1f KiB",
        storage,
        len(stats.converted),
        len(stats.aliased),
        stats.dense_bytes / 1024,
        stats.compact_bytes / 1024,
    )
    return stats
