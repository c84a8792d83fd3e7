#!/usr/bin/env python
"""Where the explosion guard stops a diverging run, and how close healthy runs come to its factor.

The guard (``MONITOR.EXPLOSION_FACTOR``, largebatch/engine/divergence.py) stops training when the total loss or
the global gradient norm exceeds the factor times its median over the last ``MONITOR.EXPLOSION_WINDOW``
iterations. This measures, with the guard measuring but not stopping (``MONITOR.EXPLOSION_FACTOR 0.0``; the
monitor records its ratio every iteration in layer_stats.jsonl, ``MONITOR.PERIOD 1``):

- diverging runs: ``configs/shapes/sgd.yaml`` at ``SOLVER.BASE_LR 0.3`` (15x the recipe's, warm-up over 50
  iterations), one per seed, each until its values turn non-finite (the trainer's own check, which names the
  iteration). For each factor F: the iteration the guard would stop at (the first ratio above F) and how many
  iterations that is before the non-finite one;
- healthy runs (the recipe's LR): the highest ratio they reach, in and after the warm-up. A factor below it
  would have stopped a healthy run.

    python bench/explosion_guard.py                       # 6 diverging seeds + 2 healthy runs, 2 workers
    python bench/explosion_guard.py --seeds 1,2 --healthy-iters 60

Writes OUTPUT/explosion_guard.md (the tables) and explosion_guard.json (every ratio); OUTPUT defaults to
output/explosion_guard.
"""
import argparse
import json
import os
import re
import shlex
import sys
import time
from typing import List, Optional

from harness import REPO, markdown_table, train_net

from largebatch.analysis.metrics import read_layer_stats
from largebatch.files import atomic_write

DIVERGING = ("configs/shapes/sgd.yaml", ["SOLVER.BASE_LR", "0.3"])
HEALTHY = {"sgd.yaml (SGD 0.02, batch 16)": "configs/shapes/sgd.yaml",
           "demo.yaml (SGD + AGVM + SyncBN, batch 32)": "configs/shapes/demo.yaml"}
# the guard measures, nothing else stops the run early, a record every iteration, no evaluation / checkpoint
MEASURE = ["MONITOR.EXPLOSION_FACTOR", "0.0", "MONITOR.DIVERGENCE_FACTOR", "0.0", "MONITOR.PERIOD", "1",
           "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "1000000"]
NON_FINITE = re.compile(r"Training diverged at iteration (\d+): non-finite|Inf/NaN|became infinite or NaN")


def measure(name: str, config: str, opts: List[str], out_root: str, args) -> dict:
    """One run with the guard measuring: its ratio and total loss per iteration, and where it turned
    non-finite (None if it did not)."""
    out = os.path.join(out_root, re.sub(r"\W+", "_", name).strip("_"))
    t0 = time.perf_counter()
    rc, log = train_net(out, config, [*opts, *MEASURE], args.num_workers, args.python)
    _, records = read_layer_stats(os.path.join(out, "layer_stats.jsonl"))
    checks = [(r["iter"], r["explosion_check"]) for r in records if "explosion_check" in r]
    non_finite = None
    if rc != 0:
        found = NON_FINITE.search(log)
        if not found:
            raise SystemExit(f"[explosion_guard] {name}: train_net.py exited with {rc}; see {out}/train.log")
        # the trainer names the iteration; detectron2's own NaN checks do not: the first one not recorded
        non_finite = int(found.group(1)) if found.group(1) else (checks[-1][0] + 1 if checks else 0)
    run = {"name": name, "config": config, "opts": opts, "non_finite": non_finite,
           "iters": [it for it, _ in checks], "ratio": [c["explosion_ratio"] for _, c in checks],
           "total_loss": [c["total_loss"] for _, c in checks], "grad_norm": [c["grad_norm"] for _, c in checks],
           "wall_s": round(time.perf_counter() - t0, 1)}
    print(f"[explosion_guard] {name}: {len(checks)} iterations, non-finite at {non_finite}, max ratio "
          f"{max((r for r in run['ratio'] if r is not None), default=0):.3g} ({run['wall_s']:.0f} s)", flush=True)
    return run


def first_above(run: dict, factor: float) -> Optional[int]:
    """The iteration at which a guard of this factor stops the run (None: never)."""
    return next((it for it, r in zip(run["iters"], run["ratio"]) if r is not None and r > factor), None)


def max_ratio(run: dict, start: int = 0) -> tuple:
    """(highest ratio, its iteration) from iteration ``start`` on."""
    return max(((r, it) for it, r in zip(run["iters"], run["ratio"]) if r is not None and it >= start),
               default=(0.0, None))


def report(diverging: List[dict], healthy: List[dict], args, command: str) -> str:
    factors = args.factors
    rows = []
    for run in diverging:
        cells = [run["name"], run["non_finite"] if run["non_finite"] is not None else "never"]
        for f in factors:
            stop = first_above(run, f)
            if stop is None:
                cells.append("-")
            else:
                before = f" ({run['non_finite'] - stop} before)" if run["non_finite"] is not None else ""
                i = run["iters"].index(stop)
                cells.append(f"{stop}{before}, loss {run['total_loss'][i]:.3g}")
        rows.append(cells)
    text = ["# The explosion guard: where it stops a diverging run, how close healthy runs come", "",
            f"`{command}`", "",
            f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPU cores, {args.num_workers} CPU "
            "workers over gloo, the guard measuring and not stopping (MONITOR.EXPLOSION_FACTOR 0.0). Ratio: the "
            "larger of total loss / its median and global gradient norm / its median over the last 20 "
            "iterations (MONITOR.EXPLOSION_WINDOW), judged from the 6th iteration on.", "",
            f"## Diverging: `{DIVERGING[0]} {' '.join(DIVERGING[1])}` (warm-up over 50 iterations)", "",
            "Each factor's cell: the iteration a guard of that factor stops at (before that iteration's step), how "
            "many iterations before the values turn non-finite, and the total loss there (about 2.3 at the "
            "start).", "",
            markdown_table(["seed", "non-finite at", *[f"factor {f:g}" for f in factors]], rows,
                           right=range(1, 2 + len(factors))), ""]
    rows = []
    for run in healthy:
        r_all, it_all = max_ratio(run)
        r_after, it_after = max_ratio(run, args.warmup)
        rows.append([run["name"], len(run["iters"]), f"{r_all:.2f} (iteration {it_all})",
                     f"{r_after:.2f} (iteration {it_after})", run["non_finite"] or "no"])
    if rows:
        text += ["## Healthy runs (the recipes' LR)", "",
                 markdown_table(["run", "iterations", "highest ratio", f"highest after iteration {args.warmup}",
                                 "non-finite?"], rows, right=(1,)), ""]
    stops = {f: [first_above(r, f) for r in diverging] for f in factors}
    highest = max((max_ratio(r)[0] for r in healthy), default=0.0)
    lines = []
    for f in factors:
        margins = [r["non_finite"] - s for r, s in zip(diverging, stops[f])
                   if s is not None and r["non_finite"] is not None]
        missed = sum(1 for r, s in zip(diverging, stops[f]) if s is None and r["non_finite"] is not None)
        lines.append(f"- factor {f:g}: stops {len(margins)} of {len(diverging)} diverging runs "
                     f"{min(margins, default=0)}-{max(margins, default=0)} iterations before they turn non-finite"
                     + (f", misses {missed}" if missed else "")
                     + ("; would have stopped a healthy run" if highest > f else
                        f"; {f / highest:.1f}x above the healthy runs' highest ratio" if highest else ""))
    text += ["## Summary", "", *lines, ""]
    return "\n".join(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="output/explosion_guard")
    p.add_argument("--seeds", default="1,2,3,4,5,6", help="seeds of the diverging run (default 1-6)")
    p.add_argument("--max-iter", type=int, default=60,
                   help="iterations of a diverging run at most (the LR schedule does not depend on it; default 60)")
    p.add_argument("--healthy-iters", type=int, default=200,
                   help="iterations of each healthy run (default 200; 0: none)")
    p.add_argument("--warmup", type=int, default=50, help="the healthy runs' warm-up, for the table (default 50)")
    p.add_argument("--factors", default="4,6,8,10,15", help="factors to report (default 4,6,8,10,15)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        args.factors = [float(f) for f in args.factors.split(",") if f.strip()]
    except ValueError:
        p.error("--seeds and --factors are comma-separated numbers")
    out_root = os.path.abspath(args.output)
    os.makedirs(out_root, exist_ok=True)
    os.environ.setdefault("LARGEBATCH_DATASETS", os.path.join(REPO, "datasets"))
    config, opts = DIVERGING
    # STEPS (): the recipe's steps (350, 450) lie beyond --max-iter; the warm-up is 50 iterations at any MAX_ITER
    diverging = [measure(f"seed {seed}", config, [*opts, "SEED", str(seed), "SOLVER.MAX_ITER", str(args.max_iter),
                                                  "SOLVER.STEPS", "()"], out_root, args) for seed in seeds]
    healthy = [measure(name, path, ["SOLVER.SCHEDULE_UNIT", "iter", "SOLVER.MAX_ITER", str(args.healthy_iters),
                                    "SOLVER.WARMUP_ITERS", str(args.warmup), "SOLVER.STEPS", "()"], out_root, args)
               for name, path in HEALTHY.items() if args.healthy_iters > 0]
    command = "python bench/explosion_guard.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = report(diverging, healthy, args, command.strip())
    atomic_write(os.path.join(out_root, "explosion_guard.md"), lambda f: f.write(text))
    atomic_write(os.path.join(out_root, "explosion_guard.json"),
                 lambda f: json.dump({"diverging": diverging, "healthy": healthy}, f))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
