#!/usr/bin/env python
"""The large-batch study where its claim can hold: every recipe of the study at a batch chosen from the shapes
detector's measured critical batch and at 4x that, each at the same LR multipliers of its own rule, against the
small-batch SGD baseline with the same multipliers, all for the same epochs.

McCandlish et al. (2018): far above the critical batch B_crit, no optimizer reaches the small batch's loss in the
same number of epochs (the steps no longer shrink with the batch). bench/critical_batch.py measured B_crit of the
shapes detector at 48.6 images (bench/results/critical_batch.md: configs/shapes/sgd.yaml, from scratch, its own
target loss). This study's detector (pre-trained backbone, SyncBN, a 3-epoch run) logs a smaller online noise scale
in its baseline runs (about 10-25 images at the end), so the defaults are batch 16 (at that B_noise), 48 (at the
measured B_crit) and 192 (4x above it); the report puts the baseline's B_noise beside them.

Recipes (configs/shapes/study/, their comments give each paper's rule): sgd_b64_linear (MegDet), agvm_sgd_b64,
lars_b64 (CoolDet), lamb_b64, pmdlamb_b64 (LargeDet), agvm_adamw_b64; the baseline is sgd_b4 (batch 4). A run
moves a recipe to the sweep's batch with its own scaling rule, multiplies its BASE_LR by each multiplier, and keeps
what the recipe ties to the run (largebatch.analysis.study.sweep_overrides): PMD-LAMB's T at 10% of the run,
MegDet's warm-up from the batch-16 LR, ~20 monitor records per run. Every run evaluates once, at the end.

    python bench/study_sweep.py                              # the defaults (~75 min on 2 cores)
    python bench/study_sweep.py --batches 48 --lr-multipliers 1
    python bench/study_sweep.py --quick                      # 3 iterations per run on 256 images
    python bench/study_sweep.py --report-only

Runs go to ``OUTPUT/<recipe>_b<batch>_x<multiplier>/`` (as bench/large_batch_study.py's arms: train.log,
metrics.json, result.json; a finished run with the same settings is reused unless ``--force``); the report to
``OUTPUT/sweep.md``, ``OUTPUT/sweep.png`` and ``OUTPUT/sweep.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import sys
from typing import List

import large_batch_study as lbs
from harness import REPO

from largebatch.analysis.metrics import read_json
from largebatch.analysis.plots import plot_sweep
from largebatch.analysis.study import (
    arm_overrides,
    best_run,
    fmt_duration,
    fmt_number,
    is_done,
    last_value,
    resolve_arm,
    summarize_arm,
    sweep_overrides,
    sweep_run_name,
    sweep_table,
    table,
)
from largebatch.files import atomic_write

BASELINE = "sgd_b4"
RECIPES = ("sgd_b64_linear", "agvm_sgd_b64", "lars_b64", "lamb_b64", "pmdlamb_b64", "agvm_adamw_b64")
MEASURED_B_CRIT = 48.6  # bench/results/critical_batch.md
KEEP_WITHIN = 1.0  # AP points: "keeps the baseline's accuracy"


def plan(args, opts: List[str]) -> List[dict]:
    """Every run of the sweep: name, recipe, config, total batch, LR multiplier and its overrides; the baseline's
    first, then batch by batch with x1 first (an interrupted sweep has the paper's rule for every recipe)."""
    from largebatch.config import load_config

    order = sorted(args.multipliers, key=lambda m: (m != 1.0, m))
    runs = []
    for recipe, batches in [(BASELINE, None)] + [(r, args.batches) for r in args.recipes]:
        config = lbs.config_file(recipe)
        cfg = load_config(os.path.join(REPO, config), opts, args.num_workers)
        for batch in batches or [cfg.SOLVER.IMS_PER_BATCH * cfg.SOLVER.ACCUMULATE_STEPS]:
            steps = args.max_iter or max(1, round(args.epochs * args.num_train / batch))
            for m in order:
                runs.append({"name": sweep_run_name(recipe, batch, m), "recipe": recipe, "config": config,
                             "batch": batch, "multiplier": m, "opts": opts + sweep_overrides(cfg, batch, m, steps)})
    baseline = [r for r in runs if r["recipe"] == BASELINE]
    rest = sorted((r for r in runs if r["recipe"] != BASELINE),
                  key=lambda r: (args.batches.index(r["batch"]), order.index(r["multiplier"])))
    return baseline + rest


def summarize(run: dict, info: dict, arm_dir: str) -> dict:
    row = summarize_arm(arm_dir, info)
    return dict(row, recipe=run["recipe"], multiplier=run["multiplier"],
                noise_scale=last_value(arm_dir, "noise_scale/all"))


def report(baseline: List[dict], rows: List[dict], args, command: str, inputs: dict) -> str:
    info = inputs["info"]
    import torch

    everything = baseline + rows
    starts = [r["started"] for r in everything if r.get("started")]
    ends = [r["ended"] for r in everything if r.get("ended")]
    when = f"{min(starts)} to {max(ends)}" if starts and ends else datetime.datetime.now().isoformat(timespec="seconds")
    wall = sum(r["wall_s"] or 0 for r in everything)
    cpu = sum(r["cpu_s"] or 0 for r in everything)
    length = (f"{args.max_iter} iterations per run (--quick / --max-iter: a smoke run, not a result)" if args.max_iter
              else f"{args.epochs} epochs of the {info['num_train']} training images per run")
    best = best_run(baseline)
    noise = [r["noise_scale"] for r in baseline if r.get("noise_scale") is not None]
    mults = " / ".join(f"x{m:g}" for m in args.multipliers)
    text = [
        "# The large-batch study at the critical batch: every recipe, the same LR sweep",
        "",
        f"`{command}`",
        "",
        f"Measured {when} on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}, {args.num_workers} CPU worker(s) over gloo; {length}, COCO bbox AP on the "
        f"{info['num_val']} validation images at the end. " + lbs._pretrain_line(info.get("pretrain")),
        "",
        f"Batches: {', '.join(str(b) for b in args.batches)}, chosen from the shapes detector's measured critical "
        f"batch B_crit = {MEASURED_B_CRIT} images (bench/results/critical_batch.md: steps to a target loss against "
        "the batch, McCandlish's fit, configs/shapes/sgd.yaml from scratch) and from this study detector's own online "
        "noise scale B_noise (whole model, bias-corrected EMA, at the end) in this sweep's baseline runs: "
        + (", ".join(fmt_number(n, ".1f") for n in noise) + " images" if noise else "not logged") + ".",
        "",
        f"Every run, the baseline too: the recipe's BASE_LR {mults} (its own scaling rule on top; the table's "
        f"columns). The baseline ({BASELINE}, batch {baseline[0]['total_batch'] if baseline else 4}): "
        + ", ".join(f"x{r['multiplier']:g} {fmt_number(r['ap'])}" for r in baseline) + " AP"
        + (f"; its best, x{best['multiplier']:g} = {fmt_number(best['ap'])} AP, is what every recipe's best is "
           "compared with." if best else "."),
        "",
        sweep_table(rows, best, args.batches, args.multipliers, KEEP_WITHIN),
        "",
        f"keeps: the recipe's best AP at that batch is at most {KEEP_WITHIN:g} AP below the baseline's best (one seed "
        "per run: a difference of about a point is within what a seed changes). Bold: the best multiplier of that "
        "batch. (diverged): the run stopped on the explosion guard or a non-finite loss, counted as AP 0.",
        "",
        "![AP against the LR multiplier at each batch](sweep.png)",
        "",
        "## Every run",
        "",
        table(baseline + rows).replace("| arm |", "| run |", 1),
        "",
        "| run | online B_noise at the end (images) |",
        "|---|---:|",
        *[f"| {r['arm']} | {fmt_number(r.get('noise_scale'), '.1f')} |" for r in everything],
        "",
        f"All runs: wall time {fmt_duration(wall)}, CPU time {fmt_duration(cpu)} (min:s). The columns as in "
        "study.md (bench/large_batch_study.py).",
        "",
    ]
    return "\n".join(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any KEY VALUE pairs after the options are passed to every run's train_net.py.")
    p.add_argument("--output", default=None, help="directory (default output/study_sweep, --quick: ..._quick)")
    p.add_argument("--batches", default="16,48,192", help="total batches of the recipes (default 16,48,192)")
    p.add_argument("--lr-multipliers", default="0.5,1,2", help="of every run's BASE_LR (default 0.5,1,2)")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated (default: all: {', '.join(RECIPES)})")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (default 3)")
    p.add_argument("--num-workers", type=int, default=2, help="CPU workers (train_net.py --num-gpus; default 2)")
    p.add_argument("--num-train", type=int, default=1536, help="training images (default 1536 = 32 x 48)")
    p.add_argument("--num-val", type=int, default=512, help="validation images (default 512)")
    p.add_argument("--data-root", default=os.path.join(REPO, "datasets", "study"),
                   help="where the split and the pre-trained backbone are cached (default datasets/study, shared "
                        "with bench/large_batch_study.py)")
    p.add_argument("--pretrain-images", type=int, default=8192, help="images of the pre-training task")
    p.add_argument("--pretrain-epochs", type=int, default=3, help="epochs of the pre-training task")
    p.add_argument("--from-scratch", action="store_true", help="no pre-trained backbone")
    p.add_argument("--quick", action="store_true", help="smoke run: 256 / 64 images, 3 iterations per run")
    p.add_argument("--max-iter", type=int, default=0, help="debug: this many iterations per run instead of --epochs")
    p.add_argument("--force", action="store_true", help="run again even when a run's output is finished")
    p.add_argument("--report-only", action="store_true", help="run nothing: the report from what OUTPUT holds")
    p.add_argument("--python", default=sys.executable, help="interpreter for train_net.py (default: this one)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    args = p.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
        args.multipliers = [float(m) for m in args.lr_multipliers.split(",") if m.strip()]
    except ValueError:
        p.error(f"--batches takes integers, --lr-multipliers numbers, comma-separated: got --batches "
                f"{args.batches!r} --lr-multipliers {args.lr_multipliers!r}")
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown or not args.recipes:
        p.error(f"--recipes: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(RECIPES)}")
    bad = [b for b in args.batches if b < args.num_workers or b % args.num_workers]
    if bad or not args.batches or not args.multipliers or min(args.multipliers) <= 0:
        p.error(f"--batches must be multiples of --num-workers {args.num_workers} (got {args.batches}), "
                f"--lr-multipliers positive (got {args.multipliers})")
    if args.quick:
        args.num_train, args.num_val = lbs.QUICK["num_train"], lbs.QUICK["num_val"]
        args.pretrain_images, args.pretrain_epochs = lbs.QUICK["pretrain_images"], lbs.QUICK["pretrain_epochs"]
        args.max_iter = args.max_iter or lbs.QUICK["max_iter"]
    args.output = args.output or os.path.join("output", "study_sweep_quick" if args.quick else "study_sweep")
    if min(args.epochs, args.num_workers, args.num_train, args.num_val) < 1 or args.max_iter < 0:
        p.error("--epochs, --num-workers, --num-train and --num-val must be >= 1, --max-iter >= 0")
    if len(args.opts) % 2:
        p.error(f"overrides must be KEY VALUE pairs: {' '.join(args.opts)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = "python bench/study_sweep.py " + " ".join(shlex.quote(a) for a in given)
    output = os.path.abspath(args.output)
    os.makedirs(output, exist_ok=True)
    logging.disable(logging.WARNING)
    sweep_json = os.path.join(output, "sweep.json")
    if args.report_only:
        saved = read_json(sweep_json) or {}
        command = saved.get("command", command.replace(" --report-only", ""))
        inputs = saved.get("inputs") or lbs.prepare_inputs(args)
    else:
        inputs = lbs.prepare_inputs(args)
        atomic_write(sweep_json, lambda f: json.dump({"command": command, "inputs": inputs}, f, indent=1))
    # every run evaluates once, at the end
    opts = arm_overrides(args.epochs, 0, args.max_iter, inputs["opts"] + list(args.opts))
    baseline, rows, failed = [], [], False
    for run in plan(args, opts):
        info = resolve_arm(run["name"], os.path.join(REPO, run["config"]), run["opts"], args.num_workers)
        arm_dir = os.path.join(output, run["name"])
        if not args.report_only:
            if not args.force and is_done(arm_dir, info, run["opts"], args.num_workers):
                print(f"[sweep] {run['name']}: finished run found, reused (--force to run it again)", flush=True)
            else:
                print(f"[sweep] {run['name']}: {info['optimizer']}, batch {info['total_batch']}, LR {info['lr']:g}, "
                      f"{info['max_iter']} iterations -> {arm_dir}", flush=True)
                res = lbs.run_arm(run["name"], arm_dir, run["opts"], args.num_workers, args.python, run["config"])
                state = ("diverged" if res["diverged"] else
                         "ok" if res["returncode"] == 0 else f"exit {res['returncode']}")
                print(f"[sweep] {run['name']}: {state} in {fmt_duration(res['wall_s'])} (load {res['load_avg']})",
                      flush=True)
        row = summarize(run, info, arm_dir)
        failed = failed or row["failed"] or (row["returncode"] is None and not args.report_only)
        (baseline if run["recipe"] == BASELINE else rows).append(row)
        # after every run: a long sweep shows its progress, a kill leaves the table of what ran
        atomic_write(os.path.join(output, "sweep.md"), lambda f: f.write(report(baseline, rows, args, command, inputs)))
        plot_sweep(rows, baseline, args.batches, os.path.join(output, "sweep.png"))
    print(sweep_table(rows, best_run(baseline), args.batches, args.multipliers, KEEP_WITHIN))
    print(f"\n[sweep] wrote {os.path.join(output, 'sweep.md')} and sweep.png")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
