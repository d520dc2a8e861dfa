"""The pruning run: `engine.prune_model(model, config, dataset, tokenizer) -> PruneReport` and everything it drives.

config -> `data` (calibration windows) -> `runner` (THE block loop, capture) -> `stats` (input norms, Hessians) ->
allocation and criteria (`optimum_owl.algorithms`) -> masks -> `report`. `passes` holds the block passes and the
run state, `search/` the `owl-auto` / `auto` searches, `resume` the state of an interrupted run, `offload` and
`memory` running models larger than the device or RAM, `modeling` finding blocks and prunable units.
"""
