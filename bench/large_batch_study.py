#!/usr/bin/env python
"""The large-batch study: on a larger split of the shapes dataset, for the same number of epochs, a small batch (4)
with SGD against a batch 16x larger (64) with each paper's recipe, on 2 CPU workers, every arm from the same
backbone pre-trained here; plus the gradient-variance runs behind AGVM's Fig. 1 (batch 4, 64 and 256).

Arms (one YAML each in configs/shapes/study/, whose comments say which paper's rule set each hyper-parameter):

    sgd_b4          SGD, batch 4, LR 0.02 x 4/16 = 0.005 (the small-batch baseline)
    sgd_b64_linear  MegDet: SGD + linear scaling (0.08) + warm-up from the batch-16 LR + SyncBN
    agvm_sgd_b64    AGVM: SGD + AGVM (tau 10, alpha 0.97, backbone anchor), linear-then-sqrt scaling (0.08)
    lars_b64        CoolDet: LARS (trust coefficient 1, LR 0.0008, no scaling) + warm-up + cosine + SyncBN
    lamb_b64        LAMB (You et al.) with the per-layer step of LargeDet's PMD-LAMB (LR 0.08 x 0.012)
    pmdlamb_b64     LargeDet: PMD-LAMB (alpha 0.012, T 25 = 10% of the run, wd 5e-4, LR 0.08 by LSR)
    agvm_adamw_b64  AGVM Tab. 3: AdamW (wd 0.05, LR 1e-4 x 64/16) + AGVM

and the gradient-variance runs (monitor only, no AGVM; not arms of the table):

    sgd_b256_linear MegDet's recipe at batch 256 = 64x (62 steps): AGVM Fig. 1 at 64x, MegDet's limit
    sgd_b256_sqrt   batch 256 with AGVM's LR rule (0.226) and warm-up, no AGVM
    lars_b256       CoolDet's recipe at batch 256 (LR 0.0008, no scaling): AGVM Fig. 1 at 64x over a whole run
    sgd_b64_linear_bn  sgd_b64_linear with per-worker BN instead of SyncBN (only with --arms: the SyncBN question
                    is measured at equal weights and images by bench/syncbn_phi.py)

Before the arms, the script writes the data (``--num-train`` / ``--num-val`` images of the embedded dataset's own
generator, in ``--data-root``) and the pre-trained backbone (largebatch.modeling.pretrain, cached in
``--data-root``), and passes both to every arm (``--from-scratch``: no pre-trained backbone). Each arm runs as
``python train_net.py --num-gpus W --dist-url auto --config-file ...`` in a subprocess, one after the other, into
``OUTPUT/<arm>/`` (its stdout+stderr in ``train.log``, what the study measured in ``result.json``). The study reads
each arm's ``metrics.json`` and ``layer_stats.jsonl``, calls an arm that stopped with "Training diverged" /
FloatingPointError diverged (AP 0), and writes ``OUTPUT/study.md`` (markdown tables), ``OUTPUT/study.png`` (AP50
and loss against epochs) and ``OUTPUT/grad_var.png`` (grad_var per part against epochs at each batch).

    python bench/large_batch_study.py                      # the default runs, 5 epochs, 2 workers
    python bench/large_batch_study.py --quick              # every run for 3 iterations on 256 images (~4 min)
    python bench/large_batch_study.py --arms sgd_b4,lars_b64
    python bench/large_batch_study.py --report-only        # rebuild tables + plots from OUTPUT

Resumable: an arm whose output already holds a finished run with the same settings (``result.json`` plus the
final metrics entry, or a divergence) is reused, unless ``--force``. Any other arm directory is deleted and run
again (detectron2 appends to an existing metrics.json).

This script runs the arms and writes the report; what an arm resolves to, how its directory is read and the
table are ``largebatch.analysis.study``, the figures ``largebatch.analysis.plots``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import List

from harness import REPO

from largebatch.analysis.metrics import read_json, read_text
from largebatch.analysis.plots import plot_grad_variance, plot_study
from largebatch.analysis.study import (
    DIVERGED,
    arm_overrides,
    fmt_duration,
    fmt_number,
    grad_var_records,
    is_done,
    phi_summary,
    resolve_arm,
    summarize_arm,
    table,
)
from largebatch.files import atomic_write

CONFIG_DIR = os.path.join("configs", "shapes", "study")
# the baseline first (every comparison needs it), then the batch-64 arms, the 64x run last
ARMS = ("sgd_b4", "sgd_b64_linear", "agvm_sgd_b64", "pmdlamb_b64", "lars_b64", "lamb_b64", "agvm_adamw_b64")
# monitor-only runs for the figure / the SyncBN question; the per-worker-BN run on request (bench/syncbn_phi.py
# measures that question at equal weights)
GRAD_VAR_RUNS = ("sgd_b256_linear", "sgd_b256_sqrt", "lars_b256", "sgd_b64_linear_bn")
DEFAULT_RUNS = ARMS + ("sgd_b256_linear", "sgd_b256_sqrt", "lars_b256")
# AGVM Fig. 1: 1x, 16x, 64x with SGD (64x stops at iteration 9), and LARS at 16x and 64x (a whole run)
FIGURE_BATCHES = ("sgd_b4", "sgd_b64_linear", "sgd_b256_linear", "lars_b64", "lars_b256")
DATA_NAMES = ("shapes_study_train", "shapes_study_val")
QUICK = {"num_train": 256, "num_val": 64, "pretrain_images": 512, "pretrain_epochs": 1, "max_iter": 3}


def config_file(arm: str) -> str:
    """The arm's config, relative to the repository (train_net.py runs there)."""
    return os.path.join(CONFIG_DIR, arm + ".yaml")


# -------------------------------------------------------------------------------------------------------------
# what every arm shares: the data and the pre-trained backbone
# -------------------------------------------------------------------------------------------------------------
def prepare_inputs(args) -> dict:
    """Write (or find cached) the study's shapes split and the pre-trained backbone; return the KEY VALUE
    overrides that point every arm at them, and what they are (for the report)."""
    from largebatch.config import load_config
    from largebatch.data.shapes import prepare_shapes
    from largebatch.modeling.pretrain import ensure_pretrained_backbone, pretrain_settings

    root = os.path.abspath(args.data_root)
    paths = prepare_shapes(os.path.join(root, f"shapes_{args.num_train}_{args.num_val}"),
                           num_train=args.num_train, num_val=args.num_val)
    spec = [[name, p["json_file"], p["image_root"]] for name, p in zip(DATA_NAMES, paths.values())]
    opts = ["DATASETS.COCO_JSON", json.dumps(spec), "DATASETS.TRAIN", f"('{DATA_NAMES[0]}',)",
            "DATASETS.TEST", f"('{DATA_NAMES[1]}',)"]
    info = {"num_train": args.num_train, "num_val": args.num_val, "data": spec, "pretrain": None}
    if not args.from_scratch:
        # every arm's backbone (widths, input size) is the base config's: one pre-trained file for all
        cfg = load_config(os.path.join(REPO, CONFIG_DIR, "Base-Study.yaml"), args.opts, 1)
        settings = pretrain_settings(cfg, num_images=args.pretrain_images, epochs=args.pretrain_epochs)
        weights = os.path.join(root, "pretrained", f"shapes_backbone_{args.pretrain_images}x{args.pretrain_epochs}.pth")
        t0 = time.perf_counter()
        print(f"[study] pre-trained backbone: {weights} (trained now if not cached)", flush=True)
        pretrain = ensure_pretrained_backbone(cfg, weights, settings)
        pretrain = dict(pretrain, file=weights, study_wall_s=round(time.perf_counter() - t0, 1))
        info["pretrain"] = pretrain
        opts += ["MODEL.WEIGHTS", weights]
    return {"opts": opts, "info": info}


# -------------------------------------------------------------------------------------------------------------
# running an arm
# -------------------------------------------------------------------------------------------------------------
def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_arm(arm: str, arm_dir: str, opts: List[str], num_workers: int, python: str, config: str = "") -> dict:
    """Train (and evaluate) one arm (its config: ``config``, else the arm's own) in a subprocess; record wall
    time, CPU time of all its processes, the mean 1-minute load average of the machine meanwhile, the exit status
    and whether it diverged."""
    if os.path.isdir(arm_dir):
        shutil.rmtree(arm_dir)  # a stale metrics.json would be appended to
    os.makedirs(arm_dir)
    cmd = [python, "train_net.py", "--num-gpus", str(num_workers), "--dist-url", "auto",
           "--config-file", config or config_file(arm), "OUTPUT_DIR", arm_dir, *opts]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # the launcher sets torch's threads per worker; keep OpenMP in line
    loads: List[float] = []
    stop = threading.Event()

    def sample_load():
        while not stop.wait(5.0):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample_load, daemon=True)
    cpu0, t0 = _children_cpu_s(), time.perf_counter()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    with open(os.path.join(arm_dir, "train.log"), "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sampler.start()
        try:
            returncode = proc.wait()
        except BaseException:  # Ctrl-C / kill of the study: stop the arm's whole process group (its workers)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise
        finally:
            stop.set()
    wall = time.perf_counter() - t0
    cpu = _children_cpu_s() - cpu0
    log_text = read_text(os.path.join(arm_dir, "train.log"))
    result = {
        "arm": arm,
        "command": cmd,
        "overrides": opts,
        "num_workers": num_workers,
        "returncode": returncode,
        "diverged": returncode != 0 and bool(DIVERGED.search(log_text)),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "load_avg": round(sum(loads) / len(loads), 2) if loads else round(os.getloadavg()[0], 2),
        "started": started,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    atomic_write(os.path.join(arm_dir, "result.json"), lambda f: json.dump(result, f, indent=1))
    return result


# -------------------------------------------------------------------------------------------------------------
# the report
# -------------------------------------------------------------------------------------------------------------
def _pretrain_line(pretrain) -> str:
    if not pretrain:
        return "Weights: from scratch (--from-scratch), the same initialization (SEED) for every run."
    s, held = pretrain["settings"], pretrain["held_out"]
    return (f"Weights: every run starts from the same backbone, pre-trained here ({pretrain['task']}; "
            f"{s['num_images']} images x {s['epochs']} epochs, batch {s['batch']}, {pretrain['steps']} steps, "
            f"{fmt_duration(pretrain['wall_s'])} min:s when it was made): on held-out images, mean IoU of the 3 shape "
            f"classes {100 * held['shape_miou']:.1f}%, pixel accuracy {100 * held['pixel_accuracy']:.1f}% "
            f"({100 * held['background_fraction']:.1f}% of the pixels are background). FPN and heads start from "
            "their initialization.")


def report(rows: List[dict], extra: List[dict], args, command: str, inputs: dict, phi: List[dict]) -> str:
    info = inputs["info"]
    if args.max_iter:
        length = (f"{args.max_iter} iterations per run (--quick / --max-iter: a smoke run, not a result), COCO bbox "
                  f"AP on the {info['num_val']} val images at the end")
    else:
        length = (f"{args.epochs} epochs of the {info['num_train']} training images per run, COCO bbox AP on the "
                  f"{info['num_val']} val images every {args.eval_period} epoch(s) and at the end")
    import torch

    everything = rows + extra
    starts = [r["started"] for r in everything if r.get("started")]
    ends = [r["ended"] for r in everything if r.get("ended")]
    when = f"{min(starts)} to {max(ends)}" if starts and ends else datetime.datetime.now().isoformat(timespec="seconds")
    wall = sum(r["wall_s"] or 0 for r in everything)
    cpu = sum(r["cpu_s"] or 0 for r in everything)
    pre = (info.get("pretrain") or {}).get("study_wall_s") or 0
    text = [
        "# Large-batch study on the shapes dataset",
        "",
        f"`{command}`",
        "",
        f"Measured {when} on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, {args.num_workers} CPU "
        f"worker(s) over gloo; {length}. Data: {info['num_train']} training / {info['num_val']} validation images "
        "of the embedded dataset's generator (the same seed: its first 1024 / 128 images are the embedded ones). "
        + _pretrain_line(info.get("pretrain")),
        "",
        "## Arms (same epochs; batch 4 against 16x = 64)",
        "",
        table(rows),
        "",
        "## Gradient-variance runs (monitor only, no AGVM; not arms)",
        "",
        table(extra) if extra else "(none run)",
        "",
        f"All runs: wall time {fmt_duration(wall)}, CPU time {fmt_duration(cpu)} (min:s); pre-training in this "
        f"invocation {fmt_duration(pre)} (0:00 when cached).",
        "",
        "AP / AP50: detectron2's COCOEvaluator (percent) at the last evaluation (0 for a diverged arm). Final loss: "
        "total_loss of the last metrics.json record (detectron2's median over the last 20 iterations; for a "
        "diverged arm the last one recorded before it stopped). Guard max: the explosion guard's highest ratio "
        "over the steps the run took (the larger of total loss and gradient norm over its median of the last 20 "
        "iterations; the guard stops at MONITOR.EXPLOSION_FACTOR, 10; '-' where the run's code did not log it). "
        "Diverged: the run stopped on a non-finite loss / "
        "gradient or on the explosion guard (largebatch's guards, which name the iteration) or on detectron2's own "
        "NaN check. Wall time: the whole train_net.py process (start-up, training, evaluations). CPU time: user + "
        "system time of all its processes. Load: mean 1-minute load average during the run "
        f"({os.cpu_count()} cores: above {os.cpu_count()} means other processes competed for the CPU and the wall "
        "time is inflated). Iterations: optimizer steps.",
        "",
        "![AP50 and loss against epochs](study.png)",
        "",
        "![grad_var per part against epochs, batch 4 / 64 / 256](grad_var.png)",
        "",
    ]
    if phi:
        text += ["## grad_var per part, mean over each run's records after the warm-up", "", phi_table(phi), ""]
    return "\n".join(text)


def phi_table(phi: List[dict]) -> str:
    parts = [p for p in ("backbone", "fpn", "rpn", "box_head") if any(p in r["mean"] for r in phi)]
    lines = ["| run | total batch | BN | records | " + " | ".join(f"Phi {p}" for p in parts) + " | records with "
             "Phi backbone > 1 |", "|---|---:|---|---:|" + "---:|" * (len(parts) + 1)]
    for r in phi:
        lines.append(f"| {r['arm']} | {r['total_batch']} | {r['bn']} | {r['records']} | "
                     + " | ".join(fmt_number(r["mean"].get(p), ".3f") for p in parts)
                     + f" | {r['backbone_above_1']} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    known = ARMS + GRAD_VAR_RUNS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any KEY VALUE pairs after the options are passed to every arm's train_net.py.")
    p.add_argument("--output", default=None, help="study directory (default output/study, --quick: output/study_quick)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per arm (SOLVER.MAX_ITER; default 5)")
    p.add_argument("--eval-period", type=int, default=1, help="evaluate every this many epochs (and at the end)")
    p.add_argument("--arms", default=",".join(DEFAULT_RUNS),
                   help=f"comma-separated runs (default: {', '.join(DEFAULT_RUNS)}); known: {', '.join(known)}")
    p.add_argument("--num-workers", type=int, default=2, help="CPU workers (train_net.py --num-gpus; default 2)")
    p.add_argument("--num-train", type=int, default=3200, help="training images of the study's split (default 3200)")
    p.add_argument("--num-val", type=int, default=512, help="validation images (default 512)")
    p.add_argument("--data-root", default=os.path.join(REPO, "datasets", "study"),
                   help="where the split and the pre-trained backbone are cached (default datasets/study)")
    p.add_argument("--pretrain-images", type=int, default=8192, help="images of the pre-training task")
    p.add_argument("--pretrain-epochs", type=int, default=3, help="epochs of the pre-training task")
    p.add_argument("--from-scratch", action="store_true", help="no pre-trained backbone")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run of everything: {QUICK['num_train']} training / {QUICK['num_val']} val images, "
                        f"{QUICK['max_iter']} iterations per run, a {QUICK['pretrain_images']}-image pre-training")
    p.add_argument("--max-iter", type=int, default=0,
                   help="debug: train this many iterations per arm instead of --epochs (one evaluation at the end)")
    p.add_argument("--force", action="store_true", help="run arms again even when their output is finished")
    p.add_argument("--report-only", action="store_true", help="run nothing: table and plot from what OUTPUT holds")
    p.add_argument("--python", default=sys.executable, help="interpreter for train_net.py (default: this one)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every arm")
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in known or not os.path.isfile(os.path.join(REPO, config_file(a)))]
    if unknown or not arms:
        p.error(f"--arms: unknown arm(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
    if args.quick:
        args.num_train, args.num_val = QUICK["num_train"], QUICK["num_val"]
        args.pretrain_images, args.pretrain_epochs = QUICK["pretrain_images"], QUICK["pretrain_epochs"]
        args.max_iter = args.max_iter or QUICK["max_iter"]
    args.output = args.output or os.path.join("output", "study_quick" if args.quick else "study")
    if min(args.epochs, args.num_workers, args.num_train, args.num_val, args.pretrain_images,
           args.pretrain_epochs) < 1 or args.eval_period < 0 or args.max_iter < 0:
        p.error("--epochs, --num-workers, --num-train, --num-val, --pretrain-images and --pretrain-epochs must be "
                ">= 1, --eval-period and --max-iter >= 0")
    if len(args.opts) % 2:
        p.error(f"overrides must be KEY VALUE pairs: {' '.join(args.opts)}")
    args.arm_list = arms
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = "python bench/large_batch_study.py " + " ".join(shlex.quote(a) for a in given)
    output = os.path.abspath(args.output)
    os.makedirs(output, exist_ok=True)
    logging.disable(logging.WARNING)  # detectron2's import / dataset chatter when resolving the configs here
    study_json = os.path.join(output, "study.json")
    if args.report_only:  # the table says which command produced the runs, not this report-only one
        saved = read_json(study_json) or {}
        command = saved.get("command", command.replace(" --report-only", ""))
        inputs = saved.get("inputs") or prepare_inputs(args)
    else:
        inputs = prepare_inputs(args)
        atomic_write(study_json, lambda f: json.dump({"command": command, "inputs": inputs, "arms": args.arm_list,
                                                       "num_workers": args.num_workers}, f, indent=1))
    opts = arm_overrides(args.epochs, args.eval_period, args.max_iter, inputs["opts"] + list(args.opts))
    rows, extra, failed = [], [], False
    for arm in args.arm_list:
        info = resolve_arm(arm, os.path.join(REPO, config_file(arm)), opts, args.num_workers)
        arm_dir = os.path.join(output, arm)
        if not args.report_only:
            if not args.force and is_done(arm_dir, info, opts, args.num_workers):
                print(f"[study] {arm}: finished run found in {arm_dir}, reused (--force to run it again)", flush=True)
            else:
                print(f"[study] {arm}: {info['optimizer']}, batch {info['total_batch']}, LR {info['lr']:g}, "
                      f"{info['max_iter']} iterations -> {arm_dir} (log: train.log)", flush=True)
                res = run_arm(arm, arm_dir, opts, args.num_workers, args.python)
                state = ("diverged" if res["diverged"] else
                         "ok" if res["returncode"] == 0 else f"exit {res['returncode']}")
                print(f"[study] {arm}: {state} in {fmt_duration(res['wall_s'])} (CPU {fmt_duration(res['cpu_s'])}, "
                      f"load {res['load_avg']})", flush=True)
        row = summarize_arm(arm_dir, info)
        failed = failed or row["failed"] or (row["returncode"] is None and not args.report_only)
        (rows if arm in ARMS else extra).append(row)
        # the report after every arm: a long study shows its progress, and a kill leaves a table of what ran
        write_report(rows, extra, args, command, inputs, output)
    print(table(rows + extra))
    print(f"\n[study] wrote {os.path.join(output, 'study.md')}, study.png and grad_var.png")
    return 1 if failed else 0


def write_report(rows, extra, args, command, inputs, output) -> None:
    runs = {r["arm"]: r for r in rows + extra}
    figure = [dict(runs[a], grad_var=grad_var_records(os.path.join(output, a))) for a in FIGURE_BATCHES if a in runs]
    phi = []
    for a in FIGURE_BATCHES + ("sgd_b64_linear_bn",):
        if a in runs:
            records = grad_var_records(os.path.join(output, a))
            bn = "per-worker BN" if a.endswith("_bn") else "SyncBN"
            # after the warm-up: 1 epoch, or the 1 iteration of a --max-iter run
            phi.append(phi_summary(runs[a], records, bn, 1.0 / runs[a]["iters_per_epoch"] if args.max_iter else 1.0))
    atomic_write(os.path.join(output, "study.md"), lambda f: f.write(report(rows, extra, args, command, inputs, phi)))
    plot_study(rows + extra, os.path.join(output, "study.png"))
    plot_grad_variance(figure, os.path.join(output, "grad_var.png"))


if __name__ == "__main__":
    sys.exit(main())
