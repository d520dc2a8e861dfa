"""The searches of `layerwise="owl-auto"` and `"auto"`: `search` (screening, finalists, the choice), `holdout`
(which windows score the candidates), `scoring` (held-out losses, the paired test against uniform) and `snapshots`
(host copies of dense weights and packed masks, so a winner is restored instead of pruned again)."""
