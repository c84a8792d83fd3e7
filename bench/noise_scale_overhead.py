#!/usr/bin/env python
"""Iteration time with the gradient noise scale measured (MONITOR.NOISE_SCALE True) against without, side by side.

    python bench/noise_scale_overhead.py                      # 2 CPU workers, configs/shapes/sgd.yaml, PERIOD 20
    python bench/noise_scale_overhead.py --num-workers 1 --periods 6 SOLVER.IMS_PER_BATCH 8

Both trainers have the monitor on (so both measure grad_var every MONITOR.PERIOD iterations) and differ only in
MONITOR.NOISE_SCALE: what it adds on a measurement iteration is the parts' squared norms of every worker's own
gradient (one pass over it, their sums travelling at the end of the existing all-reduce bucket), the parts'
squared norms of the step's gradient (one more pass), the estimator and the moving averages (a few floats, one
broadcast, one host read shared with grad_var's). Other iterations do nothing more. The two run interleaved one
iteration at a time (on, off, off, on, ...) for one untimed warm-up period and --periods timed periods.

Printed as markdown: seconds per iteration of each (wall clock and CPU of rank 0; median of the periods and all
iterations) with the ratio on / off, and the noise scale's own cost, timed inside the "on" trainer around the
stepper's ``measure_noise_scale`` plus the difference of the half-group reduce with and without the squared norms
(``reducer.reduce``, timed in both; several workers only), from which the predicted ratio 1 + own cost / PERIOD /
iteration. Target: <= 1.01x at the default period.
"""
import argparse
import time

import harness


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Noise scale on vs off: iteration time, side by side.")
    harness.add_config_args(p, num_workers=2)
    p.add_argument("--periods", type=int, default=4, help="timed periods of MONITOR.PERIOD iterations (default 4)")
    harness.add_threads_arg(p)
    harness.add_json_arg(p, "every iteration's times (rank 0)")
    harness.add_overrides(p)
    return p.parse_args(argv)


def worker(args, out_root):
    from detectron2.utils import comm

    harness.quiet()
    harness.set_threads(args.threads)
    runs = harness.build_runs(args, out_root, {"on": ["MONITOR.NOISE_SCALE", "True"],
                                               "off": ["MONITOR.NOISE_SCALE", "False"]},
                              common=["MONITOR.ENABLED", "True", "MONITOR.GRAD_VARIANCE", "True"])
    timers = {name: harness.CallTimer(time.process_time) for name in ("estimate", "reduce_on", "reduce_off")}
    timers["estimate"].wrap(runs["on"].stepper, "measure_noise_scale")
    for name in ("on", "off"):
        if runs[name].stepper.reducer is not None:  # one worker: its half-batches' norms are in the A/B ratio only
            timers[f"reduce_{name}"].wrap(runs[name].stepper.reducer, "reduce")
    period = runs["on"].trainer.cfg.MONITOR.PERIOD
    spent = {name: {} for name in timers}
    for i in range(period * (args.periods + 1)):  # the first period is a warm-up
        done = harness.interleave(runs, flip=i % 2 == 1)
        for name, timer in timers.items():
            spent[name][done["on"]] = timer.take()
    if comm.is_main_process():
        report(args, period, runs, spent)
        harness.write_json(args.json, {n: {"wall": r.wall, "cpu": r.cpu} for n, r in runs.items()} | {"own": spent})


def report(args, period, runs, spent):
    import torch

    med = harness.median
    cfg = runs["on"].trainer.cfg
    timed = range(period, period * (args.periods + 1))
    off = runs["off"]
    print(f"Noise-scale overhead: {harness.config_name(args.config_file)}, {cfg.SOLVER.OPTIMIZER}, "
          f"{args.num_workers} CPU worker(s) x {torch.get_num_threads()} thread(s), total batch "
          f"{cfg.SOLVER.IMS_PER_BATCH}, MONITOR.PERIOD {period}: {args.periods} periods ({len(timed)} iterations) "
          "per variant, interleaved iteration by iteration\n")
    print(harness.on_off_table(runs, timed, period, "noise scale"))
    measured = [j for j in timed if j % period == 0]
    estimate = med(spent["estimate"][j] for j in measured)
    norms = med(spent["reduce_on"][j] for j in measured) - med(spent["reduce_off"][j] for j in measured)
    others = max(spent["estimate"][j] for j in timed if j % period != 0)
    base = med(off.cpu[j] for j in timed)
    predicted = 1 + (estimate + max(norms, 0.0)) / period / base
    print()
    print(harness.markdown_table(["the noise scale's own cost (CPU, rank 0)", "value"], [
        ["measure_noise_scale on a measurement iteration (step-gradient norms, estimator, averages, metrics)",
         f"{estimate * 1e3:.2f} ms"],
        ["the reduce with the workers' squared norms minus without (median difference)", f"{norms * 1e3:.2f} ms"],
        ["on other iterations (largest)", f"{others * 1e6:.1f} us"],
        ["median iteration, noise scale off", f"{base * 1e3:.1f} ms"],
        [f"**predicted on / off** = 1 + own cost / {period} / iteration", f"**{predicted:.4f}x**"],
    ], right=(1,)))


def main(argv=None):
    harness.launch_workers(worker, parse_args(argv))


if __name__ == "__main__":
    main()
