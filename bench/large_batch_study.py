#!/usr/bin/env python
"""The large-batch study: on the embedded shapes dataset, for the same number of epochs, a small batch (8) with
SGD against a batch 8x larger (64) with each paper's recipe, scaled down to 2 CPU workers.

Arms (one YAML each in configs/shapes/study/, whose comments say which recipe it scales down and why its
hyper-parameters are what they are):

    sgd_b8          SGD, batch 8, LR 0.02 x 8/16 = 0.01 (the small-batch baseline)
    sgd_b64_linear  MegDet: SGD + linear scaling (0.08) + warm-up from the batch-16 LR + SyncBN
    lars_b64        CoolDet: LARS (trust coefficient 1, LR 0.0008, no scaling) + warm-up + cosine + SyncBN
    lamb_b64        LAMB (You et al.) with the per-layer step of LargeDet's PMD-LAMB (LR 0.08 x 0.012)
    pmdlamb_b64     LargeDet: PMD-LAMB (alpha 0.012, T 16 = 1 epoch, wd 5e-4, LR 0.08 by LSR) + SyncBN
    agvm_sgd_b64    AGVM: SGD + AGVM (tau 10, backbone anchor), linear-then-sqrt scaling (linear at 64) + SyncBN

Each arm runs as ``python train_net.py --num-gpus W --dist-url auto --config-file ...`` in a subprocess, one
after the other, into ``OUTPUT/<arm>/`` (its stdout+stderr in ``train.log``, what the study measured in
``result.json``). The study reads each arm's ``metrics.json`` (bbox/AP and AP50 at every evaluation,
total_loss), calls an arm that stopped with "Training diverged" / FloatingPointError diverged (AP 0), and writes
``OUTPUT/study.md`` (a markdown table) and ``OUTPUT/study.png`` (AP50 and loss against epochs, one line per arm).

    python bench/large_batch_study.py                                # all arms, 6 epochs, 2 workers
    python bench/large_batch_study.py --arms sgd_b8,lars_b64 --epochs 4
    python bench/large_batch_study.py --arms sgd_b8 --max-iter 2 --num-workers 1 --output /tmp/s   # smoke run
    python bench/large_batch_study.py --report-only                  # rebuild table + plot from OUTPUT

Resumable: an arm whose output already holds a finished run with the same settings (``result.json`` plus the
final metrics entry, or a divergence) is reused, unless ``--force``. Any other arm directory is deleted and run
again (detectron2 appends to an existing metrics.json).

This script runs the arms and writes the report; what an arm resolves to, how its directory is read and the
table are ``largebatch.analysis.study``, the figure is ``largebatch.analysis.plots.plot_study``.
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
from largebatch.analysis.plots import plot_study
from largebatch.analysis.study import DIVERGED, arm_overrides, fmt_duration, is_done, resolve_arm, summarize_arm, table
from largebatch.files import atomic_write

CONFIG_DIR = os.path.join("configs", "shapes", "study")
ARMS = ("sgd_b8", "sgd_b64_linear", "lars_b64", "lamb_b64", "pmdlamb_b64", "agvm_sgd_b64")


def config_file(arm: str) -> str:
    """The arm's config, relative to the repository (train_net.py runs there)."""
    return os.path.join(CONFIG_DIR, arm + ".yaml")


# -------------------------------------------------------------------------------------------------------------
# running an arm
# -------------------------------------------------------------------------------------------------------------
def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_arm(arm: str, arm_dir: str, opts: List[str], num_workers: int, python: str) -> dict:
    """Train (and evaluate) one arm in a subprocess; record wall time, CPU time of all its processes, the mean
    1-minute load average of the machine meanwhile, the exit status and whether it diverged."""
    if os.path.isdir(arm_dir):
        shutil.rmtree(arm_dir)  # a stale metrics.json would be appended to
    os.makedirs(arm_dir)
    cmd = [python, "train_net.py", "--num-gpus", str(num_workers), "--dist-url", "auto",
           "--config-file", config_file(arm), "OUTPUT_DIR", arm_dir, *opts]
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
def report(rows: List[dict], args, command: str) -> str:
    images = rows[0]["train_images"] if rows else "?"
    if args.max_iter:
        length = (f"{args.max_iter} iterations per arm (debug run, --max-iter), COCO bbox AP on the 128 val images "
                  "at the end")
    else:
        length = (f"{args.epochs} epochs of the {images} training images per arm, COCO bbox AP on the 128 val images "
                  f"every {args.eval_period} epoch(s) and at the end")
    import torch

    starts = [r["started"] for r in rows if r.get("started")]
    ends = [r["ended"] for r in rows if r.get("ended")]
    when = f"{min(starts)} to {max(ends)}" if starts and ends else datetime.datetime.now().isoformat(timespec="seconds")
    wall = sum(r["wall_s"] or 0 for r in rows)
    cpu = sum(r["cpu_s"] or 0 for r in rows)
    text = [
        "# Large-batch study on the embedded shapes dataset",
        "",
        f"`{command}`",
        "",
        f"Measured {when} on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, {args.num_workers} CPU "
        f"worker(s) over gloo; {length}.",
        "",
        table(rows),
        "",
        f"All arms: wall time {fmt_duration(wall)}, CPU time {fmt_duration(cpu)} (min:s).",
        "",
        "AP / AP50: detectron2's COCOEvaluator (percent) at the last evaluation (0 for a diverged arm). Final loss: "
        "total_loss of the last metrics.json record (detectron2's median over the last 20 iterations; for a "
        "diverged arm the last one recorded before it stopped). Diverged: the run stopped on a non-finite loss / "
        "gradient (largebatch's guard, which names the iteration) or on detectron2's own NaN check. Wall "
        "time: the whole train_net.py process (start-up, training, evaluations). CPU time: user + system time of "
        "all its processes; on an otherwise idle machine the wall time is about CPU time / min(cores, workers) "
        "(+ the serial start-up and evaluation). Load: mean 1-minute "
        f"load average during the arm ({os.cpu_count()} cores: above {os.cpu_count()} means other processes "
        "competed for the CPU and the wall time is inflated). Iterations: optimizer steps of the arm.",
        "",
        "![AP50 and loss against epochs](study.png)",
        "",
    ]
    return "\n".join(text)


# -------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any KEY VALUE pairs after the options are passed to every arm's train_net.py.")
    p.add_argument("--output", default="output/study", help="study directory (one sub-directory per arm)")
    p.add_argument("--epochs", type=int, default=6, help="epochs per arm (SOLVER.MAX_ITER; default 6)")
    p.add_argument("--eval-period", type=int, default=1, help="evaluate every this many epochs (and at the end)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms (default: all): {', '.join(ARMS)}")
    p.add_argument("--num-workers", type=int, default=2, help="CPU workers (train_net.py --num-gpus; default 2)")
    p.add_argument("--max-iter", type=int, default=0,
                   help="debug: train this many iterations per arm instead of --epochs (one evaluation at the end)")
    p.add_argument("--force", action="store_true", help="run arms again even when their output is finished")
    p.add_argument("--report-only", action="store_true", help="run nothing: table and plot from what OUTPUT holds")
    p.add_argument("--python", default=sys.executable, help="interpreter for train_net.py (default: this one)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every arm")
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if not os.path.isfile(os.path.join(REPO, config_file(a)))]
    if unknown or not arms:
        p.error(f"--arms: unknown arm(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(ARMS)}")
    if args.epochs < 1 or args.eval_period < 0 or args.max_iter < 0 or args.num_workers < 1:
        p.error("--epochs and --num-workers must be >= 1, --eval-period and --max-iter >= 0")
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
    opts = arm_overrides(args.epochs, args.eval_period, args.max_iter, args.opts)
    study_json = os.path.join(output, "study.json")
    if args.report_only:  # the table says which command produced the runs, not this report-only one
        command = (read_json(study_json) or {}).get("command", command.replace(" --report-only", ""))
    else:
        atomic_write(study_json, lambda f: json.dump({"command": command, "overrides": opts, "arms": args.arm_list,
                                                       "num_workers": args.num_workers}, f, indent=1))
    rows = []
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
        rows.append(summarize_arm(arm_dir, info))
        # the report after every arm: a long study shows its progress, and a kill leaves a table of what ran
        atomic_write(os.path.join(output, "study.md"), lambda f: f.write(report(rows, args, command)))
        plot_study(rows, os.path.join(output, "study.png"))
    print(table(rows))
    print(f"\n[study] wrote {os.path.join(output, 'study.md')} and {os.path.join(output, 'study.png')}")
    return 1 if any(r["failed"] or (r["returncode"] is None and not args.report_only) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
