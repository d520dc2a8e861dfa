"""The pure math of pruning: numbers and tensors in, numbers and tensors out; no hooks, devices, files or models.

- `masks`: keep-mask selection (per row, per layer, N:M) and applying a mask in place.
- `allocation`: per-block sparsities (uniform, OWL, DLP, AlphaPruning, ATP, mixed N:M) and the split below the block.
- `families`: THE registry of allocation families (`layerwise=`), like `criteria` for criteria.
- `dsnot`: DSnoT-style training-free mask refinement.
- `criteria`: THE registry of pruning criteria (Wanda, SparseGPT, magnitude), one file each.
"""
