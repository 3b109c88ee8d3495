"""The GPU catalog: memory, dense peak TFLOP/s, memory bandwidth and links of the GPUs a plan can name.

One data file, ``gpus.yaml`` next to this module, each entry citing the vendor data sheet it comes from; a user adds
or overrides entries with a YAML file of the same form (``harness plan --gpu-catalog FILE``). :func:`peak_tflops`
(used by ``harness profile`` for MFU) and ``harness plan`` read the same table.

Units: memory in GiB (2**30 bytes) as the driver reports it (``torch.cuda.get_device_properties().total_memory``,
less than the data sheet's decimal GB), compute in dense TFLOP/s (no 2:4 sparsity), bandwidths in GB/s (10**9
bytes per second, one direction, per GPU).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

from harness.core.errors import ConfigError

CATALOG_PATH = Path(__file__).with_name("gpus.yaml")
PRECISION_KEYS = {"fp32": "tf32", "bf16": "bf16", "fp16": "fp16"}
"""The catalog's peak used for a training precision: fp32 matmuls run on TF32 tensor cores (``train.tf32``, on by
default in this harness) where the GPU has them, else at the fp32 peak."""


@dataclass(frozen=True)
class Link:
    """A link between GPUs: ``name`` (e.g. "NVLink 4", "PCIe 4.0 x16", "InfiniBand NDR") and ``gbps``, the bus
    bandwidth one GPU gets in one direction in GB/s (what NCCL's ``busbw`` approaches)."""

    name: str
    gbps: float


@dataclass(frozen=True)
class GPU:
    """One catalog entry.

    Attributes:
        name: the catalog name (``A100-SXM4-40GB``), what ``--gpu`` takes (case-insensitive) with ``aliases``.
        device_names: what ``torch.cuda.get_device_name()`` returns for it (matched exactly, case-insensitive).
        memory_gib: total memory as the driver reports it, GiB.
        tflops: dense peak TFLOP/s by ``tf32`` / ``bf16`` / ``fp16`` / ``fp32`` (missing: not supported).
        hbm_gbps: memory bandwidth, GB/s.
        compute_capability: ``"8.0"``, ``"9.0"`` ...
        intra_node: the GPU-to-GPU link inside a node.
        inter_node: the default fabric between nodes (per GPU), overridable with ``harness plan --fabric-gbps``.
        source: the vendor data sheet the figures come from.
        memory_source: where the driver-reported memory comes from.
    """

    name: str
    memory_gib: float
    tflops: Dict[str, float]
    hbm_gbps: float
    compute_capability: str
    intra_node: Link
    inter_node: Link
    source: str
    memory_source: str = ""
    device_names: Tuple[str, ...] = ()
    aliases: Tuple[str, ...] = field(default=())

    def peak_tflops(self, precision: str) -> Optional[float]:
        """Dense peak TFLOP/s for training ``precision`` (fp32 -> TF32 where present, else fp32); None if the GPU
        cannot run it (bf16 on a V100)."""
        key = PRECISION_KEYS[precision]
        return self.tflops.get(key) or (self.tflops.get("fp32") if precision == "fp32" else None)

    @property
    def generation(self) -> int:
        """Compute capability major (7 Volta, 8 Ampere/Ada, 9 Hopper, 10 Blackwell)."""
        return int(self.compute_capability.split(".")[0])


def _norm(text: str) -> str:
    """Case, spaces, underscores and a leading "NVIDIA " / "Tesla " do not matter when naming a GPU."""
    t = re.sub(r"[\s_]+", "-", text.strip().lower())
    return re.sub(r"^(nvidia|tesla)-", "", t)


def _entry(raw: Dict, origin: str) -> GPU:
    need = ("name", "memory_gib", "tflops", "hbm_gbps", "compute_capability", "intra_node", "inter_node", "source")
    missing = [k for k in need if raw.get(k) in (None, "")]
    if missing:
        raise ConfigError(f"{origin}: GPU entry {raw.get('name', '?')!r} lacks {', '.join(missing)} "
                          f"(every entry needs {', '.join(need)})")
    links = {k: Link(str(raw[k]["name"]), float(raw[k]["gbps"])) for k in ("intra_node", "inter_node")}
    return GPU(name=str(raw["name"]), memory_gib=float(raw["memory_gib"]),
               tflops={k: float(v) for k, v in raw["tflops"].items() if v is not None},
               hbm_gbps=float(raw["hbm_gbps"]), compute_capability=str(raw["compute_capability"]),
               source=str(raw["source"]), memory_source=str(raw.get("memory_source", "")),
               device_names=tuple(raw.get("device_names", ())), aliases=tuple(raw.get("aliases", ())), **links)


def _read(path: Path) -> List[GPU]:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--gpu-catalog: cannot read {path}: {e}") from None
    if not isinstance(raw, list):
        raise ConfigError(f"--gpu-catalog: {path} must hold a YAML list of GPU entries")
    return [_entry(r, str(path)) for r in raw]


@functools.lru_cache(maxsize=None)
def _builtin() -> Tuple[GPU, ...]:
    return tuple(_read(CATALOG_PATH))


def load_catalog(extra: Optional[str] = None) -> Dict[str, GPU]:
    """``{name: GPU}`` of the built-in catalog, updated by the entries of YAML file ``extra`` (same name: replaced;
    read at every call).

    Raises:
        ConfigError: an unreadable file or an entry without a required field.
    """
    out = {g.name: g for g in _builtin()}
    if extra:
        out.update({g.name: g for g in _read(Path(extra))})
    return out


def find_gpu(name: str, extra: Optional[str] = None) -> GPU:
    """The catalog entry called ``name`` (its name, an alias or a ``torch.cuda.get_device_name()``; case, spaces and
    a leading "NVIDIA" ignored).

    Raises:
        ConfigError: no such entry; the message lists the known names.
    """
    catalog = load_catalog(extra)
    key = _norm(name)
    for gpu in catalog.values():
        if key in {_norm(n) for n in (gpu.name, *gpu.aliases, *gpu.device_names)}:
            return gpu
    raise ConfigError(f"--gpu: unknown GPU {name!r}; known: {', '.join(catalog)} (add one with --gpu-catalog FILE)")


def gpu_of_device(device_name: str) -> Optional[GPU]:
    """The catalog entry of a ``torch.cuda.get_device_name()`` string, or None (any CPU, an unlisted GPU)."""
    try:
        return find_gpu(device_name)
    except ConfigError:
        return None


def peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """Dense peak TFLOP/s of the device called ``device_name`` at ``precision``, None when unknown (e.g. a CPU)."""
    gpu = gpu_of_device(device_name)
    return gpu.peak_tflops(precision) if gpu is not None else None
