"""Fit-probe cells and input: what a cell is, the probe's options, this machine's device and environment
fingerprint, and the checks that refuse bad input before any probe runs (see :mod:`harness.fit.probe`)."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from harness.config.job_config import PRECISIONS
from harness.core.units import GIB
from harness.distributed.hardware import cpu_label, host_memory_gib
from harness.fit.memory_model import STAGES, MemoryModel, Setup

FAILURES = ("oom", "hang")  # outcomes that bound the search from above
TERMINAL = ("error", "unsupported")  # outcomes that end a cell: not a memory boundary


class ProbeInputError(ValueError):
    """Bad fit-probe input; the message names the flag and the allowed values."""


def add_cell_arguments(p: argparse.ArgumentParser) -> None:
    """The cell grammar shared by ``harness fit-probe`` and ``harness plan``: which models, engines, precisions,
    checkpointing, attention backends, cluster shapes, loss forms and accumulation searches make the cells
    (:func:`build_cells`)."""
    p.add_argument("--models", help="comma-separated registered models (required unless --merge)")
    p.add_argument("--stages", default="2", help=f"comma-separated, of: {', '.join(STAGES)} (ddp: plain PyTorch "
                   "DDP; 0-3: DeepSpeed ZeRO; fsdp / fsdp-sgo: FSDP2 full shard / shard-grad-op)")
    p.add_argument("--precisions", default="bf16", help="comma-separated, of: fp32, bf16, fp16")
    p.add_argument("--checkpointing", default="0", help="comma-separated: 0 off, k = every k-th block")
    p.add_argument("--attention", default="sdpa", help="comma-separated attention backends (math = flash off)")
    p.add_argument("--gpus-per-node", default="1", help="comma-separated positive integers")
    p.add_argument("--nodes", default="1", help="comma-separated positive integers")
    p.add_argument("--losses", default="clip-dense", help="comma-separated loss forms, of: clip-dense (open_clip's "
                   "ClipLoss), clip-tiled, siglip-dense (open_clip's SigLipLoss), siglip-tiled (harness.train.losses)")
    p.add_argument("--tile-size", type=int, default=1024, help="columns per tile of the tiled losses")
    p.add_argument("--accum-search", metavar="MICRO", help="comma-separated micro batches: for each, search the "
                   "largest count K of micro batches accumulated with negatives instead of the micro batch (the "
                   "contrastive batch K x micro x world is reported)")
    p.add_argument("--max-accum", type=int, default=4096, help="largest accumulation count tried (--accum-search)")


def probe_parser(description: str = "") -> argparse.ArgumentParser:
    """The ``harness fit-probe`` flags with their defaults and help: the one definition of the probe's options
    (:class:`ProbeOptions` is made from it)."""
    p = argparse.ArgumentParser(prog="harness fit-probe", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(p)
    p.add_argument("--budget-gib", type=float, help="memory per process in GiB (required in CPU mode; on a GPU it "
                   "emulates a smaller card)")
    p.add_argument("--granularity", type=int, default=8, help="micro batches are multiples of this")
    p.add_argument("--max-batch", type=int, default=1 << 16, help="largest micro batch tried")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per probe (>= 2; the first is warm-up)")
    p.add_argument("--margin", type=float, default=0.05, help="GPU: fraction of memory kept free for the batch the "
                   "table recommends beside the largest measured fit (harness plan's)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a probe counts as a hang")
    p.add_argument("--cpu-processes", type=int, default=2, help="CPU mode: ranks that may run at once here")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="slurm: multi-node cells run with srun across the allocation's nodes")
    p.add_argument("--max-nodes", type=int, help="the partition's node limit: larger cells are 'scheduler limit'")
    p.add_argument("--cluster", default=os.environ.get("SLURM_CLUSTER_NAME", ""), help="for the table")
    p.add_argument("--partition", default=os.environ.get("SLURM_JOB_PARTITION", ""), help="for the table")
    p.add_argument("--select", choices=("all", "single-node", "multi-node"), default="all",
                   help="probe only single-node or only multi-node cells (the phases of slurm/fit_probe.sbatch)")
    p.add_argument("--shard", help="I/K: probe only every K-th cell starting at I (one node of a Slurm sweep)")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="merge these sweep folders into --out and render")
    p.add_argument("--report", action="store_true", help="only render the table of the store in --out again")
    p.add_argument("--out", required=True, help="output folder (the store; resumable)")
    return p


def _options_class() -> type:
    """:class:`ProbeOptions`: a frozen dataclass with one field per flag of :func:`probe_parser` (its default the
    flag's) and three fields of the probe's own."""
    actions = [a for a in probe_parser()._actions if a.dest != "help"]
    flags = [(a.dest, Any) for a in actions if a.required]
    flags += [(a.dest, Any, field(default=a.default)) for a in actions if not a.required]
    own = [("command", str, field(default="")), ("probe_env", Dict[str, str], field(default_factory=dict)),
           ("rerendered_with", Optional[str], field(default=None))]
    doc = """The fit probe's options, as parsed from the command line (frozen: a step that needs a changed value makes
    a copy with :meth:`replace`). One field per flag of :func:`probe_parser` (``-`` becomes ``_``; see
    ``harness fit-probe --help``), and:

        command: the command line that made these options (kept in the store and the table).
        probe_env: environment variables for every probe process (CPU mode: no GPU, the thread count).
        rerendered_with: the ``--report`` command that re-rendered a store, named in the table.
    """
    cls = dataclasses.make_dataclass("ProbeOptions", flags + own, frozen=True, namespace={
        "__doc__": doc, "replace": lambda self, **changes: dataclasses.replace(self, **changes)})
    cls.__module__ = __name__
    return cls


ProbeOptions = _options_class()


@dataclass(frozen=True)
class Cell(Setup):
    """One cell of the memory-fit table: the memory model's :class:`Setup` (engine, precision, checkpointing,
    attention, loss, accumulation; its fields come first and positionally), the model, and where it runs
    (``model``, ``nodes``, ``gpus_per_node``: keywords). ``world`` is ``nodes x gpus_per_node``."""

    world: int = field(default=0, init=False)
    model: str = field(kw_only=True)
    nodes: int = field(default=1, kw_only=True)
    gpus_per_node: int = field(default=1, kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "world", self.nodes * self.gpus_per_node)

    @property
    def key(self) -> str:
        """Unique cell name; the loss and the accumulation only appear where they are not the default (open_clip's
        dense CLIP loss, micro batch searched), so the keys of earlier stores still match."""
        loss = "" if (self.loss, self.loss_impl) == ("clip", "dense") else f"|loss={self.loss}-{self.loss_impl}"
        if self.loss_impl == "tiled":
            loss += f"-t{self.tile}"
        accum = f"|accum-micro={self.micro}" if self.micro else ""
        return (f"{self.model}|stage={self.stage}|{self.precision}|ckpt={self.checkpointing}|{self.attention}|"
                f"{self.nodes}x{self.gpus_per_node}{loss}{accum}")

    def contrastive_batch(self, searched: int) -> int:
        """The samples the contrastive loss sees per optimizer step at searched value ``searched`` (the micro
        batch, or with ``micro`` the accumulation count): ``micro x world`` without accumulation (local loss,
        gather-with-grad), ``K x micro x world`` with accumulation with negatives."""
        return self.rows_cols(searched)[2]

    @property
    def family(self) -> tuple:
        """Cells sharing the model's memory behaviour: the memory model's calibration family."""
        return MemoryModel.family(self.model, self.setup())

    def setup(self) -> Setup:
        """The memory model's view of this cell (what calibration is keyed on: no model, no node layout)."""
        return Setup(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Setup)})

    @classmethod
    def from_record(cls, rec: Dict[str, Any]) -> "Cell":
        """The cell of a ``cells.jsonl`` record (records written before the loss fields: open_clip's dense CLIP)."""
        return cls(rec["stage"], rec["precision"], rec["checkpointing"], rec["attention"], loss=rec.get("loss", "clip"),
                   loss_impl=rec.get("loss_impl", "dense"), tile=rec.get("tile", 1024), micro=rec.get("micro", 0),
                   model=rec["model"], nodes=rec["nodes"], gpus_per_node=rec["gpus_per_node"])


def stage_label(stage: str) -> str:
    """``"DDP"``, ``"ZeRO-2"``, ``"ZeRO-3 + offload"``, ``"FSDP2 full shard"``, ... for tables and pictures."""
    return {"ddp": "DDP", "fsdp": "FSDP2 full shard", "fsdp-sgo": "FSDP2 shard-grad-op"}.get(
        stage, f"ZeRO-{stage.replace('-offload', '')}" + (" + offload" if stage.endswith("offload") else ""))


# --------------------------------------------------------------------------- devices and environment

_DEVICE_QUERY = ("import json, torch; n = torch.cuda.device_count(); print(json.dumps([[torch.cuda.get_device_name(i), "
                 "torch.cuda.get_device_properties(i).total_memory] for i in range(n)]))")


def local_device() -> Dict[str, Any]:
    """This machine's accelerator, read without creating a CUDA context in this (parent) process: a child Python
    asks torch for the devices ``CUDA_VISIBLE_DEVICES`` leaves visible (indices, UUIDs and MIG instances alike,
    as CUDA itself resolves them), else the CPU (architecture, vector ISA, cores) and its memory.

    Raises:
        ProbeInputError: ``nvidia-smi`` lists GPUs but torch sees none of the visible devices (a device list that
            names no usable GPU), instead of silently falling back to CPU mode.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    cpu = {"type": "cpu", "name": cpu_label(), "memory_gib": host_memory_gib(), "count": 0}
    if visible == "" or not shutil.which("nvidia-smi"):
        return cpu
    try:
        out = subprocess.run([sys.executable, "-c", _DEVICE_QUERY], capture_output=True, text=True, timeout=120,
                             check=True).stdout
        gpus = json.loads(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        raise ProbeInputError(f"CUDA_VISIBLE_DEVICES={visible!r}: could not read the visible GPUs with torch ({e})"
                              ) from None
    if not gpus:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout.strip()
        if smi:
            raise ProbeInputError(f"CUDA_VISIBLE_DEVICES={visible!r}: torch sees no GPU although nvidia-smi lists "
                                  f"{len(smi.splitlines())} ({smi.splitlines()[0]} ...); give indices, GPU-/MIG- UUIDs "
                                  "of these devices, or an empty value for CPU mode")
        return cpu
    return {"type": "cuda", "name": gpus[0][0], "memory_gib": gpus[0][1] / GIB, "count": len(gpus)}


def environment(device: Dict[str, Any], budget_gib: Optional[float], steps: int) -> Dict[str, Any]:
    """The fingerprint stored with every record: results from another device, budget, probe length or
    library versions are not reused."""
    versions = {}
    for pkg in ("torch", "deepspeed", "accelerate", "open_clip_torch", "timm"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"device": device["name"], "device_memory_gib": round(device["memory_gib"], 2), "budget_gib": budget_gib,
            "probe_steps": steps, **versions}


# --------------------------------------------------------------------------- input

def _int_list(flag: str, text: str, minimum: int) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ProbeInputError(f"{flag}: expected comma-separated integers >= {minimum}, got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise ProbeInputError(f"{flag}: expected comma-separated integers >= {minimum}, got {text!r}")
    return values


def _choices(flag: str, text: str, allowed) -> List[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise ProbeInputError(f"{flag}: {', '.join(map(repr, bad)) or 'nothing given'} not allowed; allowed: "
                              f"{', '.join(allowed)}")
    return values


def build_cells(args: ProbeOptions) -> List[Cell]:
    """Expand the flags into cells (in the order given).

    Raises:
        ProbeInputError: an unknown model, stage, precision or attention backend, a GPU or node count that
            is not a positive integer, a negative checkpointing interval.
    """
    import models
    from models.attention import ATTENTION_BACKENDS

    names = _choices("--models", args.models, models.list_models())
    stages = _choices("--stages", args.stages, list(STAGES))
    precisions = _choices("--precisions", args.precisions, PRECISIONS)
    checkpointing = _int_list("--checkpointing", args.checkpointing, 0)
    attention = _choices("--attention", args.attention, ATTENTION_BACKENDS)
    gpus = _int_list("--gpus-per-node", args.gpus_per_node, 1)
    nodes = _int_list("--nodes", args.nodes, 1)
    losses = [tuple(v.split("-")) for v in _choices("--losses", args.losses, LOSS_FORMS)]
    if args.tile_size < 1:
        raise ProbeInputError(f"--tile-size: must be a positive integer (columns per tile), got {args.tile_size}")
    micros = _int_list("--accum-search", args.accum_search, 1) if args.accum_search else [0]
    return [Cell(st, p, c, a, loss=lk, loss_impl=li, tile=args.tile_size, micro=mb, model=m, nodes=n, gpus_per_node=g)
            for m in names for st in stages
            for p in precisions for c in checkpointing for a in attention for n in nodes for g in gpus
            for lk, li in losses for mb in micros]


LOSS_FORMS = ("clip-dense", "clip-tiled", "siglip-dense", "siglip-tiled")  # loss.kind - loss.impl


def check_budget(budget_gib: Optional[float], device: Dict[str, Any]) -> None:
    """Raises ProbeInputError: no budget in CPU mode, or a budget above the device's memory."""
    if budget_gib is None:
        if device["type"] == "cpu":
            raise ProbeInputError("--budget-gib: required without a GPU (each probe process's memory, in GiB)")
        return
    if not budget_gib > 0:
        raise ProbeInputError(f"--budget-gib: must be > 0, got {budget_gib}")
    if budget_gib > device["memory_gib"]:
        raise ProbeInputError(f"--budget-gib: {budget_gib:g} GiB is more than the {device['name']}'s "
                              f"{device['memory_gib']:.1f} GiB")


def validate_args(args: ProbeOptions) -> Tuple[List[Cell], Dict[str, Any]]:
    """Everything checked before any probe runs. Raises ProbeInputError."""
    if not args.models:
        raise ProbeInputError("--models: required (comma-separated registered models)")
    cells = build_cells(args)
    if args.select != "all":
        cells = [c for c in cells if (c.nodes == 1) == (args.select == "single-node")]
    device = local_device()
    check_budget(args.budget_gib, device)
    if args.granularity < 1:
        raise ProbeInputError(f"--granularity: must be a positive integer, got {args.granularity}")
    if args.max_batch < args.granularity:
        raise ProbeInputError(f"--max-batch: must be >= --granularity ({args.granularity}), got {args.max_batch}")
    if args.max_accum < 1:
        raise ProbeInputError(f"--max-accum: must be a positive integer, got {args.max_accum}")
    if args.steps < 2:
        raise ProbeInputError(f"--steps: must be >= 2 (AdamW allocates its state at the first step), got {args.steps}")
    if args.cpu_processes < 1:
        raise ProbeInputError(f"--cpu-processes: must be a positive integer, got {args.cpu_processes}")
    if args.max_nodes is not None and args.max_nodes < 1:
        raise ProbeInputError(f"--max-nodes: must be a positive integer, got {args.max_nodes}")
    if args.shard:
        bad = ProbeInputError(f"--shard: expected I/K with 0 <= I < K, got {args.shard!r}")
        try:
            i, k = (int(v) for v in args.shard.split("/"))
        except ValueError:
            raise bad from None
        if not 0 <= i < k:
            raise bad
        cells = cells[i::k]
    return cells, device
