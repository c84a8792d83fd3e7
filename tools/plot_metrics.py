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
    layer_local_lr.png     local LR of every layer over iterations, one panel per part (CoolDet Fig. 4, 5)
    layer_trust_ratio.png  trust ratio of every layer at chosen iterations (LargeDet Fig. 3)

Per-part trust ratio, local LR, grad_var and agvm_mu come from metrics.json, completed from layer_stats.jsonl (which
has every MONITOR.PERIOD record; metrics.json keeps the latest value every 20 iterations only).
A figure whose metrics the run did not record (no evaluation, AGVM off, MONITOR.PER_LAYER off, ...) is
skipped with a printed note. --iters picks the iterations of layer_trust_ratio.png (the nearest recorded
one is used for each; default: the first, middle and last records). Every PNG is written under a
temporary name and renamed, so a reader never sees half a file. Needs only matplotlib (no detectron2).
"""
import argparse
import json
import math
import os
import re
import sys
from collections import OrderedDict, defaultdict

try:
    from largebatch.files import save_figure
except ImportError:  # a bare checkout: the package lives in projects/
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects"))
    from largebatch.files import save_figure

PART_COLORS = OrderedDict(
    [
        ("backbone", "tab:blue"),
        ("fpn", "tab:orange"),
        ("rpn", "tab:green"),
        ("box_head", "tab:red"),
        ("mask_head", "tab:purple"),
        ("head", "tab:brown"),
        ("sem_seg_head", "tab:pink"),
        ("other", "tab:gray"),
    ]
)
EXTRA_COLORS = ["tab:olive", "tab:cyan", "black", "gold", "navy"]


def part_color(part, _extra={}):
    if part in PART_COLORS:
        return PART_COLORS[part]
    return _extra.setdefault(part, EXTRA_COLORS[len(_extra) % len(EXTRA_COLORS)])


def part_order(parts):
    known = [p for p in PART_COLORS if p in parts]
    return known + sorted(p for p in parts if p not in PART_COLORS)


# -- reading ----------------------------------------------------------------------------------------------
def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def read_metrics(path):
    """metrics.json (detectron2's JSONWriter: one JSON object per line) -> {key: {iter: value}}; for an
    iteration written twice (a resumed run) the last line wins."""
    series = defaultdict(dict)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a crash
                continue
            it = row.get("iteration")
            if not isinstance(it, int):
                continue
            for key, value in row.items():
                v = _number(value)
                if key != "iteration" and v is not None:
                    series[key][it] = v
    return dict(series)


def read_layer_stats(path):
    """layer_stats.jsonl -> (header, [records sorted by iter]); (None, []) when absent or empty."""
    if not os.path.isfile(path):
        return None, []
    header, records = None, {}
    with open(path) as f:
        for i, line in enumerate(f):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if i == 0:
                header = row
                continue
            if header is not None and isinstance(row.get("iter"), int):
                records[row["iter"]] = row
    if header is None or "names" not in header:
        return None, []
    return header, [records[k] for k in sorted(records)]


def _nan(v):
    return float("nan") if v is None else float(v)


def layer_values(header, record, what):
    """Per-layer trust ratio or local LR (= lr of the layer's param group x trust ratio) of one record."""
    ratios = [_nan(v) for v in record["trust_ratio"]]
    if what == "trust_ratio":
        return ratios
    lrs = [_nan(v) for v in record["lr"]]
    return [lrs[g] * r for g, r in zip(header["groups"], ratios)]


def add_layer_series(series, header, records):
    """Per-part mean / min / max of trust ratio and local LR, grad_var and agvm_mu, from every layer_stats.jsonl
    record, for the iterations metrics.json lacks (its writer keeps only the latest value every 20
    iterations, so a MONITOR.PERIOD below 20 is sampled there)."""
    parts = header["parts"]
    for record in records:
        it = record["iter"]
        for what in ("trust_ratio", "local_lr"):
            by_part = defaultdict(list)
            for part, v in zip(parts, layer_values(header, record, what)):
                if math.isfinite(v):
                    by_part[part].append(v)
            for part, vals in by_part.items():
                for key, value in ((f"{what}/{part}", sum(vals) / len(vals)), (f"{what}_min/{part}", min(vals)),
                                   (f"{what}_max/{part}", max(vals))):
                    series.setdefault(key, {}).setdefault(it, value)
        for key in ("grad_var", "agvm_mu"):
            for part, v in (record.get(key) or {}).items():
                if v is not None:
                    series.setdefault(f"{key}/{part}", {}).setdefault(it, float(v))


def parts_with(series, prefix):
    return part_order([k[len(prefix):] for k in series if k.startswith(prefix)])


# -- writing ----------------------------------------------------------------------------------------------
class Plotter:
    def __init__(self, out_dir):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from matplotlib.ticker import MaxNLocator

        self.plt = plt
        self.MaxNLocator = MaxNLocator
        self.out_dir = out_dir
        self.written = []
        self.notes = []

    def skip(self, name, why):
        self.notes.append(f"skipped {name}: {why}")

    def save(self, fig, name):
        path = os.path.join(self.out_dir, name)
        try:
            save_figure(fig, path)
        finally:
            self.plt.close(fig)
        self.written.append(path)
        return path

    def figure(self, title, ylabel, log=False, figsize=(8, 4.5)):
        fig, ax = self.plt.subplots(figsize=figsize, dpi=100, layout="constrained")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
        ax.xaxis.set_major_locator(self.MaxNLocator(integer=True))
        return fig, ax


def _xy(points):
    return [p[0] for p in points], [p[1] for p in points]


def _single_iteration(ax, xs):
    """A run with one point: a readable x range around it instead of matplotlib's +-0.05."""
    if xs and min(xs) == max(xs):
        ax.set_xlim(xs[0] - 1, xs[0] + 1)


def _positive(values):
    return [v for v in values if v is not None and math.isfinite(v) and v > 0]


def plot_lines(pl, series, name, title, ylabel, keys, labels=None, log=False, why_missing=""):
    keys = [k for k in keys if k in series and series[k]]
    if not keys:
        pl.skip(name, why_missing or f"no {ylabel} in metrics.json")
        return
    if log and not _positive(v for k in keys for _, v in series[k]):
        log = False
    fig, ax = pl.figure(title, ylabel, log=log)
    for i, key in enumerate(keys):
        x, y = _xy(series[key])
        style = dict(marker="o", ms=3) if len(x) < 30 else {}
        ax.plot(x, y, lw=1.4 if i == 0 else 1.0, label=labels[i] if labels else key, **style)
    if len(keys) > 1 or labels:
        ax.legend(fontsize=8)
    _single_iteration(ax, [i for k in keys for i, _ in series[k]])
    pl.save(fig, name)


def plot_parts(pl, series, name, metric, title, ylabel, log=False, band=False, why_missing=""):
    """One line per detector part of ``<metric>/<part>``, with the ``<metric>_min|max/<part>`` band."""
    parts = parts_with(series, metric + "/")
    if not parts:
        pl.skip(name, why_missing or f"no {metric}/<part> in metrics.json")
        return
    values = [v for p in parts for _, v in series[f"{metric}/{p}"]]
    if band:
        values += [v for p in parts for k in (f"{metric}_min/{p}", f"{metric}_max/{p}") for _, v in series.get(k, [])]
    if log and not _positive(values):
        log = False
    fig, ax = pl.figure(title, ylabel, log=log)
    for p in parts:
        x, y = _xy(series[f"{metric}/{p}"])
        color = part_color(p)
        style = dict(marker="o", ms=3) if len(x) < 30 else {}
        ax.plot(x, y, color=color, lw=1.5, label=p, **style)
        lo, hi = dict(series.get(f"{metric}_min/{p}", [])), dict(series.get(f"{metric}_max/{p}", []))
        common = [i for i in x if i in lo and i in hi]
        if band and common:
            ax.fill_between(common, [lo[i] for i in common], [hi[i] for i in common], color=color, alpha=0.12, lw=0)
    ax.legend(fontsize=8, title="part (line: mean, band: min-max)" if band else "part", title_fontsize=8)
    _single_iteration(ax, [i for p in parts for i, _ in series[f"{metric}/{p}"]])
    pl.save(fig, name)


def plot_layer_lines(pl, header, records, name):
    """CoolDet Fig. 4, 5: the local LR of every layer of each part over the recorded iterations."""
    if not records:
        pl.skip(name, "no per-layer records (layer_stats.jsonl; MONITOR.PER_LAYER)")
        return
    parts = part_order(list(dict.fromkeys(header["parts"])))
    iters = [r["iter"] for r in records]
    per_record = [layer_values(header, r, "local_lr") for r in records]
    cols = min(3, len(parts))
    rows = math.ceil(len(parts) / cols)
    fig, axes = pl.plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), dpi=100, layout="constrained",
                                squeeze=False)
    for ax, part in zip(axes.flat, parts):
        layers = [k for k, p in enumerate(header["parts"]) if p == part]
        any_positive = False
        for k in layers:
            y = [vals[k] for vals in per_record]
            any_positive |= bool(_positive(y))
            ax.plot(iters, y, lw=0.8, alpha=0.7, color=part_color(part), marker="." if len(iters) < 30 else None)
        if any_positive:
            ax.set_yscale("log")
        ax.set_title(f"{part}: {len(layers)} layers", fontsize=10)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(pl.MaxNLocator(integer=True))
        ax.set_ylabel("local LR")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(parts):]:
        ax.set_visible(False)
    fig.suptitle(f"Local LR of each layer ({header.get('optimizer', '?')}; LR x trust ratio)")
    pl.save(fig, name)


def choose_records(records, wanted):
    """The records nearest to each wanted iteration (default: first, middle, last), without repeats."""
    if not records:
        return [], []
    iters = [r["iter"] for r in records]
    if not wanted:
        picks = [0, len(records) // 2, len(records) - 1]
    else:
        picks = [min(range(len(iters)), key=lambda i: (abs(iters[i] - w), iters[i])) for w in wanted]
    notes = []
    for w, i in zip(wanted or [], picks):
        if iters[i] != w:
            notes.append(f"--iters {w}: not recorded, using the nearest record, iteration {iters[i]}")
    return [records[i] for i in dict.fromkeys(picks)], notes


def plot_layer_distribution(pl, header, records, name, wanted):
    """LargeDet Fig. 3: the trust ratio of every layer (x: layer index in the model's order) at a few
    iterations, coloured by part, log scale."""
    chosen, notes = choose_records(records, wanted)
    pl.notes.extend(notes)
    if not chosen:
        pl.skip(name, "no per-layer records (layer_stats.jsonl; MONITOR.PER_LAYER)")
        return
    parts = header["parts"]
    colors = [part_color(p) for p in parts]
    ratio_kind = "||w|| / ||g||" if header.get("ratio") == "weight_grad_norm" else "optimizer's trust ratio"
    fig, axes = pl.plt.subplots(len(chosen), 1, figsize=(10, 2.8 * len(chosen)), dpi=100, layout="constrained",
                                squeeze=False)
    for ax, record in zip(axes[:, 0], chosen):
        y = layer_values(header, record, "trust_ratio")
        ok = [k for k, v in enumerate(y) if math.isfinite(v) and v > 0]
        ax.bar(ok, [y[k] for k in ok], width=0.9, color=[colors[k] for k in ok])
        if ok:
            ax.set_yscale("log")
        ax.set_xlim(-1, len(y))
        ax.set_ylabel("trust ratio")
        ax.set_title(f"iteration {record['iter']}", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[-1, 0].set_xlabel("layer (parameter tensor, in order)")
    handles = [pl.plt.Rectangle((0, 0), 1, 1, color=part_color(p)) for p in part_order(set(parts))]
    axes[0, 0].legend(handles, part_order(set(parts)), fontsize=8, ncol=4, loc="upper right")
    fig.suptitle(f"Per-layer trust ratio distribution ({header.get('optimizer', '?')}: {ratio_kind})")
    pl.save(fig, name)


def plot_all(output_dir, out_dir=None, iters=None):
    """Write every figure the run has data for; return (paths written, notes)."""
    series = read_metrics(os.path.join(output_dir, "metrics.json"))
    header, records = read_layer_stats(os.path.join(output_dir, "layer_stats.jsonl"))
    pl = Plotter(out_dir or os.path.join(output_dir, "plots"))
    if not series:
        pl.notes.append(f"no metrics in {os.path.join(output_dir, 'metrics.json')}")
    if header is not None:
        add_layer_series(series, header, records)
    series = {k: sorted(v.items()) for k, v in series.items()}

    loss_keys = ["total_loss"] + sorted(k for k in series if k.startswith("loss_"))
    plot_lines(pl, series, "loss.png", "Training loss", "loss", loss_keys, log=True)
    plot_lines(pl, series, "lr.png", "Learning rate", "learning rate", ["lr"])
    ap_keys = [k for k in sorted(series) if re.fullmatch(r"(bbox|segm|keypoints)/AP(50|75)?", k)]
    plot_lines(pl, series, "ap.png", "Average precision", "AP", ap_keys,
               why_missing="no AP in metrics.json (evaluation was off: TEST.EVAL_PERIOD / DATASETS.TEST)")
    plot_parts(pl, series, "local_lr.png", "local_lr", "Mean local LR per part (LR x trust ratio)", "local LR",
               log=True, band=True, why_missing="no local_lr/<part> in metrics.json (MONITOR.TRUST_RATIO off?)")
    plot_parts(pl, series, "trust_ratio.png", "trust_ratio", "Mean trust ratio per part", "trust ratio",
               log=True, band=True, why_missing="no trust_ratio/<part> in metrics.json (MONITOR.TRUST_RATIO off?)")
    plot_parts(pl, series, "grad_var.png", "grad_var", "Gradient variance per part: 1 - cos(G1, G2)", "Phi",
               why_missing="no grad_var/<part> in metrics.json (MONITOR.GRAD_VARIANCE off?)")
    plot_parts(pl, series, "agvm_mu.png", "agvm_mu", "AGVM LR multiplier per part", "mu",
               why_missing="no agvm_mu/<part> in metrics.json (AGVM was off)")
    if header is None:
        for name in ("layer_local_lr.png", "layer_trust_ratio.png"):
            pl.skip(name, "no layer_stats.jsonl (MONITOR.PER_LAYER / MONITOR.TRUST_RATIO off?)")
    else:
        plot_layer_lines(pl, header, records, "layer_local_lr.png")
        plot_layer_distribution(pl, header, records, "layer_trust_ratio.png", iters)
    return pl.written, pl.notes


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
    written, notes = plot_all(args.output_dir, args.out, args.iters)
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
