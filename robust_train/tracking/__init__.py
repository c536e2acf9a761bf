"""Run tracking: checkpoints, the local results file and the W&B mirror."""
