#!/usr/bin/env python
"""Iteration time of training with AGVM against the same training without it, side by side in one run.

    python bench/agvm_overhead.py                   # 2 CPU workers (gloo), configs/shapes/sgd.yaml, tau = 10
    python bench/agvm_overhead.py --num-workers 2 --interval 10 --rounds 12 SOLVER.IMS_PER_BATCH 4 SOLVER.BASE_LR 0.005

Every worker builds two LargeBatchTrainers from the config (MONITOR off, so that only AGVM differs): one with
SOLVER.AGVM.ENABLED (START_ITER 0, INTERVAL tau), one without, each with its own model, DDP wrapper and data
loader (same seed, same data), in the same process group. After a warm-up of each, the timed rounds run tau
iterations of each trainer, interleaved one by one (AGVM first in even rounds, plain first in odd ones), so
that the load of a shared machine hits both alike; a round of the AGVM trainer holds exactly one measurement
iteration (the no_sync backward, the half-group and global all-reduces of one flat bucket, Phi, the mu
update). A timed iteration is the trainer's run_step() plus the LR scheduler step (the training loop without
its hooks). Before each round the plain model gets the AGVM model's weights, so both compute on the same
weights and data (AGVM's different trajectory is not its overhead). Reported: the median over rounds of the
mean iteration time of a round; AGVM / plain as the median of the per-round ratios and as the ratio of the
total times (target: <= 1.02x at tau = 10); and a paired estimate from the medians of the differences
between an AGVM iteration and the plain one next to it, split into measurement and other iterations (the
least sensitive to the load of a shared machine): 1 + (extra_measurement + (tau - 1) extra_other) / (tau plain);
and an upper bound from AGVM's own work on measurement iterations, timed around the stepper's public calls
(``reducer.reduce``: the half-group and global all-reduces of the flat bucket and writing the mean back;
``measure_variance``: Phi and its broadcast; ``AGVM.update``: the mu update), which is an upper bound because
that iteration's backward skips DDP's own all-reduce: 1 + own work / (tau plain).
"""
import argparse
import statistics

import harness


def worker(args, out_root):
    import torch
    from detectron2.utils import comm

    harness.quiet()
    harness.set_threads(args.threads)
    agvm = ["SOLVER.AGVM.ENABLED", "True", "SOLVER.AGVM.START_ITER", "0", "SOLVER.AGVM.INTERVAL", str(args.interval)]
    runs = harness.build_runs(args, out_root, {"AGVM": agvm, "plain": []},
                              common=["MONITOR.ENABLED", "False", "SOLVER.STEPS", "()"], hooks=False)
    # AGVM's own work in each measurement iteration: half-group reduce + Phi + mu, all public calls
    stepper = runs["AGVM"].stepper
    own_work = harness.CallTimer()
    for owner, name in [(stepper, "measure_variance"), (stepper.agvm, "update")] + (
            [(stepper.reducer, "reduce")] if stepper.reducer is not None else []):
        own_work.wrap(owner, name)
    machinery = []  # seconds of that work per measurement iteration
    times = {name: [] for name in runs}  # per round: list of per-iteration seconds
    measured = {name: [] for name in runs}  # per iteration: was it a measurement iteration
    for run in runs.values():
        for _ in range(args.warmup):
            run.step()
    own_work.take()
    for r in range(args.rounds):
        # both compute on the same weights (and see the same data): the time AGVM's different trajectory
        # would add or save (e.g. in NMS) is not an overhead of AGVM's machinery
        with torch.no_grad():
            runs["plain"].trainer.model.load_state_dict(runs["AGVM"].trainer.model.state_dict())
        rounds = {name: [] for name in runs}
        for _ in range(args.interval):  # one iteration of each in turn: load changes hit both alike
            for name, it in harness.interleave(runs, flip=r % 2 == 1).items():
                was_measured = runs[name].stepper.is_measurement_iter(it)
                rounds[name].append(runs[name].wall[it])
                measured[name].append(was_measured)
                if name == "AGVM":
                    spent = own_work.take()
                    if was_measured:
                        machinery.append(spent)
        for name in runs:
            times[name].append(rounds[name])
        if comm.is_main_process():
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {statistics.mean(times[n][-1]):.3f} s/it" for n in runs), flush=True)
    if comm.is_main_process():
        report(args, times, measured, machinery, stepper.agvm.mu)
        harness.write_json(args.json, {"times": times, "measured": measured, "machinery": machinery,
                                       "interval": args.interval})


def report(args, times, measured, machinery, mu):
    median = harness.median
    round_means = {n: [statistics.mean(r) for r in rounds] for n, rounds in times.items()}
    ratios = [a / p for a, p in zip(round_means["AGVM"], round_means["plain"])]
    flat = {n: [t for r in rounds for t in r] for n, rounds in times.items()}
    plain = median(flat["plain"])
    # iteration i of the AGVM trainer ran right next to iteration i of the plain one: pair them
    pairs = list(zip(flat["AGVM"], flat["plain"], measured["AGVM"]))
    extra_measure = [a - p for a, p, m in pairs if m]
    extra_other = [a - p for a, p, m in pairs if not m]
    extra_m = median(extra_measure) if extra_measure else float("nan")  # none if START_ITER is past the rounds
    estimate = (extra_m + (args.interval - 1) * median(extra_other)) / (args.interval * plain)
    print()
    print(f"{args.num_workers} CPU workers (gloo), {harness.config_name(args.config_file)} {' '.join(args.opts)}, "
          f"tau = {args.interval}, {args.rounds} rounds of {args.interval} iterations of each (interleaved), "
          f"warm-up {args.warmup}")
    print()
    print(harness.markdown_table(
        ["run", "median s/iter (round means)", "mean s/iter", "iterations"],
        [[n, f"{median(round_means[n]):.4f}", f"{statistics.mean(flat[n]):.4f}", len(flat[n])]
         for n in ("plain", "AGVM")]))
    print()
    rows = [["median of the per-round ratios", f"{median(ratios):.4f}x"],
            ["total time", f"{sum(flat['AGVM']) / sum(flat['plain']):.4f}x"],
            ["paired estimate: 1 + (extra_measurement + (tau - 1) x extra_other) / (tau x plain)",
             f"{1 + estimate:.4f}x"]]
    if machinery and args.num_workers > 1:  # on one worker the cost is the second backward pass: not timed here
        bound = median(machinery) / (args.interval * plain)
        rows.append(["upper bound from AGVM's own work: 1 + (half-group reduce + Phi + mu) / (tau x plain)",
                     f"{1 + bound:.4f}x"])
    print(harness.markdown_table(["AGVM / plain", "ratio"], rows))
    print()
    print(f"median extra seconds of an AGVM iteration over the plain one next to it: measurement "
          f"{extra_m:+.4f} s ({len(extra_measure)}), other {median(extra_other):+.4f} s; median plain "
          f"iteration {plain:.4f} s" + (f"; AGVM's own work {1000 * median(machinery):.1f} ms per measurement"
                                         if machinery else ""))
    print("mu at the end: " + ", ".join(f"{k} {v:.4f}" for k, v in mu.items()))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_config_args(parser, num_workers=2)
    harness.add_threads_arg(parser)
    parser.add_argument("--interval", type=int, default=10, help="tau: AGVM measures every this many iterations")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of tau iterations per trainer")
    parser.add_argument("--warmup", type=int, default=10, help="untimed iterations per trainer first")
    harness.add_json_arg(parser, "the per-iteration times")
    harness.add_overrides(parser)
    args = parser.parse_args(argv)
    if args.warmup % args.interval:
        parser.error("--warmup must be a multiple of --interval (one measurement per timed round)")
    return args


def main(argv=None):
    harness.launch_workers(worker, parse_args(argv))


if __name__ == "__main__":
    main()
