"""Train a CLIP model: ``python train.py`` (the embedded digits demo), or
``accelerate launch --config_file ds_configs/zero2.yaml train.py [flags] [section.field=value ...]``.

See ``python train.py --help`` and ``--help-config``; the job lives in ``harness/``."""
import sys

from harness.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
