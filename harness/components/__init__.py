"""Pieces of a training run with small interfaces: checkpoints, metrics and sinks, the LR schedule, resilience."""
