"""``harness compare-reducers``: DTP-ViT against the token-reduction methods it must beat, at matched image-tower
FLOPs, trained under one config and budget, in one table and one plot.

    harness compare-reducers --vit ViT-tiny-8 --dtp DTP-ViT-tiny-8-2x --dtp DTP-ViT-tiny-8-4x \\
        --out results/reducers_mnist --seeds 3 -- --config mnist

1. **The FLOPs matcher** (:func:`match_setting`): for each ``--dtp`` model and each method (ToMe, TokenLearner v1.1,
   DynamicViT; :mod:`models.reducers`), the setting on ``--vit`` whose image-tower forward GMACs (``harness flops``:
   fvcore, attention counted, one image, evaluation mode; DTP-ViT at its nominal boundaries, one every ``compression``
   patches) is closest to the DTP-ViT model's, and whether it lies within ``--tolerance`` (5%). Settings searched:
   ToMe's constant ``r``; TokenLearner's ``S`` in 1, 2, 4, 8, 16 (below the patch count) with every insertion depth;
   DynamicViT's ``rho`` on a 0.01 grid. Costs grow monotonically along each setting, so each is bisected.
   ``--match-only`` prints the matches and stops.
2. **The runs**: the plain ViT, every DTP-ViT model and every matched setting, each with ``--seeds`` seeds, through
   ``harness ablate``'s runner (:mod:`harness.tools.ablate`: fresh ``train.py`` processes, ``--launch-config`` for
   ``accelerate launch`` on a GPU node; resumable; every config validated before the first run).
3. **The table** (``compare.md`` / ``compare.json`` / ``compare.png`` in ``--out``): image-tower MACs, the tokens
   entering each image block (evaluation), train samples/s and zero-shot eval images/s, peak memory, zero-shot top-1
   and top-5 (mean +- std over seeds), and each row's top-1 gap (points) and train speed-up against the plain ViT.
"""
from __future__ import annotations

import argparse
import bisect
import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from harness.core.errors import ConfigError, ExitCode, refuse
from harness.tools import ablate

TOLERANCE = 0.05
METHODS = ("tome", "tokenlearner", "dynamicvit")


@functools.lru_cache(maxsize=None)
def image_gmacs(name: str) -> float:
    """Image-tower forward GMACs per sample of ``name`` (:func:`harness.tools.flops.model_gmacs`; DTP-ViT nominal)."""
    from harness.tools.flops import model_gmacs

    return model_gmacs(name)["image_gmacs"]


def _closest(candidates: Sequence[str], cost: Callable[[str], float], target: float) -> str:
    """The candidate of cost closest to ``target``; ``candidates`` in order of non-decreasing cost (bisected)."""
    first = bisect.bisect_left(candidates, target, key=cost)  # the first costing >= target
    near = [candidates[i] for i in (first - 1, first) if 0 <= i < len(candidates)]
    return min(near, key=lambda n: abs(cost(n) - target))


def candidates(vit: str, method: str) -> List[List[str]]:
    """The settings of ``method`` on ``vit``, as lists each ordered by non-decreasing image-tower cost."""
    import models
    from models.dynamicvit import STAGES, keep_count
    from models.reducers import model_name

    vision = models.architecture(vit)["vision_cfg"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    layers = vision["layers"]
    if method == "tome":
        return [[model_name(vit, "tome", r=r) for r in range(patches // 2, 0, -1)]]
    if method == "tokenlearner":
        return [[model_name(vit, "tokenlearner", tokens=s, at=at) for at in range(1, layers)]
                for s in (1, 2, 4, 8, 16) if s < patches]
    if method == "dynamicvit":
        rhos = [i / 100 for i in range(5, 100)]
        return [[model_name(vit, "dynamicvit", keep_ratio=rho) for rho in rhos
                 if keep_count(patches, rho, STAGES) >= 1]]
    raise ConfigError(f"--methods: {method!r} is not one of {', '.join(METHODS)}")


def match_setting(vit: str, method: str, target_gmacs: float, tolerance: float = TOLERANCE) -> Dict[str, Any]:
    """The setting of ``method`` on ``vit`` whose image-tower GMACs are closest to ``target_gmacs``.

    Returns:
        ``{"method", "model", "image_gmacs", "relative_gap" (signed, vs the target), "within" (|gap| <= tolerance)}``.
    """
    best = min((_closest(group, image_gmacs, target_gmacs) for group in candidates(vit, method)),
               key=lambda n: abs(image_gmacs(n) - target_gmacs))
    gap = image_gmacs(best) / target_gmacs - 1
    return {"method": method, "model": best, "image_gmacs": image_gmacs(best), "relative_gap": gap,
            "within": abs(gap) <= tolerance}


def tokens_per_block(name: str) -> List[int]:
    """The tokens entering each image block at evaluation (class token included); DTP-ViT's shortened blocks at the
    nominal shortening (``1 + patches / compression``)."""
    import models

    arch = models.architecture(name)
    dtp = arch.get("dtp_cfg")
    if dtp:
        patches = (dtp["image_size"] // dtp["patch_size"]) ** 2
        short = 1 + round(patches / dtp["compression"])
        return ([1 + patches] * dtp["pre_layers"] + [short] * dtp["shortened_layers"]
                + [1 + patches] * dtp.get("post_layers", 0))
    visual = models.create_model(name, device="meta").visual
    vision = arch["vision_cfg"]
    return list(getattr(visual, "tokens_per_block", [1 + (vision["image_size"] // vision["patch_size"]) ** 2]
                        * vision["layers"]))


def write_outputs(rows: List[Dict[str, Any]], matches: List[Dict[str, Any]], records: List[Dict[str, Any]],
                  out: Path, command: str) -> None:
    """``compare.md``, ``compare.json`` and ``compare.png`` in ``out``; ``rows`` from :func:`harness.tools.ablate.
    aggregate` with ``model``, ``image_gmacs``, ``tokens_per_block`` and ``matches`` added."""
    pm = ablate.pm  # "mean +- std" cells, as the ablation table writes them
    base = rows[0]
    lines = [f"# DTP-ViT and token reducers at matched FLOPs\n\nCommand: `{command}`\n",
             "Image MACs: image-tower forward multiply-adds per image (M = 1e6, G = 1e9), fvcore with attention "
             "counted (DTP-ViT at nominal boundaries). "
             "Speed-up: train samples/s against the plain ViT (row 0). Tokens: entering each image block at "
             "evaluation, class token included.\n",
             "| row | model | matched to | image MACs | tokens per block | seeds | train samples/s | speed-up "
             "| eval images/s | peak GiB | zero-shot top-1 % | top-5 % | top-1 gap (pp) |", "|" + "---|" * 13]
    for r in rows:
        speed = r["samples_per_s"] / base["samples_per_s"] if r["samples_per_s"] and base["samples_per_s"] else None
        gap = "n/a" if r["top1_gap_pp"] is None else f"{r['top1_gap_pp']:+.1f}"
        target = ", ".join(f"{m['dtp']} ({100 * m['relative_gap']:+.1f}%{'' if m['within'] else ', outside 5%'})"
                           for m in r["matches"]) or "-"
        cells = [str(r["row"]), r["model"], target, f"{1000 * r['image_gmacs']:.2f} M" if r["image_gmacs"] < 0.1
                 else f"{r['image_gmacs']:.3f} G", " ".join(map(str, r["tokens_per_block"])), str(r["seeds"]),
                 pm(r["samples_per_s"], r["samples_per_s_std"], 1, ".0f"), "n/a" if speed is None else f"{speed:.2f}x",
                 pm(r["eval_images_per_s"], r["eval_images_per_s_std"], 1, ".0f"),
                 pm(r["peak_gib"], r["peak_gib_std"], 1, ".2f"), pm(r["top1"], r["top1_std"], 100),
                 pm(r["top5"], r["top5_std"], 100), gap]
        lines.append("| " + " | ".join(cells) + " |")
    missed = [m for m in matches if not m["within"]]
    lines.append("\n" + ("Every matched setting is within 5% of its DTP-ViT target's image GMACs." if not missed else
                         "Outside 5% of their target: " + "; ".join(
                             f"{m['model']} for {m['dtp']} ({100 * m['relative_gap']:+.1f}%)" for m in missed)))
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    (out / "compare.json").write_text(json.dumps({"command": command, "matches": matches, "rows": rows,
                                                  "runs": records}, indent=1))
    _plot(rows, out / "compare.png")


def _plot(rows: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for r in rows:
        if r["top1"] is None:
            continue
        ax1.errorbar(r["image_gmacs"] * 1000, 100 * r["top1"], yerr=100 * r["top1_std"], fmt="o", capsize=3,
                     label=r["model"])
        ax2.errorbar(r["samples_per_s"], 100 * r["top1"], xerr=r["samples_per_s_std"], yerr=100 * r["top1_std"],
                     fmt="o", capsize=3)
    ax1.set_xlabel("image tower MMACs per image (fvcore)")
    ax2.set_xlabel("train samples/s, mean +- std over seeds")
    for ax in (ax1, ax2):
        ax.set_ylabel("zero-shot top-1 (%), mean +- std")
        ax.grid(alpha=0.3)
    fig.legend(loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    """``harness compare-reducers`` entry point; exit status 2 on bad input (before anything runs), 1 if a run
    failed."""
    import models

    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="harness compare-reducers", description=__doc__.split("\n\n")[0])
    p.add_argument("--vit", default="ViT-tiny-8", help="the plain ViT (baseline row, and the reducers' base)")
    p.add_argument("--dtp", action="append", default=None, help="a DTP-ViT model to compare and match (repeatable)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="matched if |GMACs gap| <= this fraction")
    p.add_argument("--match-only", action="store_true", help="print the FLOPs matches and stop")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", help="output folder (runs, table, plot); re-running resumes")
    p.add_argument("--launch-config", default=None, help="accelerate launch config (e.g. ds_configs/zero2.yaml)")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--timeout-s", type=float, default=None, help="kill a run after this many seconds")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: --config PRESET section.field=value ...")
    args = p.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != "--"]
    try:
        if models.get_spec(args.vit).family != "vit":
            raise ConfigError(f"--vit: {args.vit!r} is not a plain ViT")
        dtps = args.dtp or []
        for name in dtps:
            if models.get_spec(name).family != "dtp-vit":
                raise ConfigError(f"--dtp: {name!r} is not a DTP-ViT model")
        methods = [m for m in args.methods.split(",") if m]
        for m in methods:
            if m not in METHODS:
                raise ConfigError(f"--methods: {m!r} is not one of {', '.join(METHODS)}")
        if args.seeds < 1:
            raise ConfigError(f"--seeds: must be >= 1, got {args.seeds}")
        if not args.match_only and not args.out:
            raise ConfigError("--out: required unless --match-only")
    except (ConfigError, ValueError) as e:
        return refuse(e)
    matches = []
    for dtp in dtps:
        for m in methods:
            matches.append({"dtp": dtp, "dtp_image_gmacs": image_gmacs(dtp),
                            **match_setting(args.vit, m, image_gmacs(dtp), args.tolerance)})
    print(f"{'DTP-ViT':<22} {'GMACs':>8} {'method':<13} {'matched setting':<34} {'GMACs':>8} {'gap':>7}")
    for m in matches:
        print(f"{m['dtp']:<22} {m['dtp_image_gmacs']:>8.4f} {m['method']:<13} {m['model']:<34} "
              f"{m['image_gmacs']:>8.4f} {100 * m['relative_gap']:>+6.1f}%{'' if m['within'] else ' (outside)'}")
    if args.match_only:
        return ExitCode.OK
    names = list(dict.fromkeys([args.vit, *dtps, *(m["model"] for m in matches)]))
    knobs = [("model.name", names)]
    combos = [(("model.name", n),) for n in names]
    try:
        ablate.build_configs(args.train_args, combos, args.seeds, args.num_processes)
    except ConfigError as e:
        return refuse(e)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = ablate.run_grid(args, knobs, combos, out)
    rows = ablate.aggregate(records)
    for row in rows:
        name = row["knobs"]["model.name"]
        row.update(model=name, image_gmacs=image_gmacs(name), tokens_per_block=tokens_per_block(name),
                   matches=[{k: m[k] for k in ("dtp", "relative_gap", "within")} for m in matches
                            if m["model"] == name])
    write_outputs(rows, matches, records, out, "harness compare-reducers " + " ".join(argv))
    print((out / "compare.md").read_text())
    return ExitCode.OK if all(r["summary"] for r in records) else ExitCode.ERROR
