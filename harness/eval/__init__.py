"""Evaluation: zero-shot and validation during training, linear probe and finetune after it."""
