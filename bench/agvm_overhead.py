#!/usr/bin/env python
"""Iteration time of training with AGVM against the same training without it, side by side in one run.

    python bench/agvm_overhead.py                        # 2 CPU workers (gloo), shapes Faster R-CNN, tau = 10
    python bench/agvm_overhead.py --workers 2 --rounds 10 --interval 10 SOLVER.IMS_PER_BATCH 16

Every worker builds two LargeBatchTrainers from configs/shapes/sgd.yaml (MONITOR off, so that only AGVM
differs): one with SOLVER.AGVM.ENABLED (START_ITER 0, INTERVAL tau), one without, each with its own model,
DDP wrapper and data loader, in the same process group. After a warm-up, rounds of tau iterations alternate
between the two (ABBA order, so a drift of the machine's load hits both alike); a round of the AGVM trainer
holds exactly one measurement iteration (the no_sync backward, the half-group and global all-reduces of one
flat bucket, Phi, the mu update). Each timed iteration is the trainer's run_step() plus the LR scheduler
step (what the training loop does besides hooks). The table gives, over rounds, the median of the mean
iteration time within a round, and the median of the ratio of adjacent AGVM / plain rounds; the target is
<= 1.02x at tau = 10. "measurement" / "other" split the AGVM trainer's iterations, and "estimate" is the
overhead implied by them: (measurement - other) / (tau * plain) + (other - plain) / plain.
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
    from largebatch.engine.setup import load_config, register_datasets

    logging.getLogger("detectron2").setLevel(logging.WARNING)
    logging.getLogger("largebatch").setLevel(logging.WARNING)
    logging.getLogger("fvcore").setLevel(logging.WARNING)
    common = [
        "MONITOR.ENABLED", "False", "SOLVER.MAX_ITER", "100000", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()",
        "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", os.path.join(tempfile.gettempdir(), "largebatch_bench_agvm"),  # nothing is written
    ]
    agvm = ["SOLVER.AGVM.ENABLED", "True", "SOLVER.AGVM.START_ITER", "0", "SOLVER.AGVM.INTERVAL", str(args.interval)]
    trainers = {}
    for name, extra in (("AGVM", agvm), ("plain", [])):
        cfg = load_config(args.config_file, common + list(args.opts) + extra, args.workers)
        register_datasets(cfg)
        torch.manual_seed(cfg.SEED)  # same initial weights for both
        trainers[name] = LargeBatchTrainer(cfg)
    counters = {name: 0 for name in trainers}
    times = {name: [] for name in trainers}  # per round: list of per-iteration seconds
    measured = {name: [] for name in trainers}  # per iteration: was it a measurement iteration

    def run(name, iterations, record):
        trainer, stepper = trainers[name], trainers[name]._trainer
        comm.synchronize()
        per_iter = []
        for _ in range(iterations):
            it = counters[name]
            storage.iter = it
            trainer.iter = it
            start = time.perf_counter()
            trainer.run_step()
            trainer.scheduler.step()
            per_iter.append(time.perf_counter() - start)
            if record:
                measured[name].append(stepper.is_measurement_iter(it))
            counters[name] += 1
        comm.synchronize()
        if record:
            times[name].append(per_iter)

    with EventStorage(0) as storage:
        for name in trainers:
            run(name, args.warmup, record=False)
        for r in range(args.rounds):
            order = ("AGVM", "plain") if r % 2 == 0 else ("plain", "AGVM")
            for name in order:
                run(name, args.interval, record=True)
            if comm.is_main_process():
                print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{n} {statistics.mean(times[n][-1]):.3f} s/it" for n in trainers), flush=True)
    if comm.is_main_process():
        report(args, times, measured, trainers["AGVM"]._trainer.optimizer.mu)


def report(args, times, measured, mu):
    median = statistics.median
    round_means = {n: [statistics.mean(r) for r in rounds] for n, rounds in times.items()}
    ratios = [a / p for a, p in zip(round_means["AGVM"], round_means["plain"])]
    flat = {n: [t for r in rounds for t in r] for n, rounds in times.items()}
    meas = [t for t, m in zip(flat["AGVM"], measured["AGVM"]) if m]
    other = [t for t, m in zip(flat["AGVM"], measured["AGVM"]) if not m]
    plain = median(flat["plain"])
    estimate = (median(meas) - median(other)) / (args.interval * plain) + (median(other) - plain) / plain
    print()
    print(f"{args.workers} CPU workers (gloo), {args.config_file} {' '.join(args.opts)}, tau = {args.interval}, "
          f"{args.rounds} rounds x {args.interval} iterations each, warm-up {args.warmup}")
    print()
    print("| run | median s/iter (round means) | min | max | iterations |")
    print("| --- | --- | --- | --- | --- |")
    for n in ("plain", "AGVM"):
        m = round_means[n]
        print(f"| {n} | {median(m):.4f} | {min(m):.4f} | {max(m):.4f} | {len(flat[n])} |")
    print()
    print("| ratio AGVM / plain | value |")
    print("| --- | --- |")
    print(f"| median of round medians | {median(round_means['AGVM']) / median(round_means['plain']):.4f}x |")
    print(f"| median of adjacent-round ratios | {median(ratios):.4f}x |")
    print(f"| AGVM measurement iteration (median s) | {median(meas):.4f} ({len(meas)} iterations) |")
    print(f"| AGVM other iterations (median s) | {median(other):.4f} |")
    print(f"| plain iterations (median s) | {plain:.4f} |")
    print(f"| estimate from the medians | {1 + estimate:.4f}x |")
    print()
    print("mu at the end: " + ", ".join(f"{k} {v:.4f}" for k, v in mu.items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=os.path.join(REPO, "configs", "shapes", "sgd.yaml"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--interval", type=int, default=10, help="tau: AGVM measures every this many iterations")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of tau iterations per trainer")
    parser.add_argument("--warmup", type=int, default=10, help="untimed iterations per trainer first")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    if args.warmup % args.interval:
        parser.error("--warmup must be a multiple of --interval (one measurement per timed round)")
    os.environ.setdefault("LARGEBATCH_DATASETS", os.path.join(REPO, "datasets"))
    from largebatch import launch

    launch(_worker, args.workers, args=(args,))


if __name__ == "__main__":
    main()
