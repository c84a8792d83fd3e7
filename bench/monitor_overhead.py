#!/usr/bin/env python
"""Iteration time with the monitor on (MONITOR.ENABLED True, at its period) against off, side by side.

    python bench/monitor_overhead.py                       # 1 CPU worker, configs/shapes/sgd.yaml (batch 16)
    python bench/monitor_overhead.py --num-workers 2       # 2 gloo CPU workers (DDP + the Phi all-reduce)
    python bench/monitor_overhead.py --periods 6 --ims-per-batch 8 --threads 1 SOLVER.OPTIMIZER LAMB  # overrides

Two LargeBatchTrainers are built in the same process (in each worker) from the same config, weights and
data order, one with MONITOR.ENABLED True (trust ratios, local LRs, layer_stats.jsonl and grad_var every
MONITOR.PERIOD iterations, the default 20), one with False; the divergence guard runs in both. They run
interleaved one iteration at a time (on, off, off, on, on, off, ...), so that the load of a shared machine
hits both alike, for one untimed warm-up period and then --periods timed periods of MONITOR.PERIOD
iterations (each holding exactly one recording iteration, with the gradient-variance measurement: on one
worker two half-batch backward passes, on several the half-group all-reduce).

Printed, as a markdown table: seconds per iteration of each (wall clock, and CPU = process time of rank 0,
steadier on a shared machine), as the median over the periods and as the total, with the ratio on / off.
Then the monitor's cost measured inside the "on" trainer, which a noisy machine disturbs far less than the
A/B difference of two ~1 s iterations: the time spent in MonitorHook per record, and the extra time of a
measurement iteration over the median other iteration; from them, the predicted ratio
1 + (hook + extra) / PERIOD / (s per iteration off). Target: <= 1.01x. Everything else (hooks, writers)
is the same in both; checkpoints and evaluation are pushed out of the run.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import largebatch  # noqa: F401
except ImportError:  # a bare checkout: the package lives in projects/
    sys.path.insert(0, os.path.join(REPO, "projects"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Monitor on vs off: iteration time, side by side.")
    p.add_argument("--config-file", default=os.path.join(REPO, "configs/shapes/sgd.yaml"))
    p.add_argument("--num-workers", type=int, default=1, help="CPU worker processes (gloo), 1 or more")
    p.add_argument("--periods", type=int, default=4, help="timed periods of MONITOR.PERIOD iterations (default 4)")
    p.add_argument("--ims-per-batch", type=int, default=None,
                   help="SOLVER.IMS_PER_BATCH, total over the workers (default: the config's, 16 for shapes)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per worker (default: torch's; the launcher gives each of N workers cores/N)")
    p.add_argument("--dump", default=None, metavar="PREFIX",
                   help="also write every iteration's times to PREFIX.rank<R>.json (for a closer look)")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    return p.parse_args(argv)


class Driver:
    """Runs a trainer's loop (TrainerBase.train without its ending) one iteration at a time, with its own
    EventStorage; keeps the wall / CPU time of every iteration and, for the monitor, of its hook."""

    def __init__(self, cfg):
        import numpy as np
        import torch
        from detectron2.utils.events import EventStorage

        from largebatch import LargeBatchTrainer
        from largebatch.engine.monitor import MonitorHook

        # same weights and same data order in both trainers (detectron2's TrainingSampler seeds from numpy)
        torch.manual_seed(cfg.SEED)
        np.random.seed(cfg.SEED)
        self.trainer = LargeBatchTrainer(cfg)
        self.trainer.resume_or_load(resume=False)
        self.trainer.iter = self.trainer.start_iter = 0
        self.storage = EventStorage(0)
        self.started = False
        self.wall, self.cpu = {}, {}
        self.hook_cpu = {}  # iteration -> CPU seconds in MonitorHook.before_step + after_step
        for hook in self.trainer._hooks:
            if isinstance(hook, MonitorHook):
                for name in ("before_step", "after_step"):
                    setattr(hook, name, self._timed(getattr(hook, name)))

    def _timed(self, fn):
        def wrapper():
            start = time.process_time()
            fn()
            it = self.trainer.iter
            self.hook_cpu[it] = self.hook_cpu.get(it, 0.0) + time.process_time() - start
        return wrapper

    def step(self):
        t = self.trainer
        with self.storage:
            t.storage = self.storage
            if not self.started:
                t.before_train()
                self.started = True
            start, start_cpu = time.perf_counter(), time.process_time()
            t.before_step()
            t.run_step()
            t.after_step()
            self.wall[t.iter] = time.perf_counter() - start
            self.cpu[t.iter] = time.process_time() - start_cpu
            t.iter += 1


def worker(args, out_root):
    import logging

    import torch
    from detectron2.utils import comm

    from largebatch.config import load_config
    from largebatch.data import register_datasets

    logging.disable(logging.INFO)  # the trainers' logs (model, metrics every 20 iterations) are not the point
    if args.threads:
        torch.set_num_threads(args.threads)
    drivers = {}
    period = None
    for name, enabled in (("on", "True"), ("off", "False")):
        opts = [
            "SOLVER.MAX_ITER", "1000000", "SOLVER.CHECKPOINT_PERIOD", "100000000", "DATASETS.TEST", "()",
            "TEST.EVAL_PERIOD", "0",
            *(["SOLVER.IMS_PER_BATCH", str(args.ims_per_batch)] if args.ims_per_batch else []),
            *args.opts, "MONITOR.ENABLED", enabled, "OUTPUT_DIR", os.path.join(out_root, name),
        ]
        cfg = load_config(args.config_file, opts, args.num_workers)
        register_datasets(cfg)
        period = cfg.MONITOR.PERIOD
        drivers[name] = Driver(cfg)
    total = period * (args.periods + 1)  # the first period is a warm-up
    for i in range(total):
        for name in (("on", "off") if i % 2 == 0 else ("off", "on")):
            comm.synchronize()
            drivers[name].step()
        if comm.is_main_process() and (i + 1) % period == 0:
            k = (i + 1) // period - 1
            its = range(k * period, (k + 1) * period)
            on, off = (sum(drivers[n].cpu[j] for j in its) / period for n in ("on", "off"))
            print(f"period {k}{' (warm-up)' if k == 0 else ''}: CPU s/iter on {on:.4f} off {off:.4f} "
                  f"(x{on / off:.4f})", flush=True)
    if args.dump:
        import json

        with open(f"{args.dump}.rank{comm.get_rank()}.json", "w") as f:
            json.dump({n: {"wall": d.wall, "cpu": d.cpu, "hook_cpu": d.hook_cpu} for n, d in drivers.items()}, f)
    if comm.is_main_process():
        report(args, period, drivers, drivers["on"].trainer.cfg)


def report(args, period, drivers, cfg):
    import torch

    med = statistics.median
    timed = range(period, period * (args.periods + 1))
    rows = {}
    for kind in ("wall", "cpu"):
        per = {}
        for name, d in drivers.items():
            times = getattr(d, kind)
            per[name] = [sum(times[j] for j in range(k, k + period)) / period for k in range(period, timed.stop, period)]
        rows[kind] = per
    on, off = drivers["on"], drivers["off"]
    print()
    print(f"Monitor overhead: {os.path.relpath(args.config_file, REPO)}, {cfg.SOLVER.OPTIMIZER}, "
          f"{args.num_workers} CPU worker(s) x {torch.get_num_threads()} thread(s), total batch "
          f"{cfg.SOLVER.IMS_PER_BATCH}, MONITOR.PERIOD {period}: {args.periods} periods ({len(timed)} iterations) "
          f"per variant, interleaved iteration by iteration")
    print()
    print("| s / iteration | monitor off | monitor on | on / off |")
    print("|---|---:|---:|---:|")
    for kind, label in (("wall", "wall clock"), ("cpu", "CPU (rank 0)")):
        a, b = med(rows[kind]["off"]), med(rows[kind]["on"])
        print(f"| {label}, median of the periods | {a:.4f} | {b:.4f} | {b / a:.4f}x |")
        a, b = (sum(getattr(d, kind)[j] for j in timed) / len(timed) for d in (off, on))
        print(f"| {label}, all {len(timed)} iterations | {a:.4f} | {b:.4f} | **{b / a:.4f}x** |")
    # the monitor's own cost, measured inside the "on" trainer (CPU time)
    records = [j for j in timed if j % period == 0]
    others = [on.cpu[j] for j in timed if j % period != 0]
    hook_record = med(on.hook_cpu.get(j, 0.0) for j in records)
    hook_other = med(on.hook_cpu.get(j, 0.0) for j in timed if j % period != 0)
    extra = med(on.cpu[j] for j in records) - med(others) - hook_record
    base = med(off.cpu[j] for j in timed)
    predicted = 1 + (hook_record + hook_other * (period - 1) + extra) / period / base
    print()
    print("| monitor cost inside the \"on\" trainer (CPU) | value |")
    print("|---|---:|")
    print(f"| MonitorHook, recording iteration | {hook_record * 1e3:.2f} ms |")
    print(f"| MonitorHook, other iterations | {hook_other * 1e6:.1f} us |")
    print(f"| measurement iteration (grad_var) minus the median other iteration, hook excluded | {extra * 1e3:.1f} ms |")
    print(f"| median iteration, monitor off | {base * 1e3:.1f} ms |")
    print(f"| **predicted on / off** = 1 + (hook + extra) / {period} / iteration | **{predicted:.4f}x** |")


def _spawned(args, out_root):
    worker(args, out_root)


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="monitor_overhead_") as out_root:
        if args.num_workers > 1:
            from largebatch import launch

            launch(_spawned, args.num_workers, dist_url="auto", args=(args, out_root))
        else:
            worker(args, out_root)


if __name__ == "__main__":
    main()
