#!/usr/bin/env python
"""AGVM's Fig. 1 for every dense-prediction pipeline: the gradient variance of each detector part during training, at
a small and a large batch, with plain SGD (the monitor measures, AGVM does not act), and each part's gradient noise
scale.

AGVM (Xue et al. 2022) Fig. 1 plots Phi = 1 - cos(G1, G2) (eq. 3) per module for Mask R-CNN at growing batches: the
modules' variances drift apart as the batch grows, and Sec. 4.2 traces it to the effective batch of each module
(RetinaNet's head is shared by the 5 pyramid levels: it sees 5x the locations of the backbone). Here the same
measurement for RetinaNet, Semantic FPN and Panoptic FPN (configs/shapes/{retinanet,semantic_fpn,panoptic_fpn}.yaml:
the embedded shapes data, SyncBN over the workers, from scratch), each at ``--batches`` (default 8 and 64) with SGD,
MegDet's linear LR scaling from the pipeline's batch-16 LR and AGVM off, ``--epochs`` epochs of the 1024 training
images, about 30 measurements per run, evaluated at the end with the pipeline's metric. A run that diverges (the
explosion guard stops it) is run again at half its LR, then a quarter; the table says so. Finished runs are reused.

    python bench/pipeline_variance.py                 # 6 runs, ~15 min on 2 cores
    python bench/pipeline_variance.py --quick         # 3 iterations per run (a smoke run, not a result)
    python bench/pipeline_variance.py --report-only   # the report from OUTPUT's runs

Writes ``OUTPUT/pipeline_variance.md`` (the table), ``OUTPUT/pipeline_variance.png`` (grad_var per part against
epochs, and Phi_backbone / Phi_part: AGVM's raw multiplier) and ``OUTPUT/pipeline_variance.json``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from typing import Dict, List

from harness import REPO, markdown_table, train_net, write_json

from largebatch.analysis.metrics import part_order, read_json, read_metrics_rows
from largebatch.analysis.plots import plot_grad_variance
from largebatch.analysis.study import grad_var_records, noise_records
from largebatch.files import atomic_write

#: pipeline -> (config, SGD's LR at batch 16 (detectron2's model zoo: RetinaNet 0.01, the others 0.02), the
#: metric of its evaluation in metrics.json)
PIPELINES = {
    "retinanet": ("configs/shapes/retinanet.yaml", 0.01, "bbox/AP50"),
    "semantic_fpn": ("configs/shapes/semantic_fpn.yaml", 0.02, "sem_seg/mIoU"),
    "panoptic_fpn": ("configs/shapes/panoptic_fpn.yaml", 0.02, "panoptic_seg/PQ"),
}
TRAIN_IMAGES = 1024  # shapes_train
RECORDS = 30  # gradient-variance measurements per run


def run_overrides(pipeline: str, batch: int, args, backoff: float = 1.0) -> List[str]:
    """The pipeline's config made a Fig. 1 run: SGD at MegDet's linear rule from its batch-16 LR (times ``backoff``
    after a divergence), AGVM off (the monitor still measures every part), ``args.epochs`` epochs (1 of warm-up),
    RECORDS measurements."""
    lr16 = PIPELINES[pipeline][1] * backoff
    steps = args.max_iter or args.epochs * TRAIN_IMAGES // batch
    opts = ["SOLVER.OPTIMIZER", "SGD", "SOLVER.AGVM.ENABLED", "False", "SOLVER.IMS_PER_BATCH", str(batch),
            "SOLVER.BASE_LR", str(lr16), "SOLVER.LR_SCALING.RULE", "linear", "SOLVER.LR_SCALING.REFERENCE_BATCH", "16",
            "MONITOR.PERIOD", str(max(1, round(steps / RECORDS))), "SOLVER.CHECKPOINT_PERIOD", "1000"]
    if args.max_iter:
        return opts + ["SOLVER.SCHEDULE_UNIT", "iter", "SOLVER.MAX_ITER", str(args.max_iter),
                       "SOLVER.WARMUP_ITERS", "1"]
    return opts + ["SOLVER.MAX_ITER", str(args.epochs)]  # the configs count epochs


def b_simple(records: List[tuple], part: str, start: int):
    """McCandlish's B_simple of ``part``: the mean of tr(Sigma) over the mean of |G|^2 (each measurement's unbiased
    terms, from iteration ``start`` on), or None where |G|^2's mean is not positive."""
    terms = [noise[part] for it, noise in records if it >= start and part in noise]
    if not terms:
        return None
    grad_sq = sum(g for g, _ in terms) / len(terms)
    trace = sum(t for _, t in terms) / len(terms)
    return trace / grad_sq if grad_sq > 0 else None


def run_pipeline(pipeline: str, batch: int, run_dir: str, args) -> dict:
    """One run, reused when ``run_dir`` holds a finished one; a run the explosion guard stops is run again at half
    its LR, then a quarter (as bench/critical_batch.py backs off): the state of each try in ``run_dir/result.json``."""
    done = os.path.join(run_dir, "result.json")
    result = read_json(done)
    if result and result.get("returncode") == 0:
        print(f"[pipeline_variance] {pipeline} at batch {batch}: finished run reused", flush=True)
        return result
    diverged = []
    for backoff in (1.0, 0.5, 0.25):
        print(f"[pipeline_variance] {pipeline} at batch {batch}, LR x{backoff:g} -> {run_dir}", flush=True)
        rc, log = train_net(run_dir, os.path.join(REPO, PIPELINES[pipeline][0]),
                            run_overrides(pipeline, batch, args, backoff), args.num_workers, args.python)
        stop = next((line.split("Training diverged at ", 1)[1].split(":")[0] for line in log.splitlines()
                     if "Training diverged at " in line), None)
        if rc == 0 or stop is None:
            break
        diverged.append(f"LR x{backoff:g} diverged at {stop}")
        print(f"[pipeline_variance] {pipeline} at batch {batch}: {diverged[-1]}", flush=True)
    result = {"returncode": rc, "backoff": backoff, "diverged": diverged}
    write_json(done, result)
    return result


def summarize(pipeline: str, batch: int, run_dir: str) -> dict:
    """What the report shows of one run: its records, mean Phi per part and B_simple per part after the first
    epoch (the warm-up), and its metric at the end."""
    rows = read_metrics_rows(os.path.join(run_dir, "metrics.json"))
    metric = PIPELINES[pipeline][2]
    ipe = TRAIN_IMAGES / batch
    variance, noise = grad_var_records(run_dir), noise_records(run_dir)
    start = int(ipe) if len(variance) > 2 and variance[-1][0] >= ipe else 0
    kept = [phi for it, phi in variance if it >= start]
    parts = part_order({p for phi in kept for p in phi})
    mean = {p: sum(phi[p] for phi in kept if p in phi) / max(1, sum(p in phi for phi in kept)) for p in parts}
    result = read_json(os.path.join(run_dir, "result.json")) or {}
    backoff = result.get("backoff", 1.0)
    return {
        "arm": f"{pipeline}, SGD" + (f" LR x{backoff:g}" if backoff != 1 else ""), "pipeline": pipeline,
        "total_batch": batch, "iters_per_epoch": ipe, "lr": PIPELINES[pipeline][1] * backoff * batch / 16,
        "lr_note": "; ".join(result.get("diverged", [])),
        "grad_var": variance, "parts": parts, "mean_phi": mean,
        "b_simple": {p: b_simple(noise, p, start) for p in [*parts, "all"]},
        "metric": next((r[metric] for r in reversed(rows) if metric in r), None),
        "steps": max((r["iteration"] for r in rows if "total_loss" in r), default=-1) + 1,
    }


def _fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def report(runs: List[dict], command: str, args) -> str:
    header = ["pipeline", "batch", "LR", "steps", "metric at the end", "mean Phi per part (after epoch 1)",
              "Phi_backbone / Phi_part", "B_simple per part (images)", "B_simple, whole model"]
    rows = []
    for run in runs:
        parts, phi = run["parts"], run["mean_phi"]
        ratio = ", ".join(f"{p} {phi['backbone'] / phi[p]:.2f}" for p in parts
                          if p != "backbone" and phi.get(p) and "backbone" in phi)
        lr = f"{run['lr']:g}" + (f" ({run['lr_note']})" if run["lr_note"] else "")
        rows.append([run["pipeline"], run["total_batch"], lr, run["steps"],
                     f"{PIPELINES[run['pipeline']][2]} {_fmt(run['metric'], 4)}",
                     ", ".join(f"{p} {phi[p]:.3f}" for p in parts), ratio or "-",
                     ", ".join(f"{p} {_fmt(run['b_simple'][p])}" for p in parts), _fmt(run["b_simple"]["all"])])
    when = datetime.datetime.now().isoformat(timespec="seconds")
    length = (f"{args.max_iter} iterations per run (--quick / --max-iter: a smoke run, not a result)" if args.max_iter
              else f"{args.epochs} epochs of the {TRAIN_IMAGES} training images per run (1 of warm-up)")
    return "\n".join([
        "# Gradient variance per part, every pipeline (AGVM Fig. 1)", "",
        f"`{command}`", "",
        f"Measured {when} on {os.cpu_count()} CPU cores ({platform.machine()}), {args.num_workers} CPU workers over "
        f"gloo; {length}; SGD, MegDet's linear rule from the pipeline's batch-16 LR (RetinaNet 0.01, the others "
        "0.02), SyncBN over the workers, AGVM off (the monitor measures). Phi = 1 - cos(G1, G2) of the two workers' "
        "gradients (AGVM eq. 3; 1 = uncorrelated, below 1 = the halves agree); Phi_backbone / Phi_part is the "
        "multiplier AGVM would give the part (before its sqrt, momentum and clamp: eq. 4-5); B_simple = tr(Sigma) / "
        "|G|^2 of the means of McCandlish's per-measurement unbiased terms (with SyncBN tr(Sigma) is biased "
        "upwards: bench/results/syncbn_phi.md). One seed per run.", "",
        markdown_table(header, rows, right=[1, 3]), "",
        "![grad_var per part against epochs, and Phi_backbone / Phi_part](pipeline_variance.png)", ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=None, help="default output/pipeline_variance (--quick: ..._quick)")
    p.add_argument("--batches", default="8,64", help="total batches, comma-separated (default 8,64)")
    p.add_argument("--pipelines", default=",".join(PIPELINES), help=f"default: {','.join(PIPELINES)}")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run (default 4)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="3 iterations per run")
    p.add_argument("--max-iter", type=int, default=0, help="debug: this many iterations per run instead of --epochs")
    p.add_argument("--report-only", action="store_true", help="run nothing: the report from what OUTPUT holds")
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batches takes integers, comma-separated: got {args.batches!r}")
    pipelines = [x.strip() for x in args.pipelines.split(",") if x.strip()]
    unknown = [x for x in pipelines if x not in PIPELINES]
    if unknown or not pipelines:
        p.error(f"--pipelines: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(PIPELINES)}")
    if not batches or any(b < args.num_workers or b % args.num_workers for b in batches) or args.epochs < 2:
        p.error(f"--batches must be multiples of --num-workers {args.num_workers} (got {batches}); --epochs >= 2")
    if args.quick:
        args.max_iter = args.max_iter or 3
    output = os.path.abspath(args.output or os.path.join("output", "pipeline_variance" + ("_quick" if args.quick
                                                                                           else "")))
    command = "python bench/pipeline_variance.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    runs: List[dict] = []
    failed: Dict[str, int] = {}
    for pipeline in pipelines:
        for batch in batches:
            run_dir = os.path.join(output, f"{pipeline}_b{batch}")
            if not args.report_only:
                result = run_pipeline(pipeline, batch, run_dir, args)
                if result["returncode"] != 0:
                    failed[f"{pipeline}_b{batch}"] = result["returncode"]
                    print(f"[pipeline_variance] {pipeline} at batch {batch}: exit {result['returncode']}, see "
                          f"{run_dir}/train.log", flush=True)
            if os.path.isfile(os.path.join(run_dir, "metrics.json")):
                runs.append(summarize(pipeline, batch, run_dir))
    text = report(runs, command, args)
    atomic_write(os.path.join(output, "pipeline_variance.md"), lambda f: f.write(text))
    write_json(os.path.join(output, "pipeline_variance.json"), {"command": command, "runs": runs, "failed": failed})
    if runs:
        plot_grad_variance(runs, os.path.join(output, "pipeline_variance.png"))
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
