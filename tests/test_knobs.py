"""Scale knobs in one process: attention backends against the unfused reference, activation checkpointing
(same gradients, less activation memory, measured with PyTorch's MemTracker), torch.compile."""
from __future__ import annotations

import pytest
import torch
from open_clip import ClipLoss

import models
from models.attention import ATTENTION_BACKENDS, AttentionBackendError, available_backends, check_backend
from models.blocks import set_grad_checkpointing

CPU = torch.device("cpu")
MODELS = ["ViT-micro-8", "DTP-ViT-micro-8-2x"]


def _batch(name: str, batch: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    size, ctx = models.image_size(name), models.context_length(name)
    return torch.randn(batch, 3, size, size, generator=gen), torch.randint(1, 49408, (batch, ctx), generator=gen)


def _step(model, images, text, dtype=None):
    """Forward + CLIP loss + backward; returns (image features, text features, {param: grad}). The DTP
    tower's Gumbel noise is drawn from a fixed seed so every backend sees the same boundaries."""
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = model(images, text)
        loss = ClipLoss()(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float())
    loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return out["image_features"].detach().float(), out["text_features"].detach().float(), grads


def _run(name: str, attention: str, dtype=None, varlen: str = "off", every: int = 0, batch: int = 6):
    torch.manual_seed(0)
    model = models.create_model(name, attention=attention)
    if hasattr(model.visual, "cfg"):
        model.visual.cfg.varlen = varlen
    if every:
        set_grad_checkpointing(model, every)
    return _step(model, *_batch(name, batch), dtype=dtype)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def test_cpu_runs_at_least_math_sdpa_and_sdpa_flash():
    for dtype in (torch.float32, torch.bfloat16):
        assert {"math", "sdpa", "sdpa_flash"} <= set(available_backends(CPU, dtype))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype, tol", [(None, 1e-5), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16"])
def test_every_available_backend_matches_math_forward_and_backward(name, dtype, tol):
    """Stated tolerance: max |difference| / max |reference| <= 1e-5 in fp32 and 5e-2 under bf16 autocast
    (bf16 keeps 8 mantissa bits), for both towers' features and every parameter's gradient. DTP-ViT runs
    its shortened layers padded (key-padding mask) and packed (per-image attention)."""
    backends = available_backends(CPU, dtype or torch.float32)
    for varlen in (("off", "torch") if name.startswith("DTP") else ("off",)):
        ref_img, ref_txt, ref_grads = _run(name, "math", dtype, varlen)
        for backend in backends:
            img, txt, grads = _run(name, backend, dtype, varlen)
            assert _max_rel(img, ref_img) <= tol and _max_rel(txt, ref_txt) <= tol, (backend, varlen)
            assert grads.keys() == ref_grads.keys()
            worst = max(_max_rel(grads[k], ref_grads[k]) for k in grads if ref_grads[k].abs().max() > 0)
            assert worst <= tol, f"{backend} ({varlen}) gradients differ from math by {worst:.2e}"


def test_backends_route_both_towers():
    model = models.create_model("DTP-ViT-micro-8-2x", attention="math")
    text_attn = [m for m in model.transformer.modules() if hasattr(m, "backend")]
    image_attn = [m for m in model.visual.modules() if hasattr(m, "backend")]
    assert text_attn and image_attn and all(m.backend == "math" for m in text_attn + image_attn)
    assert all(m.causal for m in text_attn)
    vit = models.create_model("ViT-micro-8", attention="sdpa_flash")
    image_attn = [m for m in vit.visual.modules() if hasattr(m, "backend")]
    assert image_attn and all(m.backend == "sdpa_flash" and not m.causal for m in image_attn)
    # same parameter names as open_clip's nn.MultiheadAttention: checkpoints load across backends
    assert vit.state_dict().keys() == models.create_model("ViT-micro-8", attention="math").state_dict().keys()


def test_unavailable_backend_says_why_and_names_what_runs():
    with pytest.raises(AttentionBackendError, match=r"'nope' is not one of sdpa, sdpa_flash"):
        check_backend("nope", CPU, torch.float32)
    missing = [b for b in ATTENTION_BACKENDS if b not in available_backends(CPU, torch.float32)]
    assert missing, "every backend runs on this machine: nothing to refuse"
    with pytest.raises(AttentionBackendError,
                       match=r"is not available on cpu .*; available here: sdpa, sdpa_flash, math"):
        check_backend(missing[0], CPU, torch.float32)


def _activation_peak_bytes(name: str, every: int, batch: int) -> int:
    """Peak activation bytes of one forward + backward, from ``MemTracker``'s per-module snapshots
    (its global "peak" snapshot is taken at the peak total, where activations may already be freed)."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    torch.manual_seed(0)
    model = models.create_model(name)
    if every:
        set_grad_checkpointing(model, every)
    images, text = _batch(name, batch)
    tracker = MemTracker()
    tracker.track_external(model, images, text)
    with tracker:
        out = model(images, text)
        ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    return max(snap[CPU].get(_MemRefType.ACT, 0) for stats in tracker.memory_tracking.values()
               for snaps in stats.snapshots.values() for snap in snaps if CPU in snap)


@pytest.mark.parametrize("name", ["ViT-tiny-8", "DTP-ViT-micro-8-2x"])
def test_checkpointing_keeps_gradients_and_cuts_activation_memory(name):
    """Same gradients (tolerance 1e-6 relative; measured: bit-identical on CPU) with every block or every
    2nd block recomputed, and a lower activation peak: all blocks < every 2nd block < none."""
    _, _, ref = _run(name, "sdpa", batch=16)
    for every in (1, 2):
        _, _, grads = _run(name, "sdpa", every=every, batch=16)
        assert grads.keys() == ref.keys()
        assert max(_max_rel(grads[k], ref[k]) for k in grads if ref[k].abs().max() > 0) <= 1e-6
    peaks = {every: _activation_peak_bytes(name, every, batch=32) for every in (0, 1, 2)}
    assert peaks[1] < peaks[2] < peaks[0], peaks


def test_checkpoint_wrapper_counts_blocks_and_keeps_state_dict_keys():
    model = models.create_model("ViT-micro-8")
    keys = model.state_dict().keys()
    n_image, n_text = len(model.visual.transformer.resblocks), len(model.transformer.resblocks)
    assert set_grad_checkpointing(model, 1) == {"image": n_image, "text": n_text}
    assert set_grad_checkpointing(model, 2) == {"image": n_image // 2, "text": n_text // 2}
    assert model.state_dict().keys() == keys
    assert set_grad_checkpointing(model, 0) == {"image": 0, "text": 0}
    assert all(type(b).__name__ == "ResidualAttentionBlock" for b in model.visual.transformer.resblocks)


@pytest.mark.slow  # inductor compiles C++ kernels for each block: most of a minute on two cores
def test_compiled_blocks_match_eager():
    """``model.compile=true`` compiles each block in place (inductor, CPU); forward and gradients match
    eager to 1e-5 relative, state-dict keys are unchanged."""
    from models.blocks import compile_blocks

    ref_img, ref_txt, ref_grads = _run("ViT-micro-8", "sdpa")
    torch.manual_seed(0)
    model = models.create_model("ViT-micro-8")
    keys = model.state_dict().keys()
    assert compile_blocks(model) == len(model.visual.transformer.resblocks) + len(model.transformer.resblocks)
    img, txt, grads = _step(model, *_batch("ViT-micro-8", 6))
    assert model.state_dict().keys() == keys
    assert _max_rel(img, ref_img) <= 1e-5 and _max_rel(txt, ref_txt) <= 1e-5
    assert max(_max_rel(grads[k], ref_grads[k]) for k in grads if ref_grads[k].abs().max() > 0) <= 1e-5
