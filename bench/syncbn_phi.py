#!/usr/bin/env python
"""SyncBN and the backbone's Phi: grad_var per detector part (AGVM eq. 3, Phi = 1 - cos(G1, G2) of the two
workers' half-batch gradients) measured on the same weights and the same images, once with SyncBN and once with
per-worker BN.

Each measurement is ``train_net.py`` on the study's data with ``SOLVER.BASE_LR 0`` (the weights never move: SGD's
step is LR x (gradient + weight decay)), ``MONITOR.PERIOD 1`` (Phi every iteration) and the study's seed, so the
two BN modes see the same images in the same order at the same weights: their Phi differ only by how BN couples
the two workers. Weights: the study's starting point (the pre-trained backbone, FPN and heads at their
initialization) and, when the study has run, ``sgd_b64_linear``'s final model. A third pair splits the backbone's
BN scale / shift parameters into a part of their own ("other") to show which parameters carry the difference.

    python bench/syncbn_phi.py                      # after (or during) bench/large_batch_study.py
    python bench/syncbn_phi.py --iters 8 --study output/study_quick
    python bench/syncbn_phi.py --study output/study_sweep --trained output/study_sweep/sgd_linear_b48_x1/model_final.pth

Writes ``OUTPUT/syncbn_phi.md`` (the tables) and ``OUTPUT/syncbn_phi.json`` (every record), OUTPUT defaulting to
``<study>/syncbn_phi``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from typing import Dict, List

from harness import train_net

from largebatch.analysis.metrics import read_json
from largebatch.analysis.study import grad_var_records, noise_records
from largebatch.files import atomic_write

CONFIG = os.path.join("configs", "shapes", "study", "sgd_b64_linear.yaml")
# the backbone's BN scale / shift as a part of their own (a part name the partition accepts; nothing else is there)
SPLIT_BN = ["MODEL.MODULE_PARTITION", '[["other", "^backbone\\\\.bottom_up\\\\..*\\\\.norm\\\\."]]']
PARTS = ("backbone", "other", "fpn", "rpn", "box_head")


def measure(name: str, out_root: str, weights: str, sync_bn: bool, data_opts: List[str], extra: List[str],
            args) -> dict:
    """One measurement run; returns its Phi records [(iteration, {part: Phi})] and how long it took."""
    out = os.path.join(out_root, name)
    opts = data_opts + [
        "MODEL.WEIGHTS", weights, "MODEL.SYNC_BN.ENABLED", str(sync_bn),
        "SOLVER.BASE_LR", "0.0", "SOLVER.SCHEDULE_UNIT", "iter", "SOLVER.MAX_ITER", str(args.iters),
        "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "1000000", "TEST.EVAL_PERIOD", "0",
        "DATASETS.TEST", "()", "MONITOR.PERIOD", "1",
    ] + extra
    t0 = time.perf_counter()
    rc, _ = train_net(out, CONFIG, opts, args.num_workers, args.python)
    if rc != 0:
        raise SystemExit(f"[syncbn_phi] {name}: train_net.py exited with {rc}; see {out}/train.log")
    records = grad_var_records(out)
    print(f"[syncbn_phi] {name}: {len(records)} records in {time.perf_counter() - t0:.0f} s", flush=True)
    return {"name": name, "sync_bn": sync_bn, "weights": weights, "records": records, "noise": noise_records(out),
            "wall_s": round(time.perf_counter() - t0, 1)}


def _mean_std(values: List[float]) -> str:
    if not values:
        return "-"
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / max(1, len(values) - 1))
    return f"{m:.3f} ± {sd:.3f}"


def pair_table(label: str, sync: dict, per_worker: dict) -> List[str]:
    """Per part: Phi with SyncBN and with per-worker BN (mean ± std over the iterations), their paired difference,
    and the iterations with Phi > 1; then AGVM's raw multiplier Phi_backbone / Phi_part under each."""
    a = dict(sync["records"])
    b = dict(per_worker["records"])
    its = sorted(set(a) & set(b))
    parts = [p for p in PARTS if any(p in a[i] for i in its)]
    lines = [f"**{label}** ({len(its)} iterations, the same images in both columns)", "",
             "| part | Phi, SyncBN | Phi, per-worker BN | SyncBN - per-worker (paired) | Phi > 1 SyncBN / per-worker "
             "| Phi_backbone / Phi_part SyncBN / per-worker |",
             "|---|---:|---:|---:|---:|---:|"]
    for p in parts:
        xs = [a[i][p] for i in its if p in a[i] and p in b[i]]
        ys = [b[i][p] for i in its if p in a[i] and p in b[i]]
        ratio = "-"
        if p != "backbone" and "backbone" in a[its[0]]:
            ra = [a[i]["backbone"] / a[i][p] for i in its if a[i].get(p)]
            rb = [b[i]["backbone"] / b[i][p] for i in its if b[i].get(p)]
            ratio = f"{sum(ra) / len(ra):.2f} / {sum(rb) / len(rb):.2f}"
        lines.append(f"| {p} | {_mean_std(xs)} | {_mean_std(ys)} | {_mean_std([x - y for x, y in zip(xs, ys)])} "
                     f"| {sum(x > 1 for x in xs)} / {sum(y > 1 for y in ys)} | {ratio} |")
    return lines + [""]


def noise_table(label: str, sync: dict, per_worker: dict) -> List[str]:
    """Per part (and the whole model): the gradient noise scale's terms tr(Sigma) and |G|^2 with SyncBN and with
    per-worker BN (means over the iterations, each iteration's unbiased estimate), tr(Sigma)'s paired ratio, and
    B_simple of the means: how much SyncBN's coupling of the workers biases the noise scale."""
    a, b = dict(sync["noise"]), dict(per_worker["noise"])
    its = sorted(set(a) & set(b))
    if not its:
        return []
    lines = [f"**{label}**: gradient noise scale ({len(its)} iterations; per iteration McCandlish's unbiased terms "
             "from the 2 workers' gradients)", "",
             "| part | tr(Sigma) SyncBN / per-worker | SyncBN / per-worker (paired mean) | |G|^2 SyncBN / per-worker "
             "| B_simple SyncBN / per-worker (images) |", "|---|---:|---:|---:|---:|"]
    for p in [*[p for p in PARTS if p in a[its[0]]], "all"]:
        pairs = [(a[i][p], b[i][p]) for i in its if p in a[i] and p in b[i]]
        if not pairs:
            continue
        mean = [sum(x[k] for x, _ in pairs) / len(pairs) for k in (0, 1)]
        ref = [sum(y[k] for _, y in pairs) / len(pairs) for k in (0, 1)]
        ratio = sum(x[1] / y[1] for x, y in pairs if y[1]) / max(1, sum(1 for _, y in pairs if y[1]))
        lines.append(f"| {p} | {mean[1]:.4g} / {ref[1]:.4g} | {ratio:.3f} | {mean[0]:.4g} / {ref[0]:.4g} "
                     f"| {_b_simple(*mean)} / {_b_simple(*ref)} |")
    return lines + [""]


def _b_simple(grad_sq: float, trace: float) -> str:
    """tr(Sigma) / |G|^2 in images, or n/a where |G|^2 is not positive."""
    return f"{trace / grad_sq:.3g}" if grad_sq > 0 else "n/a"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="output/study",
                   help="the study's output: its study.json (or bench/study_sweep.py's sweep.json) names data, weights")
    p.add_argument("--trained", default=None,
                   help="trained weights to measure at too (default <study>/sgd_b64_linear/model_final.pth if there)")
    p.add_argument("--output", default=None, help="default: <study>/syncbn_phi")
    p.add_argument("--iters", type=int, default=16, help="measured iterations per run (default 16)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)
    study = os.path.abspath(args.study)
    saved = read_json(os.path.join(study, "study.json")) or read_json(os.path.join(study, "sweep.json"))
    if not saved or "inputs" not in saved:
        p.error(f"{study}/study.json not found: run bench/large_batch_study.py first (it writes the data and the "
                "pre-trained backbone)")
    if args.trained and not os.path.isfile(args.trained):
        p.error(f"--trained {args.trained}: no such file")
    opts = list(saved["inputs"]["opts"])
    if "MODEL.WEIGHTS" not in opts:
        p.error("the study ran --from-scratch: this measures at the pre-trained starting point")
    i = opts.index("MODEL.WEIGHTS")
    start_weights = opts[i + 1]
    data_opts = opts[:i] + opts[i + 2:]
    out_root = os.path.abspath(args.output or os.path.join(study, "syncbn_phi"))
    os.makedirs(out_root, exist_ok=True)
    weights = {"start": start_weights}
    trained = os.path.abspath(args.trained or os.path.join(study, "sgd_b64_linear", "model_final.pth"))
    if os.path.isfile(trained):
        weights["trained"] = trained
    runs: Dict[str, dict] = {}
    for label, path in weights.items():
        for sync in (True, False):
            name = f"{label}_{'syncbn' if sync else 'bn'}"
            runs[name] = measure(name, out_root, path, sync, data_opts, [], args)
    split_label = "trained" if "trained" in weights else "start"
    for sync in (True, False):
        name = f"{split_label}_split_{'syncbn' if sync else 'bn'}"
        runs[name] = measure(name, out_root, weights[split_label], sync, data_opts, SPLIT_BN, args)

    text = ["# SyncBN and the backbone's Phi", "",
            f"`python bench/syncbn_phi.py {' '.join(shlex.quote(a) for a in (argv or sys.argv[1:]))}`", "",
            f"grad_var = Phi = 1 - cos(G1, G2) of the 2 workers' gradients (32 images each), batch 64 "
            f"({CONFIG}), SOLVER.BASE_LR 0 so that both BN modes are measured at the same weights on the same "
            f"images, {args.iters} iterations each. Phi = 1: the halves' gradients are uncorrelated; Phi > 1: they "
            "point apart. The last column is AGVM's multiplier for each part before its momentum and clamp.", ""]
    for label in weights:
        text += pair_table(f"weights: {label} ({weights[label]})", runs[f"{label}_syncbn"], runs[f"{label}_bn"])
        text += noise_table(f"weights: {label}", runs[f"{label}_syncbn"], runs[f"{label}_bn"])
    text += pair_table(f"weights: {split_label}, backbone BN scale / shift measured apart as 'other' (backbone = "
                       "its convolutions only)", runs[f"{split_label}_split_syncbn"], runs[f"{split_label}_split_bn"])
    atomic_write(os.path.join(out_root, "syncbn_phi.md"), lambda f: f.write("\n".join(text)))
    atomic_write(os.path.join(out_root, "syncbn_phi.json"), lambda f: json.dump(runs, f, indent=1))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
