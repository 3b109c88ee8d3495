"""Every registered model builds; tiny variants (and ViT-B-32) train a step on CPU with every
parameter receiving a finite gradient (timm's per-model test habit)."""
from __future__ import annotations

import pytest
import torch
from open_clip import ClipLoss

import models

# image-tower parameter counts (millions) from the design notes / open_clip's model profile
PUBLISHED_IMAGE_TOWER_M = {"ViT-B-32": 88, "ViT-B-16": 86, "ViT-L-14": 304, "ViT-H-14": 632, "ViT-g-14": 1013}


def test_registry_lists_the_product_models():
    names = models.list_models()
    assert {"ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14"} <= set(names)
    assert any(models.get_spec(n).tiny for n in names)
    with pytest.raises(ValueError, match="model.name: unknown model 'nope'"):
        models.get_spec("nope")


@pytest.mark.parametrize("name", list(PUBLISHED_IMAGE_TOWER_M))
def test_large_models_have_published_sizes(name):
    model = models.create_model(name, device="meta")  # shapes only
    image_m = sum(p.numel() for p in model.visual.parameters()) / 1e6
    assert abs(image_m - PUBLISHED_IMAGE_TOWER_M[name]) / PUBLISHED_IMAGE_TOWER_M[name] < 0.02
    assert model.logit_scale.shape == (1,)


@pytest.mark.parametrize("name", [n for n in models.list_models() if models.get_spec(n).tiny] + ["ViT-B-32"])
def test_forward_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = models.create_model(name)
    size, ctx = models.image_size(name), models.context_length(name)
    images = torch.randn(3, 3, size, size)
    text = models.get_tokenizer(name)(["a photo of a cat", "a dog", "the digit seven"])
    assert text.shape == (3, ctx)
    out = model(images, text)
    assert out["image_features"].shape == out["text_features"].shape == (3, models.architecture(name)["embed_dim"])
    loss = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"parameters without a finite gradient: {missing[:5]}"
    assert sum(p.grad.abs().sum().item() > 0 for p in model.parameters()) > 0.9 * len(list(model.parameters()))
