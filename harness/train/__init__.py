"""The training job, the Trainer loop, accumulation with negatives, the losses, and the trainer as a child job."""
