"""What the memory model needs of an architecture: per-tower transformer blocks (tokens, widths, heads,
parameters) and parameter counts, read from a meta-device build (no memory used)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class Block:
    """One transformer block: ``tokens`` s, ``width`` h, ``mlp`` hidden width, ``heads`` a, ``params``."""

    tokens: int
    width: int
    mlp: int
    heads: int
    params: int


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs of an architecture (from a meta-device build: no memory used).

    Attributes:
        params: trainable parameters P.
        towers: ``{"image": [Block...], "text": [Block...]}`` in forward order.
        root_params: parameters outside the transformer blocks (embeddings, projections, norms, logit scale).
        embed_dim: CLIP embedding width d.
        image_elems: elements of one input image (3 H W).
        largest_param: elements of the largest parameter tensor (the token embedding, usually).
        param_numels: elements of every parameter tensor.
    """

    params: int
    towers: Dict[str, Tuple[Block, ...]]
    root_params: int
    embed_dim: int
    image_elems: int
    largest_param: int
    param_numels: Tuple[int, ...] = ()
    tower_root_params: Dict[str, int] = None
    """``{"image": n, "text": m}``: each tower's parameters outside its transformer blocks (patch or token
    embedding, positions, norms, projection); the logit scale and bias belong to neither."""
    context_length: int = 77
    """Tokens per caption (the text tower's sequence length)."""

    @property
    def block_params(self) -> int:
        return self.params - self.root_params

    @property
    def largest_block(self) -> int:
        return max(b.params for blocks in self.towers.values() for b in blocks)


@functools.lru_cache(maxsize=None)
def model_shape(name: str) -> ModelShape:
    """:class:`ModelShape` of a registered model (built on the meta device)."""
    import models
    from models.blocks import tower_block_lists
    from models.segments import segment_bound

    model = models.create_model(name, device="meta")
    arch = models.architecture(name)
    vis, txt = arch["vision_cfg"], arch["text_cfg"]
    size = vis["image_size"] if isinstance(vis["image_size"], int) else vis["image_size"][0]
    patches = (size // vis["patch_size"]) ** 2
    dtp = arch.get("dtp_cfg")
    lists = tower_block_lists(model)
    # a token-reducing image tower (models.reducers) says how many tokens enter each block in training:
    # ``train_tokens_per_block`` where training differs from evaluation (DynamicViT masks, not removes), else
    # ``tokens_per_block``
    train_tokens = getattr(model.visual, "train_tokens_per_block", getattr(model.visual, "tokens_per_block", None))
    towers = {}
    for tower, block_lists in lists.items():
        if tower == "text":
            width, heads, mlp_ratio = txt["width"], txt.get("heads", 8), txt.get("mlp_ratio", 4.0)
        elif dtp:
            width, heads, mlp_ratio = dtp["width"], dtp["heads"], dtp.get("mlp_ratio", 4.0)
        else:
            width, heads, mlp_ratio = vis["width"], vis["width"] // vis.get("head_width", 64), 4.0
        blocks = []
        for i, blist in enumerate(block_lists):
            if tower == "text":
                tokens = txt.get("context_length", 77)
            elif dtp and i == 1:  # DTP-ViT's shortened layers: CLS + the static segment slots
                tokens = 1 + segment_bound(patches, dtp["compression"], dtp.get("max_segments", 0))
            else:
                tokens = 1 + patches
            blocks += [Block(train_tokens[j] if tower == "image" and train_tokens else tokens, width,
                             int(width * mlp_ratio), heads, sum(p.numel() for p in blk.parameters()))
                       for j, blk in enumerate(blist)]
        towers[tower] = tuple(blocks)
    params = sum(p.numel() for p in model.parameters())
    in_blocks = sum(b.params for blocks in towers.values() for b in blocks)
    numels = tuple(p.numel() for p in model.parameters())
    visual = sum(p.numel() for p in model.visual.parameters())
    loose = sum(p.numel() for n, p in model.named_parameters() if n.startswith("logit_"))
    blocks_of = {t: sum(b.params for b in blocks) for t, blocks in towers.items()}
    roots = {"image": visual - blocks_of["image"], "text": params - visual - loose - blocks_of["text"]}
    return ModelShape(params, towers, params - in_blocks, arch["embed_dim"], 3 * size * size, max(numels), numels,
                      roots, txt.get("context_length", 77))
