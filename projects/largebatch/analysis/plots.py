"""The matplotlib figures: a run's metrics as the papers plot them (:func:`plot_run`), an LR schedule over a
whole run (:func:`plot_lr_schedule`) and the large-batch study (:func:`plot_study`).

Every PNG is written with ``largebatch.files.save_figure`` (under a temporary name, then renamed), so a reader
never sees half a file. matplotlib is imported (with the Agg backend) only when a figure is drawn.
"""
import math
import os
import re
from typing import List, Optional, Tuple

from ..files import save_figure
from ..optim.groups import DETECTOR_PARTS
from .metrics import (
    add_layer_series,
    choose_records,
    layer_values,
    part_order,
    parts_with,
    read_layer_stats,
    read_metrics,
)

__all__ = ["PART_COLORS", "part_color", "plot_run", "plot_lr_schedule", "plot_study", "plot_grad_variance"]

# matplotlib's tab10 cycle: one colour per detector part (in DETECTOR_PARTS order), the rest for other parts
_TAB10 = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
          "tab:olive", "tab:cyan")
PART_COLORS = dict(zip(DETECTOR_PARTS, _TAB10))
EXTRA_COLORS = list(_TAB10[len(DETECTOR_PARTS):]) + ["black", "gold", "navy"]


def part_color(part: str, _extra={}) -> str:
    """The colour of a detector part, the same in every figure (a part outside DETECTOR_PARTS gets the next
    free one)."""
    if part in PART_COLORS:
        return PART_COLORS[part]
    return _extra.setdefault(part, EXTRA_COLORS[len(_extra) % len(EXTRA_COLORS)])


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str) -> str:
    """Write ``fig`` to ``path`` atomically and close it; return the path."""
    try:
        save_figure(fig, path)
    finally:
        pyplot().close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# a run's metrics
# ---------------------------------------------------------------------------------------------------------------
class Figures:
    """Writes the figures of one run into ``out_dir``; keeps the paths written and the notes (skipped figures)."""

    def __init__(self, out_dir: str):
        from matplotlib.ticker import MaxNLocator

        self.plt = pyplot()
        self.MaxNLocator = MaxNLocator
        self.out_dir = out_dir
        self.written: List[str] = []
        self.notes: List[str] = []

    def skip(self, name: str, why: str) -> None:
        self.notes.append(f"skipped {name}: {why}")

    def save(self, fig, name: str) -> str:
        path = save(fig, os.path.join(self.out_dir, name))
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


def _markers(xs) -> dict:
    """Dots on a line of few points."""
    return dict(marker="o", ms=3) if len(xs) < 30 else {}


def _single_iteration(ax, xs):
    """A run with one point: a readable x range around it instead of matplotlib's +-0.05."""
    if xs and min(xs) == max(xs):
        ax.set_xlim(xs[0] - 1, xs[0] + 1)


def _positive(values):
    return [v for v in values if v is not None and math.isfinite(v) and v > 0]


def plot_lines(figs: Figures, series, name, title, ylabel, keys, labels=None, log=False, why_missing=""):
    """One line per key of ``series`` ({key: [(iteration, value)]})."""
    keys = [k for k in keys if k in series and series[k]]
    if not keys:
        figs.skip(name, why_missing or f"no {ylabel} in metrics.json")
        return
    if log and not _positive(v for k in keys for _, v in series[k]):
        log = False
    fig, ax = figs.figure(title, ylabel, log=log)
    for i, key in enumerate(keys):
        x, y = _xy(series[key])
        ax.plot(x, y, lw=1.4 if i == 0 else 1.0, label=labels[i] if labels else key, **_markers(x))
    if len(keys) > 1 or labels:
        ax.legend(fontsize=8)
    _single_iteration(ax, [i for k in keys for i, _ in series[k]])
    figs.save(fig, name)


def plot_parts(figs: Figures, series, name, metric, title, ylabel, log=False, band=False, why_missing=""):
    """One line per detector part of ``<metric>/<part>``, with the ``<metric>_min|max/<part>`` band."""
    parts = parts_with(series, metric + "/")
    if not parts:
        figs.skip(name, why_missing or f"no {metric}/<part> in metrics.json")
        return
    values = [v for p in parts for _, v in series[f"{metric}/{p}"]]
    if band:
        values += [v for p in parts for k in (f"{metric}_min/{p}", f"{metric}_max/{p}") for _, v in series.get(k, [])]
    if log and not _positive(values):
        log = False
    fig, ax = figs.figure(title, ylabel, log=log)
    for p in parts:
        x, y = _xy(series[f"{metric}/{p}"])
        color = part_color(p)
        ax.plot(x, y, color=color, lw=1.5, label=p, **_markers(x))
        lo, hi = dict(series.get(f"{metric}_min/{p}", [])), dict(series.get(f"{metric}_max/{p}", []))
        common = [i for i in x if i in lo and i in hi]
        if band and common:
            ax.fill_between(common, [lo[i] for i in common], [hi[i] for i in common], color=color, alpha=0.12, lw=0)
    ax.legend(fontsize=8, title="part (line: mean, band: min-max)" if band else "part", title_fontsize=8)
    _single_iteration(ax, [i for p in parts for i, _ in series[f"{metric}/{p}"]])
    figs.save(fig, name)


def plot_layer_lines(figs: Figures, header, records, name):
    """CoolDet Fig. 4, 5: the local LR of every layer of each part over the recorded iterations."""
    if not records:
        figs.skip(name, "no per-layer records (layer_stats.jsonl; MONITOR.PER_LAYER)")
        return
    parts = part_order(header["parts"])
    iters = [r["iter"] for r in records]
    per_record = [layer_values(header, r, "local_lr") for r in records]
    cols = min(3, len(parts))
    rows = math.ceil(len(parts) / cols)
    fig, axes = figs.plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), dpi=100, layout="constrained",
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
        ax.xaxis.set_major_locator(figs.MaxNLocator(integer=True))
        ax.set_ylabel("local LR")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(parts):]:
        ax.set_visible(False)
    fig.suptitle(f"Local LR of each layer ({header.get('optimizer', '?')}; LR x trust ratio)")
    figs.save(fig, name)


def plot_layer_distribution(figs: Figures, header, records, name, wanted):
    """LargeDet Fig. 3: the trust ratio of every layer (x: layer index in the model's order) at a few
    iterations, coloured by part, log scale."""
    chosen, notes = choose_records(records, wanted)
    figs.notes.extend(notes)
    if not chosen:
        figs.skip(name, "no per-layer records (layer_stats.jsonl; MONITOR.PER_LAYER)")
        return
    parts = header["parts"]
    colors = [part_color(p) for p in parts]
    ratio_kind = "||w|| / ||g||" if header.get("ratio") == "weight_grad_norm" else "optimizer's trust ratio"
    fig, axes = figs.plt.subplots(len(chosen), 1, figsize=(10, 2.8 * len(chosen)), dpi=100, layout="constrained",
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
    legend_parts = part_order(parts)
    handles = [figs.plt.Rectangle((0, 0), 1, 1, color=part_color(p)) for p in legend_parts]
    axes[0, 0].legend(handles, legend_parts, fontsize=8, ncol=4, loc="upper right")
    fig.suptitle(f"Per-layer trust ratio distribution ({header.get('optimizer', '?')}: {ratio_kind})")
    figs.save(fig, name)


def plot_run(output_dir: str, out_dir: Optional[str] = None, iters: Optional[List[int]] = None
             ) -> Tuple[List[str], List[str]]:
    """Every figure a run's OUTPUT_DIR has data for (metrics.json, layer_stats.jsonl), written into ``out_dir``
    (default OUTPUT_DIR/plots); ``iters``: the iterations of layer_trust_ratio.png. Returns (paths written,
    notes: the figures skipped and why, the --iters not recorded)."""
    series = read_metrics(os.path.join(output_dir, "metrics.json"))
    header, records = read_layer_stats(os.path.join(output_dir, "layer_stats.jsonl"))
    figs = Figures(out_dir or os.path.join(output_dir, "plots"))
    if not series:
        figs.notes.append(f"no metrics in {os.path.join(output_dir, 'metrics.json')}")
    if header is not None:
        add_layer_series(series, header, records)
    series = {k: sorted(v.items()) for k, v in series.items()}

    loss_keys = ["total_loss"] + sorted(k for k in series if k.startswith("loss_"))
    plot_lines(figs, series, "loss.png", "Training loss", "loss", loss_keys, log=True)
    plot_lines(figs, series, "lr.png", "Learning rate", "learning rate", ["lr"])
    ap_keys = [k for k in sorted(series) if re.fullmatch(r"(bbox|segm|keypoints)/AP(50|75)?", k)]
    plot_lines(figs, series, "ap.png", "Average precision", "AP", ap_keys,
               why_missing="no AP in metrics.json (evaluation was off: TEST.EVAL_PERIOD / DATASETS.TEST)")
    plot_parts(figs, series, "local_lr.png", "local_lr", "Mean local LR per part (LR x trust ratio)", "local LR",
               log=True, band=True, why_missing="no local_lr/<part> in metrics.json (MONITOR.TRUST_RATIO off?)")
    plot_parts(figs, series, "trust_ratio.png", "trust_ratio", "Mean trust ratio per part", "trust ratio",
               log=True, band=True, why_missing="no trust_ratio/<part> in metrics.json (MONITOR.TRUST_RATIO off?)")
    plot_parts(figs, series, "grad_var.png", "grad_var", "Gradient variance per part: 1 - cos(G1, G2)", "Phi",
               why_missing="no grad_var/<part> in metrics.json (MONITOR.GRAD_VARIANCE off?)")
    plot_parts(figs, series, "agvm_mu.png", "agvm_mu", "AGVM LR multiplier per part", "mu",
               why_missing="no agvm_mu/<part> in metrics.json (AGVM was off)")
    plot_parts(figs, series, "noise_scale.png", "noise_scale",
               "Gradient noise scale per part: B_simple = tr(Sigma) / |G|^2 (McCandlish et al.), raw gradients",
               "images", log=True, why_missing="no noise_scale/<part> in metrics.json (MONITOR.GRAD_VARIANCE off?)")
    if header is None:
        for name in ("layer_local_lr.png", "layer_trust_ratio.png"):
            figs.skip(name, "no layer_stats.jsonl (MONITOR.PER_LAYER / MONITOR.TRUST_RATIO off?)")
    else:
        plot_layer_lines(figs, header, records, "layer_local_lr.png")
        plot_layer_distribution(figs, header, records, "layer_trust_ratio.png", iters)
    return figs.written, figs.notes


# ---------------------------------------------------------------------------------------------------------------
# an LR schedule
# ---------------------------------------------------------------------------------------------------------------
def plot_lr_schedule(cfg, lrs: List[float], marks: dict, output: str, num_train_images: Optional[int] = None) -> str:
    """The LR at every iteration of a resolved config (``largebatch.schedule.lr_curve``), with the warm-up end,
    LR steps and restarts marked (``schedule_marks``) and, given the training set size, an epoch axis on top.
    Returns the absolute path written."""
    from matplotlib.ticker import FuncFormatter

    plt = pyplot()
    s = cfg.SOLVER
    total = s.IMS_PER_BATCH * s.ACCUMULATE_STEPS
    batch = f"total batch {total}"
    if s.ACCUMULATE_STEPS > 1:
        batch += f" ({s.IMS_PER_BATCH} x {s.ACCUMULATE_STEPS} accumulation)"
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110, layout="constrained")
    ax.plot(range(len(lrs)), lrs, color="tab:blue", lw=1.6, label="learning rate")
    if marks["warmup_end"]:
        ax.axvline(marks["warmup_end"], color="tab:orange", ls="--", lw=1.1,
                   label=f"warm-up end ({marks['warmup_end']})")
    for i, x in enumerate(marks["steps"]):
        ax.axvline(x, color="tab:red", ls=":", lw=1.1, label="LR steps" if i == 0 else None)
    for i, x in enumerate(marks["restarts"]):
        ax.axvline(x, color="tab:green", ls=":", lw=1.1, label="restarts" if i == 0 else None)
    ax.set_xlim(0, max(len(lrs) - 1, 1))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("iteration")
    ax.set_ylabel("learning rate")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(alpha=0.3)
    fig.suptitle(f"{s.LR_SCHEDULER_NAME}: BASE_LR {s.BASE_LR:g}, {batch}, {s.MAX_ITER} iterations", fontsize=11)
    if num_train_images:
        per_epoch = num_train_images / total
        sec = ax.secondary_xaxis("top", functions=(lambda x: x / per_epoch, lambda e: e * per_epoch))
        sec.set_xlabel(f"epoch ({num_train_images} images)", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    return save(fig, os.path.abspath(output))


# ---------------------------------------------------------------------------------------------------------------
# the large-batch study
# ---------------------------------------------------------------------------------------------------------------
def plot_study(rows: List[dict], path: str) -> str:
    """AP50 and training loss against epochs, one line per arm (rows of ``largebatch.analysis.study.summarize_arm``;
    a diverged arm's last loss is marked with a cross)."""
    plt = pyplot()
    fig, (ax_ap, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    palette = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20").colors  # one colour per arm, never reused
    for i, r in enumerate(rows):
        label = r["arm"] + (" (diverged)" if r["diverged"] else "")
        color = palette[i % len(palette)]
        if r["ap_curve"]:
            xs = [x for x, _, _ in r["ap_curve"]]
            ax_ap.plot(xs, [a50 for _, _, a50 in r["ap_curve"]], marker="o", label=label, color=color)
        if r["loss_curve"]:
            xs = [x for x, _ in r["loss_curve"]]
            line2, = ax_loss.plot(xs, [loss for _, loss in r["loss_curve"]], marker=".", label=label, color=color)
            if r["diverged"]:
                ax_loss.plot(xs[-1:], [r["loss_curve"][-1][1]], marker="x", markersize=10, color=line2.get_color())
    ax_ap.set_xlabel("epoch")
    ax_ap.set_ylabel("bbox AP50 (val)")
    ax_ap.set_title("AP50 against epochs")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("total_loss (train, median of 20 iterations)")
    ax_loss.set_title("training loss against epochs")
    _grid_and_legend(ax_ap, ax_loss)
    fig.tight_layout()
    return save(fig, path)


def _grid_and_legend(*axes) -> None:
    """A light grid on each panel, and a legend where something is labelled."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)


def plot_grad_variance(runs: List[dict], path: str) -> str:
    """AGVM Fig. 1: grad_var (Phi = 1 - cos of the two halves' gradients, AGVM eq. 3) of every detector part
    against epochs, one panel per run (the rows of ``summarize_arm`` with ``grad_var``: [(iteration, {part: Phi})]),
    and below it Phi_backbone / Phi_part, the multiplier AGVM would give each part before its momentum and clamp
    (1 where the parts are aligned)."""
    plt = pyplot()
    n = max(1, len(runs))
    fig, axes = plt.subplots(2, n, figsize=(4.6 * n, 7), dpi=110, sharey="row", squeeze=False)
    for col, run in enumerate(runs):
        ax, ax_ratio = axes[0][col], axes[1][col]
        ipe = run["iters_per_epoch"]
        records = run["grad_var"]
        parts = part_order({p for _, phi in records for p in phi})
        for part in parts:
            pts = [((it + 1) / ipe, phi[part]) for it, phi in records if part in phi]
            if not pts:
                continue
            xs, ys = _xy(pts)
            ax.plot(xs, ys, label=part, color=part_color(part), **_markers(xs))
            if part != "backbone":
                ratio = [((it + 1) / ipe, phi["backbone"] / phi[part]) for it, phi in records
                         if part in phi and "backbone" in phi and phi[part] > 0]
                if ratio:
                    rx, ry = _xy(ratio)
                    ax_ratio.plot(rx, ry, label=part, color=part_color(part), **_markers(rx))
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")  # Phi = 1: uncorrelated halves
        ax_ratio.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{run['arm']}: batch {run['total_batch']} ({len(records)} records)", fontsize=10)
        ax_ratio.set_xlabel("epoch")
        ax_ratio.set_yscale("log")
        _grid_and_legend(ax, ax_ratio)
    axes[0][0].set_ylabel("grad_var = 1 - cos(G1, G2)")
    axes[1][0].set_ylabel("Phi_backbone / Phi_part (AGVM's mu, raw)")
    fig.suptitle("Gradient variance per detector part (monitor only, no AGVM, SyncBN)", fontsize=11)
    fig.tight_layout()
    return save(fig, path)


def plot_sweep(rows: List[dict], baseline: List[dict], batches, path: str) -> str:
    """The sweep at the critical batch: AP against the LR multiplier, one panel per batch, one line per recipe
    (rows of ``summarize_arm`` with ``recipe`` and ``multiplier``; a diverged run at AP 0 with a cross), the
    small-batch baseline's best as a dashed line."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), 4.2), dpi=110, sharey=True, squeeze=False)
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    palette = plt.get_cmap("tab10").colors
    scored = [r for r in baseline if r.get("ap") is not None]
    best = max(scored, key=lambda r: r["ap"]) if scored else None
    for ax, batch in zip(axes[0], batches):
        for i, recipe in enumerate(recipes):
            pts = sorted((r["multiplier"], r["ap"], r["diverged"]) for r in rows
                         if r["recipe"] == recipe and r["total_batch"] == batch and r.get("ap") is not None)
            if not pts:
                continue
            color = palette[i % len(palette)]
            ax.plot([m for m, _, _ in pts], [a for _, a, _ in pts], marker="o", color=color, label=recipe)
            for m, a, diverged in pts:
                if diverged:
                    ax.plot([m], [a], marker="x", markersize=10, color=color)
        if best is not None:
            ax.axhline(best["ap"], color="black", ls="--", lw=1,
                       label=f"baseline batch {best['total_batch']} (best, x{best['multiplier']:g})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LR multiplier (of the recipe's rule)")
        ax.set_title(f"total batch {batch}", fontsize=10)
    axes[0][0].set_ylabel("bbox AP (val), same epochs")
    _grid_and_legend(*axes[0])
    fig.tight_layout()
    return save(fig, path)
