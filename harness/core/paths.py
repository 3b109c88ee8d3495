"""Where the repository's own files are: the launch configs, the training script, the Slurm scripts."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository (the folder holding ``train.py``, ``ds_configs/`` and ``slurm/``)."""
DS_CONFIGS = REPO_ROOT / "ds_configs"
"""Accelerate launch YAMLs and the DeepSpeed JSONs they name."""
TRAIN_SCRIPT = REPO_ROOT / "train.py"
"""The training entry point every launcher runs."""
