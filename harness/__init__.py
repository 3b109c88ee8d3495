"""The scaling harness for CLIP-style vision transformers: config, data, training, checkpointing, eval."""
__version__ = "0.1.0"
