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
A/B difference of two ~1 s iterations: the time spent in MonitorHook per record (its before_step and
after_step, timed on the hook the trainer's build_hooks returns), and the extra time of a measurement
iteration over the median other iteration; from them, the predicted ratio
1 + (hook + extra) / PERIOD / (s per iteration off). Target: <= 1.01x. Everything else (hooks, writers)
is the same in both; checkpoints and evaluation are pushed out of the run.
"""
import argparse
import time

import harness


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Monitor on vs off: iteration time, side by side.")
    harness.add_config_args(p, num_workers=1)
    p.add_argument("--periods", type=int, default=4, help="timed periods of MONITOR.PERIOD iterations (default 4)")
    p.add_argument("--ims-per-batch", type=int, default=None,
                   help="SOLVER.IMS_PER_BATCH, total over the workers (default: the config's, 16 for shapes)")
    harness.add_threads_arg(p)
    harness.add_json_arg(p, "every iteration's times (rank 0)")
    harness.add_overrides(p)
    return p.parse_args(argv)


def timed_monitor_trainer(timer: harness.CallTimer):
    """LargeBatchTrainer whose MonitorHook (when it has one) counts its before_step / after_step in ``timer``."""
    from largebatch import LargeBatchTrainer
    from largebatch.engine.monitor import MonitorHook

    class Trainer(LargeBatchTrainer):
        def build_hooks(self):
            hooks = super().build_hooks()
            for hook in hooks:
                if isinstance(hook, MonitorHook):
                    timer.wrap(hook, "before_step")
                    timer.wrap(hook, "after_step")
            return hooks

    return Trainer


def worker(args, out_root):
    from detectron2.utils import comm

    harness.quiet()
    harness.set_threads(args.threads)
    hook_timer = harness.CallTimer(time.process_time)
    runs = harness.build_runs(
        args, out_root, {"on": ["MONITOR.ENABLED", "True"], "off": ["MONITOR.ENABLED", "False"]},
        common=["SOLVER.IMS_PER_BATCH", str(args.ims_per_batch)] if args.ims_per_batch else [],
        trainer_class=timed_monitor_trainer(hook_timer),
    )
    period = runs["on"].trainer.cfg.MONITOR.PERIOD
    hook_cpu = {}  # iteration -> CPU seconds in MonitorHook.before_step + after_step
    total = period * (args.periods + 1)  # the first period is a warm-up
    for i in range(total):
        it = harness.interleave(runs, flip=i % 2 == 1)["on"]
        hook_cpu[it] = hook_timer.take()
        if comm.is_main_process() and (i + 1) % period == 0:
            k = (i + 1) // period - 1
            its = range(k * period, (k + 1) * period)
            on, off = (sum(runs[n].cpu[j] for j in its) / period for n in ("on", "off"))
            print(f"period {k}{' (warm-up)' if k == 0 else ''}: CPU s/iter on {on:.4f} off {off:.4f} "
                  f"(x{on / off:.4f})", flush=True)
    if comm.is_main_process():
        report(args, period, runs, hook_cpu)
        times = {n: {"wall": r.wall, "cpu": r.cpu} for n, r in runs.items()}
        harness.write_json(args.json, {**times, "hook_cpu": hook_cpu})


def report(args, period, runs, hook_cpu):
    import torch

    med = harness.median
    cfg = runs["on"].trainer.cfg
    timed = range(period, period * (args.periods + 1))
    on, off = runs["on"], runs["off"]
    print()
    print(f"Monitor overhead: {harness.config_name(args.config_file)}, {cfg.SOLVER.OPTIMIZER}, "
          f"{args.num_workers} CPU worker(s) x {torch.get_num_threads()} thread(s), total batch "
          f"{cfg.SOLVER.IMS_PER_BATCH}, MONITOR.PERIOD {period}: {args.periods} periods ({len(timed)} iterations) "
          f"per variant, interleaved iteration by iteration")
    print()
    print(harness.on_off_table(runs, timed, period, "monitor"))
    # the monitor's own cost, measured inside the "on" trainer (CPU time)
    records = [j for j in timed if j % period == 0]
    others = [on.cpu[j] for j in timed if j % period != 0]
    hook_record = med(hook_cpu.get(j, 0.0) for j in records)
    hook_other = med(hook_cpu.get(j, 0.0) for j in timed if j % period != 0)
    extra = med(on.cpu[j] for j in records) - med(others) - hook_record
    base = med(off.cpu[j] for j in timed)
    predicted = 1 + (hook_record + hook_other * (period - 1) + extra) / period / base
    print()
    print(harness.markdown_table(["monitor cost inside the \"on\" trainer (CPU)", "value"], [
        ["MonitorHook, recording iteration", f"{hook_record * 1e3:.2f} ms"],
        ["MonitorHook, other iterations", f"{hook_other * 1e6:.1f} us"],
        ["measurement iteration (grad_var) minus the median other iteration, hook excluded", f"{extra * 1e3:.1f} ms"],
        ["median iteration, monitor off", f"{base * 1e3:.1f} ms"],
        [f"**predicted on / off** = 1 + (hook + extra) / {period} / iteration", f"**{predicted:.4f}x**"],
    ], right=(1,)))


def main(argv=None):
    harness.launch_workers(worker, parse_args(argv))


if __name__ == "__main__":
    main()
