"""Model registry: named CLIP architectures (open_clip text tower + ViT image tower).

Models here are plain ``nn.Module``s built by open_clip from JSON architecture configs
(``open_clip.create_model``, random init, never a weight download). They know nothing about
Accelerate, DeepSpeed or ``torch.distributed``: precision, sharding and checkpointing are applied
from ``harness/`` (the torchtitan habit of parallelising a plain model afterwards).

Registered names:

* ``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, ``ViT-H-14``: open_clip's own architectures
  (224 px; 336 px variants are not registered).
* ``ViT-tiny-8``: 32 px images, patch 8, width 128, 4 image / 3 text layers (~7.8M parameters, most
  of them the 49,408 x 128 token embedding). The demo default; trains on CPU in minutes.
* ``ViT-micro-8``: 16 px, width 32, for tests (forward + backward in milliseconds on CPU).
* ``DTP-ViT-*`` (:mod:`models.dtp_vit`): dynamic-token-pooling image towers with the same text tower
  as their ViT counterpart. ``-2x/-4x/-10x`` is the target shortening factor (boundary rate 1/2, 1/4,
  1/10). Without suffix (also registered as ``-noup``): 2 pre + 10 shortened layers, no upsampling,
  the design note's default and the research notes' "no upsampling" row; ``-up``: 2 pre + 8
  shortened layers, upsampling back to the patches, 2 post layers (the "compression" rows). B/32 at
  2x/4x/10x, B/16 at 4x, and tiny (``DTP-ViT-tiny-8-4x[-up]``, same size as ``ViT-tiny-8``) and micro
  CPU variants. Configs: ``models/configs/dtp/*.json`` with a ``dtp_cfg`` section
  (:class:`models.dtp_vit.DTPConfig`).
* ``<vit>-tome-r<R>``, ``<vit>-tokenlearner-<S>-at<L>``, ``<vit>-dynamicvit-<rho>`` (:mod:`models.reducers`): a
  registered ViT whose image tower reduces its tokens (ToMe, TokenLearner v1.1, DynamicViT), any setting; the
  papers' settings and the CPU models' DTP-matched ones are listed (``models.reducers.CANONICAL``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import open_clip
import torch
from torch import nn

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DTP_CONFIG_DIR = CONFIG_DIR / "dtp"  # not scanned by open_clip: its CLIP() does not know dtp_cfg
open_clip.add_model_config(CONFIG_DIR)


@dataclass(frozen=True)
class ModelSpec:
    """One registered model.

    Attributes:
        name: registry name, also the open_clip config name.
        family: ``"vit"``, ``"dtp-vit"`` or ``"reduced"`` (a ViT with a token reducer, :mod:`models.reducers`).
        tiny: True for the CPU-sized variants used by the demo and the tests.
        description: one line for ``harness models``.
    """

    name: str
    family: str
    tiny: bool
    description: str


_REGISTRY: Dict[str, ModelSpec] = {}
_ALIASES: Dict[str, str] = {}  # alias -> config name (DTP "-noup" names for the no-upsampling default)


def _config_name(name: str) -> str:
    return _ALIASES.get(name, name)


def register(spec: ModelSpec) -> None:
    """Add ``spec`` to the registry; its name must have an open_clip config (built-in or ours)."""
    if spec.family == "vit" and open_clip.get_model_config(spec.name) is None:
        raise ValueError(f"model {spec.name!r} has no open_clip architecture config")
    if spec.family == "dtp-vit" and not (DTP_CONFIG_DIR / f"{_config_name(spec.name)}.json").is_file():
        raise ValueError(f"model {spec.name!r} has no config in {DTP_CONFIG_DIR}")
    _REGISTRY[spec.name] = spec


for _name, _desc in [
    ("ViT-B-32", "ViT-B/32 image tower, 224 px, 50 tokens; 12-layer 512-wide text tower"),
    ("ViT-B-16", "ViT-B/16 image tower, 224 px, 197 tokens; 12-layer 512-wide text tower"),
    ("ViT-L-14", "ViT-L/14 image tower, 224 px, 257 tokens; 12-layer 768-wide text tower"),
    ("ViT-H-14", "ViT-H/14 image tower, 224 px, 257 tokens; 24-layer 1024-wide text tower"),
    ("ViT-g-14", "ViT-g/14 image tower (40 layers, 1408 wide), 224 px, 257 tokens; 24-layer 1024-wide text tower"),
]:
    register(ModelSpec(_name, "vit", False, _desc))
register(ModelSpec("ViT-tiny-8", "vit", True, "tiny CPU model, 32 px, patch 8, width 128 (demo default)"))
register(ModelSpec("ViT-micro-8", "vit", True, "micro CPU model for tests, 16 px, patch 8, width 32"))


def _register_dtp() -> None:
    import json

    for path in sorted(DTP_CONFIG_DIR.glob("*.json")):
        d = json.loads(path.read_text())["dtp_cfg"]
        shape = (f"{d['pre_layers']} pre + {d['shortened_layers']} shortened"
                 + (f" + upsampling + {d['post_layers']} post" if d.get("upsample") else ", no upsampling"))
        tiny = d["width"] < 256
        desc = (f"DTP-ViT {d['image_size']} px, patch {d['patch_size']}, target shortening {d['compression']:g}x, "
                f"{shape}")
        register(ModelSpec(path.stem, "dtp-vit", tiny, desc))
        if not d.get("upsample"):
            _ALIASES[path.stem + "-noup"] = path.stem
            register(ModelSpec(path.stem + "-noup", "dtp-vit", tiny, f"same as {path.stem}"))


_register_dtp()


def _reduced_spec(name: str) -> Optional[ModelSpec]:
    """The spec of a token-reduced ViT name (:mod:`models.reducers`) whose base is a registered ViT, else None."""
    from models import reducers

    red = reducers.parse(name)
    base = _REGISTRY.get(red.base) if red is not None else None
    if base is None or base.family != "vit":
        return None
    return ModelSpec(name, "reduced", base.tiny, red.describe())


def _register_reduced() -> None:
    from models.reducers import CANONICAL

    for name in CANONICAL:
        _REGISTRY[name] = _reduced_spec(name)


_register_reduced()


def list_models() -> List[str]:
    """Registered model names, in registration order."""
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """Return the :class:`ModelSpec` for ``name``.

    Raises:
        ValueError: ``name`` is not registered; the message lists the registered names.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    spec = _reduced_spec(name)
    if spec is None:
        raise ValueError(f"model.name: unknown model {name!r}; registered models: {', '.join(_REGISTRY)}; or a "
                         "registered ViT with a token reducer: <vit>-tome-r<R>[-prop], <vit>-tokenlearner-<S>-at<L>, "
                         "<vit>-dynamicvit-<rho>")
    return spec


def reduction(name: str):
    """The :class:`models.reducers.Reduction` of a token-reduced model, None for any other model.

    Raises:
        ValueError: ``name`` is not a model (:func:`get_spec`).
    """
    from models import reducers

    return reducers.parse(name) if get_spec(name).family == "reduced" else None


def architecture(name: str) -> dict:
    """The architecture dict of ``name``: ``embed_dim``, ``vision_cfg`` (``image_size``, ``patch_size``,
    ``width``, ``layers``), ``text_cfg``, and for DTP-ViT models ``dtp_cfg``."""
    import json

    spec = get_spec(name)
    if spec.family == "vit":
        return open_clip.get_model_config(name)
    if spec.family == "reduced":
        red = reduction(name)
        return {**architecture(red.base), "token_reduction": {"base": red.base, "method": red.method,
                                                               **red.kwargs}}
    cfg = json.loads((DTP_CONFIG_DIR / f"{_config_name(name)}.json").read_text())
    d = cfg["dtp_cfg"]
    layers = d["pre_layers"] + d["shortened_layers"] + d.get("post_layers", 0)
    cfg["vision_cfg"] = {"image_size": d["image_size"], "patch_size": d["patch_size"], "width": d["width"],
                         "layers": layers}
    return cfg


def create_model(name: str, device: str = "cpu", attention: str = "sdpa", siglip: bool = False) -> nn.Module:
    """Build the CLIP model ``name`` with random weights, in fp32, on ``device`` (``"meta"``: shapes
    only, no memory, for counting parameters of large models), with every self-attention of both
    towers running on the ``attention`` backend (:mod:`models.attention`: ``sdpa``, ``sdpa_flash``,
    ``sdpa_efficient``, ``sdpa_cudnn``, ``math``, ``flash_attn``; availability is checked by the
    harness, :func:`models.attention.check_backend`).

    The model's ``forward(image [B, 3, H, W], text [B, context_length] int64)`` returns a dict with
    ``image_features`` and ``text_features`` (both ``[B, embed_dim]``, L2-normalised) and
    ``logit_scale`` (shape ``[1]``, the log of the inverse temperature's exponent base, as in CLIP).

    ``logit_scale`` is reshaped from CLIP's 0-dim parameter to shape ``[1]``: 0-dim parameters crash
    DeepSpeed ZeRO-3's parameter broadcast ("self.dim() cannot be 0 to view Float as Byte") and FSDP2.

    ``siglip=True`` initialises the model for SigLIP's sigmoid loss as open_clip's trainer does (``--siglip``):
    ``logit_scale`` = ln 10 and a learnable ``logit_bias`` = -10 (shape ``[1]``; the output dict has a copy of it
    made in forward, ``logit_bias``).

    Raises:
        ValueError: unknown ``name`` or ``attention``.
    """
    from models.attention import set_attention_backend

    spec = get_spec(name)
    if spec.family == "reduced":
        from models.reducers import apply

        red = reduction(name)
        model = create_model(red.base, device, attention, siglip)
        apply(model.visual, red)  # new modules are made on the tower's own device
        return model
    init = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if siglip else {}  # open_clip's --siglip
    if spec.family == "dtp-vit":
        model = _create_dtp(name, device, init)
    elif device == "meta":
        with torch.device("meta"):
            model = open_clip.create_model(name, pretrained=None, output_dict=True, device="meta", **init)
    else:
        model = open_clip.create_model(name, pretrained=None, output_dict=True, device=device, **init)
    for attr in ("logit_scale", "logit_bias"):
        p = getattr(model, attr, None)
        if p is not None and p.dim() == 0:
            setattr(model, attr, nn.Parameter(p.detach().reshape(1)))
    if siglip:
        model.register_forward_hook(_bias_out_of_forward)
    return set_attention_backend(model, attention)


def _bias_out_of_forward(module: nn.Module, args, out):
    """Give the output dict's ``logit_bias`` as a tensor made in forward (a clone, as ``logit_scale`` comes out
    as ``logit_scale.exp()``), not the parameter itself: a wrapper that frees gathered parameters when forward
    ends (FSDP2 resharding the root) would otherwise hand the loss a parameter without storage. Registered at
    construction, so it runs before any hook a wrapper adds later."""
    if isinstance(out, dict) and out.get("logit_bias") is not None:
        out["logit_bias"] = out["logit_bias"].clone()
    return out


def _create_dtp(name: str, device: str, init: dict) -> nn.Module:
    return dtp_from_config(architecture(name), device, init)


def dtp_from_config(cfg: dict, device: str = "cpu", init: Optional[dict] = None) -> nn.Module:
    """open_clip ``CLIP`` with its text tower from ``cfg["text_cfg"]`` and a :class:`models.dtp_vit.DTPViT` image
    tower from ``cfg["dtp_cfg"]`` (random weights; ``logit_scale`` still CLIP's 0-dim parameter); ``init``:
    ``CLIP``'s ``init_logit_scale`` / ``init_logit_bias`` keywords, if any."""
    from models.dtp_vit import DTPConfig, DTPViT

    dtp = DTPConfig(**cfg["dtp_cfg"], output_dim=cfg["embed_dim"])
    with torch.device(device):
        # open_clip's CLIP always builds a ViT tower: build a 1-layer stand-in and replace it
        stand_in = {"image_size": dtp.image_size, "patch_size": dtp.patch_size, "width": 64, "layers": 1}
        model = open_clip.CLIP(cfg["embed_dim"], stand_in, cfg["text_cfg"], output_dict=True, **(init or {}))
        model.visual = DTPViT(dtp)
    return model


def load_exported(path: str, device: str = "cpu", attention: str = "sdpa") -> nn.Module:
    """The model in a folder written by ``harness export`` (``open_clip_config.json`` +
    ``open_clip_model.safetensors``, open_clip's ``local-dir:`` layout), ready like :func:`create_model`
    (``logit_scale`` of shape ``[1]``, every attention on ``attention``), in fp32 on ``device``.

    ViT models are built and loaded by open_clip itself (``open_clip.create_model("local-dir:<path>")``, strict);
    DTP-ViT models (a ``dtp_cfg`` in the config's ``model_cfg``, which open_clip cannot build) by
    :func:`dtp_from_config`, token-reduced ViTs (a ``token_reduction`` entry) by :func:`create_model` from the
    name it spells, then the weights strictly.

    Raises:
        FileNotFoundError: ``path`` has no ``open_clip_config.json`` or no ``open_clip_model.safetensors``.
        RuntimeError: the weights do not match the config (``load_state_dict`` strict).
    """
    import json

    from open_clip.factory import load_state_dict

    from models.attention import set_attention_backend

    folder = Path(path)
    config, weights = folder / "open_clip_config.json", folder / "open_clip_model.safetensors"
    for f in (config, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: not a folder written by harness export")
    model_cfg = json.loads(config.read_text())["model_cfg"]
    if "token_reduction" not in model_cfg and "dtp_cfg" not in model_cfg:
        model = open_clip.create_model(f"local-dir:{folder}", output_dict=True, device=device)
    else:  # our own image tower: built here, the weights loaded strictly
        if "token_reduction" in model_cfg:  # a registered ViT with a token reducer: built by the name it spells
            from models.reducers import model_name

            red = dict(model_cfg["token_reduction"])
            model = create_model(model_name(red.pop("base"), red.pop("method"), **red), device)
        else:
            model = dtp_from_config(model_cfg, device)
        state = load_state_dict(str(weights), device=device)
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
        model.load_state_dict(state, strict=True)
    model.logit_scale = nn.Parameter(model.logit_scale.detach().float().reshape(1))
    return set_attention_backend(model.float(), attention)


def image_transform(name: str, is_train: bool, uint8: bool = False) -> Callable:
    """open_clip's preprocessing for ``name``: PIL image -> float tensor ``[3, H, W]``, normalised.

    Training adds open_clip's default ``RandomResizedCrop(scale=(0.9, 1.0))``. With ``uint8`` the same
    geometric steps end in a ``uint8`` tensor ``[3, H, W]`` (no ``ToTensor`` scaling, no ``Normalize``): what
    crosses to the GPU, a quarter of the float bytes; :func:`normalize_uint8` on the device then gives exactly
    the float transform's output.
    """
    from open_clip.transform import MaybeToTensor
    from torchvision.transforms import Compose, Normalize, PILToTensor

    size = image_size(name)
    transform = open_clip.image_transform(size, is_train=is_train)
    if not uint8:
        return transform
    steps = [t for t in transform.transforms if not isinstance(t, (MaybeToTensor, Normalize))]
    return Compose(steps + [PILToTensor()])


def image_mean_std(name: str):
    """``(mean, std)`` per RGB channel of ``name``'s normalisation (open_clip's OpenAI CLIP statistics)."""
    from torchvision.transforms import Normalize

    norm = next(t for t in open_clip.image_transform(image_size(name), is_train=False).transforms
                if isinstance(t, Normalize))
    return tuple(norm.mean), tuple(norm.std)


def normalize_uint8(images: torch.Tensor, mean, std) -> torch.Tensor:
    """``uint8 [B, 3, H, W]`` -> float32 ``[B, 3, H, W]`` normalised, on the tensor's device, with the very
    operations of torchvision's ``ToTensor`` (``float / 255``) and ``Normalize`` (``(x - mean) / std``), so the
    result equals the CPU float transform bit for bit."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return images.to(torch.float32).div(255).sub_(m).div_(s)


def get_tokenizer(name: str) -> Callable:
    """open_clip's tokenizer for ``name`` (BPE vocabulary shipped in the package, works offline).

    Returns a callable: list of ``str`` (length B) -> int64 tensor ``[B, context_length]``.
    """
    if get_spec(name).family == "reduced":
        return get_tokenizer(reduction(name).base)
    if get_spec(name).family == "vit":
        return open_clip.get_tokenizer(name)
    return open_clip.get_tokenizer("", context_length=context_length(name))


def context_length(name: str) -> int:
    """Text context length (tokens) of ``name``."""
    return architecture(name)["text_cfg"].get("context_length", 77)


def image_size(name: str) -> int:
    """Square input image side (pixels) of ``name``."""
    size = architecture(name)["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


__all__ = [
    "ModelSpec", "register", "list_models", "get_spec", "architecture", "create_model",
    "image_transform", "image_mean_std", "normalize_uint8", "get_tokenizer", "context_length", "image_size",
    "CONFIG_DIR", "dtp_from_config", "load_exported", "reduction",
]

