"""Training: options, run setup, strategies, the Lightning loop, cached-feature heads, checkpoints."""
