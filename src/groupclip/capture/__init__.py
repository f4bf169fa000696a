"""Capture: the per-step context, the autograd Functions and the hub that wires units into a model."""
