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
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "projects"))

from largebatch.files import atomic_write  # noqa: E402

CONFIG_DIR = os.path.join("configs", "shapes", "study")
ARMS = ("sgd_b8", "sgd_b64_linear", "lars_b64", "lamb_b64", "pmdlamb_b64", "agvm_sgd_b64")
DIVERGED = re.compile(r"Training diverged|FloatingPointError")
LR_LINE = re.compile(r"BASE_LR ([0-9.eE+-]+) -> ([0-9.eE+-]+) \(rule")


# -------------------------------------------------------------------------------------------------------------
# what one arm is
# -------------------------------------------------------------------------------------------------------------
def arm_overrides(args) -> List[str]:
    """KEY VALUE overrides every arm gets from the command line (also the identity of a finished run)."""
    if args.max_iter:
        # debug / smoke runs: a few iterations, warm-up 1 iteration, one evaluation at the end
        opts = ["SOLVER.SCHEDULE_UNIT", "iter", "SOLVER.MAX_ITER", str(args.max_iter),
                "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "1000000",
                "TEST.EVAL_PERIOD", str(args.max_iter)]
    else:
        opts = ["SOLVER.MAX_ITER", str(args.epochs), "TEST.EVAL_PERIOD", str(args.eval_period)]
    return opts + list(args.opts)


def resolve_arm(arm: str, opts: List[str], num_workers: int) -> dict:
    """The arm's resolved solver settings as the trainer will see them (config + overrides + prepare_solver)."""
    from largebatch.config import load_config
    from largebatch.data import register_datasets
    from largebatch.data import train_set_size
    from largebatch.solver import prepare_solver

    config_file = os.path.join(CONFIG_DIR, arm + ".yaml")
    cfg = load_config(os.path.join(REPO, config_file), opts, num_workers)
    register_datasets(cfg)
    images = train_set_size(cfg)
    resolved = prepare_solver(cfg, num_workers, images)
    s = resolved.SOLVER
    total_batch = s.IMS_PER_BATCH * s.ACCUMULATE_STEPS
    optimizer = s.OPTIMIZER.upper()
    if optimizer == "LARS":
        optimizer += f" (eta {s.LARS.TRUST_COEFFICIENT:g})"
    elif optimizer == "PMDLAMB":  # its LR is the global eta: every layer moves by eta x alpha x ||w||
        optimizer += f" (alpha {s.PMDLAMB.SCALE:g}, T {s.PMDLAMB.CYCLE})"
    if s.AGVM.ENABLED:
        optimizer += f" + AGVM (tau {s.AGVM.INTERVAL})"
    return {
        "arm": arm,
        "config": config_file,
        "optimizer": optimizer,
        "total_batch": total_batch,
        "lr": s.BASE_LR,
        "max_iter": s.MAX_ITER,
        "eval_period": resolved.TEST.EVAL_PERIOD,
        "iters_per_epoch": images / total_batch,
        "train_images": images,
    }


# -------------------------------------------------------------------------------------------------------------
# reading an arm's output
# -------------------------------------------------------------------------------------------------------------
def read_metrics(arm_dir: str) -> List[dict]:
    path = os.path.join(arm_dir, "metrics.json")
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a kill
                    pass
    return out


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def eval_iterations(info: dict) -> List[int]:
    """Iterations at which detectron2 records the evaluations: EvalHook runs after iteration k * period - 1
    while k * period < MAX_ITER, and after training (recorded at MAX_ITER)."""
    period, max_iter = info.get("eval_period", 0), info["max_iter"]
    periodic = list(range(period - 1, max_iter - 1, period)) if period > 0 else []
    return periodic + [max_iter]


def log_evals(log: str) -> List[tuple]:
    """(AP, AP50) of each evaluation, in order, from detectron2's "copypaste:" lines of the main process."""
    out, lines = [], log.splitlines()
    for i, line in enumerate(lines):
        if line.rstrip().endswith("copypaste: AP,AP50,AP75,APs,APm,APl") and i + 1 < len(lines):
            values = lines[i + 1].split("copypaste:")[-1].strip().split(",")
            try:
                out.append((float(values[0]), float(values[1])))
            except (ValueError, IndexError):
                pass
    return out


def merge_evals(metrics: List[dict], log: str, iterations: List[int]) -> List[tuple]:
    """(iteration, AP, AP50) of every evaluation. metrics.json can miss one: its writer (every 20 iterations)
    keeps only the latest value of a key, so of two evaluations less than 20 iterations apart (1 epoch = 16
    iterations at batch 64) only the second is written. The log has them all (4 decimals): its k-th evaluation
    is at the k-th of ``iterations``; metrics.json's value is used where it has one."""
    found = {m["iteration"]: (m["bbox/AP"], m.get("bbox/AP50", float("nan")))
             for m in metrics if "bbox/AP" in m and "iteration" in m}
    for it, values in zip(iterations, log_evals(log)):
        found.setdefault(it, values)
    return [(it, *found[it]) for it in sorted(found)]


def summarize_arm(arm_dir: str, info: dict) -> dict:
    """Curves and final numbers of one arm from its metrics.json, train.log and result.json."""
    metrics = read_metrics(arm_dir)
    result = read_json(os.path.join(arm_dir, "result.json")) or {}
    log = read_text(os.path.join(arm_dir, "train.log")) or read_text(os.path.join(arm_dir, "log.txt"))
    ipe = info["iters_per_epoch"]
    evals = merge_evals(metrics, read_text(os.path.join(arm_dir, "log.txt")), eval_iterations(info))
    losses = [(m["iteration"], m["total_loss"]) for m in metrics if "total_loss" in m and "iteration" in m]
    lr = info["lr"]
    match = LR_LINE.search(log)
    if match:
        lr = float(match.group(2))
    returncode = result.get("returncode")
    diverged = bool(result.get("diverged")) or (returncode not in (None, 0) and bool(DIVERGED.search(log)))
    failed = returncode not in (None, 0) and not diverged
    # detectron2 records the periodic evaluations at iteration k * period - 1 and the final one (after_train) at
    # MAX_ITER; an evaluation at MAX_ITER - 1 or later is the final one
    finished = any(it >= info["max_iter"] - 1 for it, *_ in evals)
    ap = ap50 = None
    if diverged:
        ap = ap50 = 0.0
    elif finished:
        _, ap, ap50 = max(evals)
    # largebatch's guard names the iteration; detectron2's own checks ("Predicted boxes or scores contain
    # Inf/NaN. Training has diverged.") do not: then the last iteration metrics.json holds (detectron2 writes
    # the failing iteration's metrics when training stops)
    match = re.search(r"Training diverged at iteration (\d+)", log)
    diverged_at = int(match.group(1)) if match else (max(m["iteration"] for m in metrics) if metrics else None)
    return {
        **info,
        "lr": lr,
        "ap": ap,
        "ap50": ap50,
        "final_loss": losses[-1][1] if losses else None,
        "wall_s": result.get("wall_s"),
        "cpu_s": result.get("cpu_s"),
        "load": result.get("load_avg"),
        "started": result.get("started"),
        "ended": result.get("finished"),
        "returncode": returncode,
        "diverged": diverged,
        "diverged_at": diverged_at if diverged else None,
        "failed": failed,
        "finished": finished,
        # curves against epochs: iteration i ends after (i + 1) / iterations-per-epoch epochs
        "ap_curve": [(min(it + 1, info["max_iter"]) / ipe, a, a50) for it, a, a50 in evals],
        "loss_curve": [(min(it + 1, info["max_iter"]) / ipe, loss) for it, loss in losses],
    }


def is_done(arm_dir: str, info: dict, opts: List[str], num_workers: int) -> bool:
    """A finished run of the same settings: result.json says so and metrics.json has its final evaluation
    (or it diverged, which is a result too)."""
    result = read_json(os.path.join(arm_dir, "result.json"))
    if not result or result.get("overrides") != opts or result.get("num_workers") != num_workers:
        return False
    if result.get("diverged"):
        return True
    return result.get("returncode") == 0 and summarize_arm(arm_dir, info)["finished"]


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
           "--config-file", os.path.join(CONFIG_DIR, arm + ".yaml"), "OUTPUT_DIR", arm_dir, *opts]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(REPO, "projects") + os.pathsep + env.get("PYTHONPATH", "")
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
def _fmt(x, spec=".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"


def table(rows: List[dict]) -> str:
    head = ("| arm | optimizer | total batch | iterations | LR (resolved) | AP | AP50 | final loss | wall time "
            "| CPU time | load | diverged? |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["diverged"]:
            div = f"yes (iteration {r['diverged_at']})" if r["diverged_at"] is not None else "yes"
        elif r["failed"]:
            div = f"no: failed (exit {r['returncode']}, see train.log)"
        elif r["returncode"] is None:
            div = "not run"
        elif not r["finished"]:
            div = "no: unfinished"
        else:
            div = "no"
        lines.append(
            f"| {r['arm']} | {r['optimizer']} | {r['total_batch']} | {r['max_iter']} | {r['lr']:g} | {_fmt(r['ap'])} "
            f"| {_fmt(r['ap50'])} | {_fmt(r['final_loss'], '.3f')} | {_duration(r['wall_s'])} "
            f"| {_duration(r['cpu_s'])} | {_fmt(r['load'], '.1f')} | {div} |"
        )
    return "\n".join(lines)


def report(rows: List[dict], args, command: str) -> str:
    images = rows[0]["train_images"] if rows else "?"
    if args.max_iter:
        length = f"{args.max_iter} iterations per arm (debug run, --max-iter), COCO bbox AP on the 128 val images at the end"
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
        f"All arms: wall time {_duration(wall)}, CPU time {_duration(cpu)} (min:s).",
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


def plot(rows: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ap, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        label = r["arm"] + (" (diverged)" if r["diverged"] else "")
        if r["ap_curve"]:
            xs = [x for x, _, _ in r["ap_curve"]]
            line, = ax_ap.plot(xs, [a50 for _, _, a50 in r["ap_curve"]], marker="o", label=label)
        else:
            line = None
        if r["loss_curve"]:
            kwargs = {"color": line.get_color()} if line is not None else {}
            xs = [x for x, _ in r["loss_curve"]]
            line2, = ax_loss.plot(xs, [loss for _, loss in r["loss_curve"]], marker=".", label=label, **kwargs)
            if r["diverged"]:
                ax_loss.plot(xs[-1:], [r["loss_curve"][-1][1]], marker="x", markersize=10, color=line2.get_color())
    ax_ap.set_xlabel("epoch")
    ax_ap.set_ylabel("bbox AP50 (val)")
    ax_ap.set_title("AP50 against epochs")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("total_loss (train, median of 20 iterations)")
    ax_loss.set_title("training loss against epochs")
    for ax in (ax_ap, ax_loss):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), "wb")  # save_figure, at this dpi
    plt.close(fig)


# -------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
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
    unknown = [a for a in arms if not os.path.isfile(os.path.join(REPO, CONFIG_DIR, a + ".yaml"))]
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
    command = "python bench/large_batch_study.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    output = os.path.abspath(args.output)
    os.makedirs(output, exist_ok=True)
    logging.disable(logging.WARNING)  # detectron2's import / dataset chatter when resolving the configs here
    opts = arm_overrides(args)
    study_json = os.path.join(output, "study.json")
    if args.report_only:  # the table says which command produced the runs, not this report-only one
        command = (read_json(study_json) or {}).get("command", command.replace(" --report-only", ""))
    else:
        atomic_write(study_json, lambda f: json.dump({"command": command, "overrides": opts, "arms": args.arm_list,
                                                       "num_workers": args.num_workers}, f, indent=1))
    rows = []
    for arm in args.arm_list:
        info = resolve_arm(arm, opts, args.num_workers)
        arm_dir = os.path.join(output, arm)
        if not args.report_only:
            if not args.force and is_done(arm_dir, info, opts, args.num_workers):
                print(f"[study] {arm}: finished run found in {arm_dir}, reused (--force to run it again)", flush=True)
            else:
                print(f"[study] {arm}: {info['optimizer']}, batch {info['total_batch']}, LR {info['lr']:g}, "
                      f"{info['max_iter']} iterations -> {arm_dir} (log: train.log)", flush=True)
                res = run_arm(arm, arm_dir, opts, args.num_workers, args.python)
                state = "diverged" if res["diverged"] else ("ok" if res["returncode"] == 0 else f"exit {res['returncode']}")
                print(f"[study] {arm}: {state} in {_duration(res['wall_s'])} (CPU {_duration(res['cpu_s'])}, "
                      f"load {res['load_avg']})", flush=True)
        rows.append(summarize_arm(arm_dir, info))
        # the report after every arm: a long study shows its progress, and a kill leaves a table of what ran
        atomic_write(os.path.join(output, "study.md"), lambda f: f.write(report(rows, args, command)))
        plot(rows, os.path.join(output, "study.png"))
    print(table(rows))
    print(f"\n[study] wrote {os.path.join(output, 'study.md')} and {os.path.join(output, 'study.png')}")
    return 1 if any(r["failed"] or (r["returncode"] is None and not args.report_only) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
