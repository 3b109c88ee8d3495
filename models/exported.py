"""Write a trained model in open_clip's ``local-dir:`` layout, the folder ``open_clip.create_model_and_transforms(
"local-dir:<folder>")`` loads (open_clip 3.3 ``factory.py``; the same files ``open_clip.push_to_hf_hub.save_for_hf``
writes for the Hugging Face Hub):

* ``open_clip_model.safetensors``: the CLIP state dict, ``logit_scale`` 0-dim as open_clip's ``CLIP`` has it;
* ``open_clip_config.json``: ``{"model_cfg": <architecture>, "preprocess_cfg": <open_clip PreprocessCfg>,
  "harness": <provenance>}``. open_clip reads ``model_cfg`` and ``preprocess_cfg`` and ignores the rest.

DTP-ViT folders have ``dtp_cfg`` instead of ``vision_cfg`` in ``model_cfg``, token-reduced ViTs
(:mod:`models.reducers`) a ``token_reduction`` entry beside ``vision_cfg``: open_clip cannot build those image
towers, :func:`models.load_exported` can. The loader is in the package's ``__init__`` (beside ``create_model``).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

import models

WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def model_config(name: str) -> Dict[str, Any]:
    """The architecture written as ``model_cfg``: open_clip's config for a ViT model, the DTP config
    (``embed_dim``, ``text_cfg``, ``dtp_cfg``; no ``vision_cfg``) for a DTP-ViT model."""
    cfg = models.architecture(name)
    if models.get_spec(name).family == "dtp-vit":
        cfg = {k: v for k, v in cfg.items() if k != "vision_cfg"}
    return json.loads(json.dumps(cfg))  # a plain copy


def preprocess_config(name: str) -> Dict[str, Any]:
    """open_clip's ``PreprocessCfg`` of the eval transform :func:`models.image_transform` uses: the model's image
    size, OpenAI mean/std, bicubic, ``shortest`` resize."""
    from open_clip.transform import PreprocessCfg

    return asdict(PreprocessCfg(size=models.image_size(name)))


def open_clip_state_dict(state: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32
                         ) -> Dict[str, torch.Tensor]:
    """A harness state dict as open_clip stores it: ``module.`` prefixes removed, ``logit_scale`` 0-dim (ours is
    ``[1]`` for DeepSpeed ZeRO-3 / FSDP2, see :func:`models.create_model`), floating tensors in ``dtype``,
    contiguous CPU copies (safetensors stores no shared or strided storage)."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key in ("logit_scale", "logit_bias"):
            value = value.reshape(())
        if value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.detach().cpu().contiguous().clone()
    return out


def write_exported(state: Mapping[str, torch.Tensor], name: str, out: Path, dtype: str = "fp32",
                   provenance: Optional[Dict[str, Any]] = None) -> Dict[str, Path]:
    """Write ``state`` (the full state dict of the registered model ``name``) to the folder ``out``.

    Every file goes to a temporary name first and is renamed into place, so a crash leaves no half-written
    file under the final names. The caller checks that ``out`` holds nothing it would overwrite.

    Args:
        state: full (unsharded) model state dict.
        name: registered model name (architecture of ``model_cfg``).
        out: destination folder (created).
        dtype: ``fp32`` or ``bf16`` for the floating tensors.
        provenance: extra JSON written under ``"harness"`` (source checkpoint, step ...).

    Returns:
        ``{"weights": path, "config": path}``.

    Raises:
        ValueError: ``dtype`` is not one of :data:`EXPORT_DTYPES`.
    """
    from safetensors.torch import save_file

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = open_clip_state_dict(state, EXPORT_DTYPES[dtype])
    config = {"model_cfg": model_config(name), "preprocess_cfg": preprocess_config(name),
              "harness": {"model": name, "dtype": dtype, **(provenance or {})}}
    weights, cfg_path = out / WEIGHTS_FILE, out / CONFIG_FILE
    save_file(tensors, str(out / f".{WEIGHTS_FILE}.tmp"), metadata={"format": "pt"})
    (out / f".{CONFIG_FILE}.tmp").write_text(json.dumps(config, indent=2, default=str) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out / f".{WEIGHTS_FILE}.tmp", 0o666 & ~umask)  # safetensors creates its file private (0600)
    os.replace(out / f".{WEIGHTS_FILE}.tmp", weights)
    os.replace(out / f".{CONFIG_FILE}.tmp", cfg_path)
    return {"weights": weights, "config": cfg_path}
