#!/usr/bin/env python
"""Iteration time with the monitor on (MONITOR.ENABLED True, at its period) against off, side by side.

    python bench/monitor_overhead.py                       # 1 CPU worker, configs/shapes/sgd.yaml (batch 16)
    python bench/monitor_overhead.py --num-workers 2       # 2 gloo CPU workers (DDP + half-group all-reduce)
    python bench/monitor_overhead.py --blocks 6 --ims-per-batch 8 --threads 1 SOLVER.OPTIMIZER LAMB  # KEY VALUE overrides

Two LargeBatchTrainers are built in the same process (in each worker) from the same config, one with
MONITOR.ENABLED True (trust ratios, local LRs, layer_stats.jsonl and grad_var every MONITOR.PERIOD
iterations, the default 20), one with False; the divergence guard runs in both. They are driven in
alternating blocks of MONITOR.PERIOD iterations, in the order on, off, off, on, on, off, ... (so a drift of
the machine's load hits both alike), each block aligned so that it holds exactly one recording iteration
(with the gradient-variance measurement: on one worker two half-batch backward passes, on two workers the
extra half-group all-reduce). One untimed warm-up block each comes first. Per block: wall time / iterations.

Printed: a markdown table with the median wall-clock and CPU (process time of rank 0; steadier on a shared
machine) seconds per iteration of each, and the ratio on / off, of the medians and as the median of the
per-round ratios (each "on" block against the "off" block run next to it). Target: <= 1.01x. Everything else (hooks, writers, checkpoints) is the same in both: checkpoints
and evaluation are pushed out of the run, metrics.json is written every 20 iterations by both.
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
    p.add_argument("--blocks", type=int, default=4, help="timed blocks per variant (default 4)")
    p.add_argument("--ims-per-batch", type=int, default=None,
                   help="SOLVER.IMS_PER_BATCH, total over the workers (default: the config's, 16 for shapes)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per worker (default: torch's; the launcher gives each of N workers cores/N)")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    return p.parse_args(argv)


class Driver:
    """Runs a trainer's loop (TrainerBase.train without its ending) block by block, with its own storage."""

    def __init__(self, cfg):
        from detectron2.utils.events import EventStorage

        from largebatch import LargeBatchTrainer

        self.trainer = LargeBatchTrainer(cfg)
        self.trainer.resume_or_load(resume=False)
        self.trainer.iter = self.trainer.start_iter = 0
        self.storage = EventStorage(0)
        self.started = False

    def run(self, n):
        t = self.trainer
        with self.storage:
            t.storage = self.storage
            if not self.started:
                t.before_train()
                self.started = True
            for _ in range(n):
                t.before_step()
                t.run_step()
                t.after_step()
                t.iter += 1


def worker(args, out_root):
    import logging

    import torch
    from detectron2.utils import comm

    from largebatch.engine.setup import load_config, register_datasets

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
        torch.manual_seed(cfg.SEED)
        drivers[name] = Driver(cfg)
    for d in drivers.values():  # warm-up block, untimed
        d.run(period)
    wall = {"on": [], "off": []}
    cpu = {"on": [], "off": []}
    ratios = {"wall": [], "cpu": []}
    for round_ in range(args.blocks):
        pair = ["on", "off"] if round_ % 2 == 0 else ["off", "on"]
        for name in pair:
            comm.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            drivers[name].run(period)
            comm.synchronize()
            wall[name].append((time.perf_counter() - start) / period)
            cpu[name].append((time.process_time() - start_cpu) / period)
        ratios["wall"].append(wall["on"][-1] / wall["off"][-1])
        ratios["cpu"].append(cpu["on"][-1] / cpu["off"][-1])
        if comm.is_main_process():
            print(f"round {round_ + 1}/{args.blocks}: s/iter wall on {wall['on'][-1]:.4f} off {wall['off'][-1]:.4f} "
                  f"(x{ratios['wall'][-1]:.4f}), CPU on {cpu['on'][-1]:.4f} off {cpu['off'][-1]:.4f} "
                  f"(x{ratios['cpu'][-1]:.4f})", flush=True)
    if comm.is_main_process():
        report(args, period, wall, cpu, ratios, drivers["on"].trainer.cfg)


def report(args, period, wall, cpu, ratios, cfg):
    import torch

    med = statistics.median
    mw = {k: med(v) for k, v in wall.items()}
    mc = {k: med(v) for k, v in cpu.items()}
    print()
    print(f"Monitor overhead: {os.path.relpath(args.config_file, REPO)}, {cfg.SOLVER.OPTIMIZER}, "
          f"{args.num_workers} CPU worker(s) x {torch.get_num_threads()} thread(s), total batch "
          f"{cfg.SOLVER.IMS_PER_BATCH}, MONITOR.PERIOD {period}: {args.blocks} blocks of {period} iterations "
          f"per variant, interleaved")
    print()
    print("| monitor | wall s/iter (median) | CPU s/iter (median, rank 0) | blocks |")
    print("|---|---:|---:|---:|")
    print(f"| off (MONITOR.ENABLED False) | {mw['off']:.4f} | {mc['off']:.4f} | {len(wall['off'])} |")
    print(f"| on (MONITOR.ENABLED True, period {period}) | {mw['on']:.4f} | {mc['on']:.4f} | {len(wall['on'])} |")
    print(f"| **ratio on / off** (of the medians) | **{mw['on'] / mw['off']:.4f}x** | **{mc['on'] / mc['off']:.4f}x** | |")
    print(f"| ratio on / off (median of {args.blocks} paired rounds) | {med(ratios['wall']):.4f}x | "
          f"{med(ratios['cpu']):.4f}x | |")


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
