#!/usr/bin/env python
"""Iteration time of training with AGVM against the same training without it, side by side in one run.

    python bench/agvm_overhead.py                   # 2 CPU workers (gloo), configs/shapes/sgd.yaml, tau = 10
    python bench/agvm_overhead.py --workers 2 --interval 10 --rounds 12 SOLVER.IMS_PER_BATCH 4 SOLVER.BASE_LR 0.005

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
and an upper bound from AGVM's own work, timed inside run_step on measurement iterations (the half-group and
global all-reduces of the flat bucket, writing the mean back, Phi, the broadcast, the mu update), which is
an upper bound because that iteration's backward skips DDP's own all-reduce: 1 + own work / (tau plain).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "projects"))


def _worker(args):
    import logging

    import torch
    from detectron2.utils import comm
    from detectron2.utils.events import EventStorage

    from largebatch import LargeBatchTrainer
    from largebatch.config import load_config
    from largebatch.data import register_datasets

    logging.disable(logging.INFO)  # the trainers' set-up logs (the model, twice per worker)
    common = [
        "MONITOR.ENABLED", "False", "SOLVER.MAX_ITER", "100000", "SOLVER.STEPS", "()",
        "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0",
        "OUTPUT_DIR", os.path.join(tempfile.gettempdir(), "largebatch_bench_agvm"),  # nothing is written there
    ]
    agvm = ["SOLVER.AGVM.ENABLED", "True", "SOLVER.AGVM.START_ITER", "0", "SOLVER.AGVM.INTERVAL", str(args.interval)]
    trainers = {}
    for name, extra in (("AGVM", agvm), ("plain", [])):
        cfg = load_config(args.config_file, common + list(args.opts) + extra, args.workers)
        register_datasets(cfg)
        torch.manual_seed(cfg.SEED)  # same initial weights for both
        trainers[name] = LargeBatchTrainer(cfg)
    machinery = []  # seconds of AGVM's own work in each measurement iteration: half-group reduce + Phi + mu
    spent = [0.0]  # that work within the current iteration
    stepper = trainers["AGVM"]._trainer
    timed = [(stepper, "_measure_variance")] + ([(stepper.reducer, "reduce")] if stepper.reducer else [])

    def timer(fn):
        def wrapped(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            spent[0] += time.perf_counter() - start
            return out
        return wrapped

    for owner, attr in timed:
        setattr(owner, attr, timer(getattr(owner, attr)))
    counters = {name: 0 for name in trainers}
    times = {name: [] for name in trainers}  # per round: list of per-iteration seconds
    measured = {name: [] for name in trainers}  # per iteration: was it a measurement iteration

    def step(name):
        trainer = trainers[name]
        it = counters[name]
        storage.iter = trainer.iter = it
        spent[0] = 0.0
        start = time.perf_counter()
        trainer.run_step()
        trainer.scheduler.step()
        counters[name] += 1
        return time.perf_counter() - start, trainer._trainer.is_measurement_iter(it)

    with EventStorage(0) as storage:
        for name in trainers:
            for _ in range(args.warmup):
                step(name)
        for r in range(args.rounds):
            # both compute on the same weights (and see the same data): the time AGVM's different trajectory
            # would add or save (e.g. in NMS) is not an overhead of AGVM's machinery
            with torch.no_grad():
                trainers["plain"].model.load_state_dict(trainers["AGVM"].model.state_dict())
            comm.synchronize()
            order = ("AGVM", "plain") if r % 2 == 0 else ("plain", "AGVM")
            rounds = {name: [] for name in trainers}
            for _ in range(args.interval):  # one iteration of each in turn: load changes hit both alike
                for name in order:
                    seconds, was_measured = step(name)
                    rounds[name].append(seconds)
                    measured[name].append(was_measured)
                    if name == "AGVM" and was_measured:
                        machinery.append(spent[0])
            for name in trainers:
                times[name].append(rounds[name])
            if comm.is_main_process():
                print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{n} {statistics.mean(times[n][-1]):.3f} s/it" for n in trainers), flush=True)
    if comm.is_main_process():
        report(args, times, measured, machinery, trainers["AGVM"]._trainer.optimizer.mu)
        if args.json:
            import json

            with open(args.json, "w") as f:
                json.dump({"times": times, "measured": measured, "machinery": machinery,
                           "interval": args.interval}, f)


def report(args, times, measured, machinery, mu):
    median = statistics.median
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
    print(f"{args.workers} CPU workers (gloo), {os.path.relpath(args.config_file, REPO)} {' '.join(args.opts)}, "
          f"tau = {args.interval}, {args.rounds} rounds of {args.interval} iterations of each (interleaved), "
          f"warm-up {args.warmup}")
    print()
    print("| run | median s/iter (round means) | mean s/iter | iterations |")
    print("| --- | --- | --- | --- |")
    for n in ("plain", "AGVM"):
        print(f"| {n} | {median(round_means[n]):.4f} | {statistics.mean(flat[n]):.4f} | {len(flat[n])} |")
    print()
    print("| AGVM / plain | ratio |")
    print("| --- | --- |")
    print(f"| median of the per-round ratios | {median(ratios):.4f}x |")
    print(f"| total time | {sum(flat['AGVM']) / sum(flat['plain']):.4f}x |")
    print(f"| paired estimate: 1 + (extra_measurement + (tau - 1) x extra_other) / (tau x plain) | "
          f"{1 + estimate:.4f}x |")
    if machinery and args.workers > 1:  # on one worker the cost is the second backward pass: not timed here
        bound = median(machinery) / (args.interval * plain)
        print(f"| upper bound from AGVM's own work in run_step: 1 + (half-group reduce + Phi + mu) / (tau x plain) | "
              f"{1 + bound:.4f}x |")
    print()
    print(f"median extra seconds of an AGVM iteration over the plain one next to it: measurement "
          f"{extra_m:+.4f} s ({len(extra_measure)}), other {median(extra_other):+.4f} s; median plain "
          f"iteration {plain:.4f} s" + (f"; AGVM's own work {1000 * median(machinery):.1f} ms per measurement"
                                         if machinery else ""))
    print("mu at the end: " + ", ".join(f"{k} {v:.4f}" for k, v in mu.items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=os.path.join(REPO, "configs", "shapes", "sgd.yaml"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--interval", type=int, default=10, help="tau: AGVM measures every this many iterations")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of tau iterations per trainer")
    parser.add_argument("--warmup", type=int, default=10, help="untimed iterations per trainer first")
    parser.add_argument("--json", default="", help="also write the per-iteration times to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    if args.warmup % args.interval:
        parser.error("--warmup must be a multiple of --interval (one measurement per timed round)")
    os.environ.setdefault("LARGEBATCH_DATASETS", os.path.join(REPO, "datasets"))
    from largebatch import launch

    launch(_worker, args.workers, args=(args,))


if __name__ == "__main__":
    main()
