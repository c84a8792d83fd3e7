#!/usr/bin/env python
"""The critical batch of the shapes detector, measured: steps to a target loss at several batch sizes, McCandlish's
fit through them, and the gradient noise scale the trainer measured online in the same runs.

    python bench/critical_batch.py                                  # batches 4..128, 2 workers (make scaling)
    python bench/critical_batch.py --batches 4,16,64 --reference-iters 200
    python bench/critical_batch.py --report-only                    # tables + figure from OUTPUT again

The runs: ``configs/shapes/sgd.yaml`` (SGD, momentum 0.9, plain BN per worker, so that the workers' gradients
are independent and the noise scale unbiased) at the study's 64 px input (anchors halved with it), the LR set by
MegDet's linear rule from 0.02 at batch 16, a linear warm-up over 800 images, then constant (no decay: the target
is reached on the way). Batch B runs as 2 workers x min(B / 2, --max-per-worker) images, the rest by gradient
accumulation. MONITOR.PERIOD 1: the monitor records the total loss and measures the noise scale every iteration.

1. The reference batch (16) trains --reference-iters iterations; the target is its training loss at the end, the
   mean over the last window of about --window-images images (the same number of images at every batch, since the
   noise of a batch's loss falls with the batch).
2. Every batch trains until its windowed loss reaches the target (then SIGTERM: it checkpoints and stops), or a
   budget of 1.5x the reference's steps x max(1, 16 / B); the step counted is the centre of the first window at or
   below the target (``largebatch.analysis.scaling.steps_to_target``).
3. ``fit_tradeoff``: S = S_min + E_min / B by least squares (McCandlish eq. 2.11), B_crit = E_min / S_min, over
   the batches that trained at the linear rule's LR (a batch whose LR had to be backed off, x0.5 then x0.25, because
   the run diverged, is shown but not fitted: the trade-off assumes each batch at a good LR); beside it the online
   B_noise (``noise_scale/all``, averaged) of each run where it reached the target.

Writes OUTPUT/critical_batch.md, .json and .png (steps against batch with the fitted curve; the online noise
scale against images seen), OUTPUT defaulting to output/critical_batch. Each run's OUTPUT_DIR is OUTPUT/b<B>.
"""
import argparse
import json
import math
import os
import re
import shlex
import sys
import time
from typing import List, Optional

from harness import REPO, markdown_table, train_net

from largebatch.analysis.metrics import read_layer_stats
from largebatch.analysis.plots import pyplot, save
from largebatch.analysis.scaling import fit_tradeoff, predicted_steps, smoothing_window, steps_to_target, window_mean
from largebatch.files import atomic_write

DIVERGED = re.compile(r"Training diverged at iteration (\d+)")
CONFIG = "configs/shapes/sgd.yaml"
REFERENCE_BATCH, REFERENCE_LR, WARMUP_IMAGES, MIN_WARMUP_ITERS = 16, 0.02, 800, 20
#: the linear rule's LR, then these fractions of it, until a run does not diverge (McCandlish compare each batch at
#: a learning rate that works for it)
LR_FACTORS = (1.0, 0.5, 0.25)
# the study's input size (configs/shapes/study/Base-Study.yaml): 64 px, anchors halved with it
COMMON = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
          "INPUT.MAX_SIZE_TEST", "64", "MODEL.ANCHOR_GENERATOR.SIZES", "[[8], [16], [32], [64], [128]]",
          "SOLVER.LR_SCALING.RULE", "linear",
          "SOLVER.LR_SCALING.REFERENCE_BATCH", str(REFERENCE_BATCH), "SOLVER.STEPS", "()",
          "SOLVER.WARMUP_METHOD", "linear", "SOLVER.CHECKPOINT_PERIOD", "100000000", "DATASETS.TEST", "()",
          "TEST.EVAL_PERIOD", "0", "MONITOR.PERIOD", "1", "MONITOR.PER_LAYER", "True"]


def run_options(batch: int, workers: int, max_per_worker: int, max_iter: int, lr_factor: float) -> List[str]:
    per_worker = batch // workers
    accumulate = max(1, math.ceil(per_worker / max_per_worker))
    if per_worker % accumulate or batch % workers:
        raise SystemExit(f"batch {batch}: not {workers} workers x whole micro-batches of <= {max_per_worker} images")
    return [*COMMON, "SOLVER.IMS_PER_BATCH", str(batch // accumulate), "SOLVER.ACCUMULATE_STEPS", str(accumulate),
            "SOLVER.BASE_LR", f"{REFERENCE_LR * lr_factor:g}", "SOLVER.WARMUP_ITERS", str(warmup_iters(batch)),
            "SOLVER.MAX_ITER", str(max_iter)]


def warmup_iters(batch: int) -> int:
    """The linear warm-up: over WARMUP_IMAGES images, and at least MIN_WARMUP_ITERS steps."""
    return max(MIN_WARMUP_ITERS, round(WARMUP_IMAGES / batch))


def losses_and_noise(out: str):
    """(iteration, total loss) of every iteration recorded, and (iteration, averaged B_noise of the whole model)."""
    _, records = read_layer_stats(os.path.join(out, "layer_stats.jsonl"))
    losses = [(r["iter"], r["explosion_check"]["total_loss"]) for r in records
              if isinstance(r.get("explosion_check"), dict) and r["explosion_check"].get("total_loss") is not None]
    noise = [(r["iter"], r["noise_scale"]["all"]) for r in records
             if isinstance(r.get("noise_scale"), dict) and r["noise_scale"].get("all") is not None]
    return losses, noise


def measure(batch: int, max_iter: int, target: Optional[float], window: int, out_root: str, args) -> dict:
    """One batch: the linear rule's LR, backed off by LR_FACTORS while the run diverges (the explosion guard or a
    non-finite loss stops it). A run already in OUTPUT with the same options is reused."""
    diverged = []
    for factor in LR_FACTORS:
        out = os.path.join(out_root, f"b{batch}" + ("" if factor == 1 else f"_lr{factor:g}"))
        opts = run_options(batch, args.num_workers, args.max_per_worker, max_iter, factor)
        cached = os.path.join(out, "result.json")
        if os.path.isfile(cached):
            with open(cached) as f:
                run = json.load(f)
            if run.get("opts") == opts and run.get("target") == target:
                print(f"[critical_batch] batch {batch}: reusing {out}", flush=True)
                return with_target(run, target)

        def reached() -> bool:
            return target is not None and steps_to_target(losses_and_noise(out)[0], target, window) is not None

        t0 = time.perf_counter()
        rc, log = train_net(out, CONFIG, opts, args.num_workers, args.python, stop_when=reached, poll_s=1.0)
        if rc not in (0, 75):  # 75: stopped by SIGTERM once the target was reached
            found = DIVERGED.search(log)
            if not found:
                raise SystemExit(f"[critical_batch] batch {batch}: train_net.py exited with {rc}; see {out}/train.log")
            diverged.append({"lr": REFERENCE_LR * factor * batch / REFERENCE_BATCH, "at": int(found.group(1))})
            print(f"[critical_batch] batch {batch}: LR x{factor:g} diverged at iteration {found.group(1)}", flush=True)
            continue
        losses, noise = losses_and_noise(out)
        run = {"batch": batch, "max_iter": max_iter, "window": window, "iterations": len(losses), "losses": losses,
               "noise": noise, "wall_s": round(time.perf_counter() - t0, 1), "opts": opts, "target": target,
               "lr": REFERENCE_LR * factor * batch / REFERENCE_BATCH, "diverged": diverged}
        atomic_write(cached, lambda f: json.dump(run, f))
        return with_target(run, target)
    return {"batch": batch, "max_iter": max_iter, "window": window, "iterations": 0, "losses": [], "noise": [],
            "wall_s": 0.0, "lr": None, "diverged": diverged, "steps": None, "images": None, "noise_at_target": None}


def with_target(run: dict, target: Optional[float]) -> dict:
    """The run with its steps (and images) to ``target`` and the online B_noise at that step."""
    steps = steps_to_target(run["losses"], target, run["window"]) if target is not None else None
    noise_at = None
    if steps is not None and run["noise"]:
        noise_at = min(run["noise"], key=lambda n: abs(n[0] + 1 - steps))[1]
    run = dict(run, steps=steps, images=steps * run["batch"] if steps is not None else None, noise_at_target=noise_at)
    print(f"[critical_batch] batch {run['batch']}: {run['iterations']} iterations, steps to target {steps}, B_noise "
          f"there {noise_at} ({run['wall_s']:.0f} s)", flush=True)
    return run


def report(data: dict, command: str) -> str:
    runs = sorted(data["runs"], key=lambda r: r["batch"])
    reached = [r for r in runs if r["steps"] is not None and not r.get("diverged")]
    lines = ["# The critical batch of the shapes detector: measured, and predicted online", "", f"`{command}`", "",
             f"`{CONFIG}` at 64 px, SGD at 0.02 x B / 16 (MegDet's linear rule; x0.5, x0.25 where a run diverged), "
             f"linear warm-up over {WARMUP_IMAGES} images (at least {MIN_WARMUP_ITERS} steps), then constant; "
             f"{data['num_workers']} CPU workers, plain BN per worker. Target: the training loss of batch "
             f"{REFERENCE_BATCH} after {data['reference_iters']} iterations, "
             f"{data['target']:.4f} (mean over a window of about {data['window_images']} images at every batch).",
             ""]
    rows = []
    for r in runs:
        tried = "; ".join(f"{d['lr']:.3g} diverged at {d['at']}" for d in r.get("diverged", []))
        lr = f"{r['lr']:.3g}" if r.get("lr") is not None else "-"
        rows.append([r["batch"], lr + (f" ({tried})" if tried else ""), r["window"], r["iterations"],
                     f"{r['steps']:.1f}" if r["steps"] is not None else f"not reached in {r['max_iter']}",
                     f"{r['images']:.0f}" if r["images"] is not None else "-",
                     f"{r['noise_at_target']:.3g}" if r["noise_at_target"] is not None else "-"])
    lines += [markdown_table(["batch B", "LR (linear rule, backed off where it diverged)", "window (iterations)",
                              "iterations run", "steps S to the target", "images E = B S",
                              "online B_noise there (images)"], rows, right=(0, 2, 3, 4, 5, 6)), ""]
    fit = data.get("fit")
    if fit:
        noises = [r["noise_at_target"] for r in reached if r["noise_at_target"] is not None]
        lines += [f"Fit of S = S_min + E_min / B (McCandlish eq. 2.11) over the {len(reached)} batches trained at the "
                  f"linear rule's LR ({', '.join(str(r['batch']) for r in reached)}): S_min "
                  f"{fit['s_min']:.1f} steps, E_min {fit['e_min']:.0f} images, **measured B_crit = E_min / S_min = "
                  f"{fit['b_crit']:.1f} images**; the online noise scale B_noise at the target: "
                  + (f"{min(noises):.3g} to {max(noises):.3g} images (median {sorted(noises)[len(noises) // 2]:.3g})"
                     if noises else "not measured") + ".", ""]
    elif data.get("fit_error"):
        lines += [f"No fit: {data['fit_error']}", ""]
    lines += ["![steps against batch, and the online noise scale](critical_batch.png)", ""]
    return "\n".join(lines)


def plot(data: dict, path: str) -> str:
    plt = pyplot()
    runs = sorted(data["runs"], key=lambda r: r["batch"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    linear = [r for r in runs if r["steps"] is not None and not r.get("diverged")]
    backed_off = [r for r in runs if r["steps"] is not None and r.get("diverged")]
    left.plot([r["batch"] for r in linear], [r["steps"] for r in linear], "o", color="C0",
              label="measured, linear-rule LR (fitted)")
    if backed_off:
        left.plot([r["batch"] for r in backed_off], [r["steps"] for r in backed_off], "s", mfc="none", color="C3",
                  label="measured, LR backed off (it diverged)")
    fit = data.get("fit")
    if fit:
        bs = [2 ** (k / 4) for k in range(int(4 * math.log2(min(r["batch"] for r in runs))) - 4,
                                          int(4 * math.log2(max(r["batch"] for r in runs))) + 5)]
        left.plot(bs, predicted_steps(fit["s_min"], fit["e_min"], bs), "-", color="C1",
                  label=f"S_min + E_min / B (B_crit {fit['b_crit']:.0f})")
        left.axvline(fit["b_crit"], color="C1", ls=":", lw=1)
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("batch B (images)")
    left.set_ylabel("steps to the target loss")
    left.set_title("Steps to the target loss (McCandlish eq. 2.11 fit)")
    left.legend(fontsize=8)
    for i, r in enumerate(runs):
        if r["noise"]:
            right.plot([(it + 1) * r["batch"] for it, _ in r["noise"]], [v for _, v in r["noise"]], lw=1,
                       color=f"C{i % 10}", label=f"B = {r['batch']}")
    if fit:
        right.axhline(fit["b_crit"], color="k", ls=":", lw=1, label="measured B_crit")
    right.set_yscale("log")
    right.set_xlabel("images seen")
    right.set_ylabel("B_noise (images)")
    right.set_title("Online gradient noise scale, whole model")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="output/critical_batch")
    p.add_argument("--batches", default="4,8,16,32,64,128", help="batch sizes (default 4,8,16,32,64,128)")
    p.add_argument("--reference-iters", type=int, default=300,
                   help=f"iterations of the batch-{REFERENCE_BATCH} run that sets the target (default 300)")
    p.add_argument("--window-images", type=int, default=256, help="images in the loss-smoothing window (256)")
    p.add_argument("--max-per-worker", type=int, default=16, help="images per worker and micro-batch (16)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--report-only", action="store_true", help="rebuild the report from OUTPUT/critical_batch.json")
    args = p.parse_args(argv)
    out_root = os.path.abspath(args.output)
    os.makedirs(out_root, exist_ok=True)
    os.environ.setdefault("LARGEBATCH_DATASETS", os.path.join(REPO, "datasets"))
    command = "python bench/critical_batch.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    saved = os.path.join(out_root, "critical_batch.json")
    if args.report_only:
        with open(saved) as f:
            data = json.load(f)
    else:
        batches = sorted({int(b) for b in args.batches.split(",") if b.strip()} | {REFERENCE_BATCH})
        window = smoothing_window(REFERENCE_BATCH, args.window_images)
        reference = measure(REFERENCE_BATCH, args.reference_iters, None, window, out_root, args)
        target = window_mean([v for _, v in reference["losses"][-window:]])
        runs = []
        for b in batches:
            if b == REFERENCE_BATCH:  # its own run: the target is where it ended, reached there or before
                runs.append(with_target(reference, target))
                continue
            budget = math.ceil(1.5 * args.reference_iters * max(1.0, REFERENCE_BATCH / b))
            runs.append(measure(b, budget, target, smoothing_window(b, args.window_images), out_root, args))
        data = {"runs": runs, "target": target, "reference_iters": args.reference_iters,
                "window_images": args.window_images, "num_workers": args.num_workers}
    # the fit: the runs at the linear rule's LR (a backed-off LR is not the batch's best one, which McCandlish's
    # trade-off assumes: those runs are shown, not fitted)
    reached = [r for r in data["runs"] if r["steps"] is not None and not r.get("diverged")]
    try:
        s_min, e_min, b_crit = fit_tradeoff([r["batch"] for r in reached], [r["steps"] for r in reached])
        data["fit"] = {"s_min": s_min, "e_min": e_min, "b_crit": b_crit}
    except ValueError as e:
        data["fit"], data["fit_error"] = None, str(e)
    text = report(data, command.strip())
    atomic_write(saved, lambda f: json.dump(data, f))
    atomic_write(os.path.join(out_root, "critical_batch.md"), lambda f: f.write(text))
    plot(data, os.path.join(out_root, "critical_batch.png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
