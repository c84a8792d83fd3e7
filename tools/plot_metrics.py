#!/usr/bin/env python
"""Plot a training run's metrics as the papers do, from OUTPUT_DIR/metrics.json and OUTPUT_DIR/layer_stats.jsonl.

    python tools/plot_metrics.py OUTPUT_DIR [--out DIR] [--iters 0,100,200]

Writes one PNG per figure into OUTPUT_DIR/plots/ (or --out) and prints their paths:

    loss.png               total loss and its terms
    lr.png                 the scheduler's learning rate
    ap.png                 bbox / segm AP over iterations (when the run evaluated)
    local_lr.png           mean local LR (LR x trust ratio) per detector part, min-max band (CoolDet Fig. 1)
    trust_ratio.png        mean trust ratio per part, min-max band
    grad_var.png           gradient variance Phi = 1 - cos(G1, G2) per part (AGVM Fig. 1)
    agvm_mu.png            AGVM's LR multiplier mu per part (when AGVM was on)
    noise_scale.png        gradient noise scale B_simple per part and for the whole model ("all"), in images:
                           the critical batch it predicts (McCandlish et al. 2018)
    layer_local_lr.png     local LR of every layer over iterations, one panel per part (CoolDet Fig. 4, 5)
    layer_trust_ratio.png  trust ratio of every layer at chosen iterations (LargeDet Fig. 3)

Per-part trust ratio, local LR, grad_var and agvm_mu come from metrics.json, completed from layer_stats.jsonl (which
has every MONITOR.PERIOD record; metrics.json keeps the latest value every 20 iterations only).
A figure whose metrics the run did not record (no evaluation, AGVM off, MONITOR.PER_LAYER off, ...) is
skipped with a printed note. --iters picks the iterations of layer_trust_ratio.png (the nearest recorded
one is used for each; default: the first, middle and last records). Every PNG is written under a
temporary name and renamed, so a reader never sees half a file. The reading and drawing are
``largebatch.analysis`` (metrics.py, plots.py); this is its command line.
"""
import argparse
import os
import sys

from largebatch.analysis.plots import plot_run


def parse_iters(text):
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated iterations, e.g. 0,100,200; got {text!r}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot the metrics of a largebatch training run.")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's OUTPUT_DIR (metrics.json, layer_stats.jsonl)")
    p.add_argument("--out", default=None, help="where the PNGs go (default OUTPUT_DIR/plots)")
    p.add_argument("--iters", type=parse_iters, default=None,
                   help="iterations of the per-layer trust-ratio figure, e.g. 0,100,200 (default: first, middle, last)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.output_dir):
        print(f"error: {args.output_dir}: no such directory", file=sys.stderr)
        return 2
    written, notes = plot_run(args.output_dir, args.out, args.iters)
    for note in notes:
        print(f"note: {note}")
    for path in written:
        print(path)
    if not written:
        print(f"error: nothing to plot in {args.output_dir} (no metrics.json / layer_stats.jsonl)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
