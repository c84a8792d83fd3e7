#!/usr/bin/env python
"""How far a detector's batch can grow before more GPUs stop paying, from a short run's gradient noise scale.

    python tools/plan_batch.py OUTPUT_DIR [--gpus 1,2,4,...,1024] [--images-per-gpu N] [--comm-ms 5]

Reads the run's metrics.json: the whole model's gradient noise scale at the last record (``noise_scale/all``,
McCandlish et al.'s B_simple, which the trainer measures on its gradient-variance iterations) and the median step
time (detectron2's ``time``), and prints, per GPU count, the batch, the predicted steps and images to the same loss
(relative to their minima) and the predicted wall-clock speed-up. It is a model (``largebatch.analysis.planner``
says what it assumes); the step time is the run's own, at its images per worker.
"""
import argparse
import os
import statistics
import sys

from largebatch.analysis.metrics import read_metrics
from largebatch.analysis.planner import plan_batches


def main(argv=None):
    p = argparse.ArgumentParser(description="Predicted steps, images and speed-up per GPU count from a noise scale.")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a run's OUTPUT_DIR (its metrics.json)")
    p.add_argument("--gpus", default="1,2,4,8,16,32,64,128,256,512,1024", help="GPU counts (default 1..1024)")
    p.add_argument("--images-per-gpu", type=int, default=None,
                   help="images per GPU and step (default: the run's, from --run-batch / --run-workers)")
    p.add_argument("--run-batch", type=int, default=None, help="the run's total batch (to derive images per GPU)")
    p.add_argument("--run-workers", type=int, default=None, help="the run's workers (to derive images per GPU)")
    p.add_argument("--comm-ms", type=float, default=5.0,
                   help="communication per step per doubling of the GPUs, ms (default 5: the assumed term)")
    args = p.parse_args(argv)
    try:
        gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
        assert gpus and all(g >= 1 for g in gpus)
    except (ValueError, AssertionError):
        print(f"error: --gpus {args.gpus!r}: expected comma-separated whole numbers >= 1", file=sys.stderr)
        return 2
    series = read_metrics(os.path.join(args.output_dir, "metrics.json"))
    noise = series.get("noise_scale/all")
    if not noise:
        print(f"error: {args.output_dir}/metrics.json has no noise_scale/all (train with MONITOR.GRAD_VARIANCE True "
              "for a few hundred iterations)", file=sys.stderr)
        return 2
    times = sorted(series.get("time", {}).items())
    if not times:
        print(f"error: {args.output_dir}/metrics.json has no step time ('time')", file=sys.stderr)
        return 2
    ims = args.images_per_gpu
    if ims is None:
        if not (args.run_batch and args.run_workers):
            print("error: pass --images-per-gpu, or --run-batch and --run-workers", file=sys.stderr)
            return 2
        ims = max(1, args.run_batch // args.run_workers)
    last_iter, b_noise = max(noise.items())
    step_time = statistics.median(v for _, v in times[len(times) // 2:])  # past the start-up
    rows = plan_batches(b_noise, step_time, ims, gpus, args.comm_ms)
    print(f"A model (McCandlish et al. 2018, eq. 2.11-2.12), not a measurement: B_noise = {b_noise:.3g} images "
          f"(noise_scale/all at iteration {last_iter}), step time {step_time * 1000:.0f} ms at {ims} images per GPU, "
          f"+ {args.comm_ms:g} ms x log2(GPUs) communication; the LR retuned per batch.")
    print("| GPUs | batch | steps / S_min | images / E_min | step time (ms) | speed-up |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r.gpus} | {r.batch} | {r.steps_per_min:.2f} | {r.images_per_min:.2f} | {r.step_time_s * 1000:.0f} "
              f"| {r.speedup:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
