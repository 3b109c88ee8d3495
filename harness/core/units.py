"""Units, in one place. Memory is in GiB (2**30 bytes) everywhere in the harness; compute in GMACs
(1 multiply-add = 1; GFLOPs = 2 x GMACs) or TFLOP/s."""

GIB = 2.0 ** 30
"""Bytes per GiB."""
FLOPS_PER_MAC = 2
"""A multiply-add is two floating-point operations: GFLOPs = 2 x GMACs."""
