"""method="pruning": structured pruning under a FLOPs budget (one-shot baselines and UVC), physically sliced."""
