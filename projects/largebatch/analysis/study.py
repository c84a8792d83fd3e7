"""The large-batch study's arms and results (the runner is bench/large_batch_study.py).

An arm is one config of configs/shapes/study/ trained by ``train_net.py`` into its own directory, which then
holds ``metrics.json``, ``log.txt`` (detectron2's log), ``train.log`` (the process's stdout + stderr) and
``result.json`` (what the runner measured: exit status, divergence, wall / CPU time, load, the overrides).
Here: the overrides every arm gets (:func:`arm_overrides`), the settings an arm resolves to
(:func:`resolve_arm`), the summary of an arm's directory (:func:`summarize_arm`), whether a finished run can be
reused (:func:`is_done`) and the markdown table (:func:`table`)."""
import math
import os
import re
from typing import List, Sequence

from .metrics import read_json, read_layer_stats, read_metrics_rows, read_text

__all__ = ["DIVERGED", "arm_overrides", "resolve_arm", "eval_iterations", "log_evals", "merge_evals", "sweep_run_name",
           "sweep_overrides", "last_value", "best_run", "sweep_table", "noise_records",
           "summarize_arm", "is_done", "table", "fmt_number", "fmt_duration", "grad_var_records", "phi_summary"]

DIVERGED = re.compile(r"Training diverged|FloatingPointError")
LR_LINE = re.compile(r"BASE_LR ([0-9.eE+-]+) -> ([0-9.eE+-]+) \(rule")


# ---------------------------------------------------------------------------------------------------------------
# what one arm is
# ---------------------------------------------------------------------------------------------------------------
def arm_overrides(epochs: int = 6, eval_period: int = 1, max_iter: int = 0, opts: Sequence[str] = ()) -> List[str]:
    """KEY VALUE overrides every arm gets (also the identity of a finished run): ``epochs`` epochs with an
    evaluation every ``eval_period`` epochs, or, with ``max_iter`` (debug / smoke runs), that many iterations,
    1 iteration of warm-up and one evaluation at the end; then ``opts``."""
    if max_iter:
        out = ["SOLVER.SCHEDULE_UNIT", "iter", "SOLVER.MAX_ITER", str(max_iter),
               "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "1000000",
               "TEST.EVAL_PERIOD", str(max_iter)]
    else:
        out = ["SOLVER.MAX_ITER", str(epochs), "TEST.EVAL_PERIOD", str(eval_period)]
    return out + list(opts)


def resolve_arm(arm: str, config_file: str, opts: Sequence[str], num_workers: int) -> dict:
    """The arm's settings as the trainer will see them (config + overrides + ``prepare_solver`` on
    ``num_workers`` workers): optimizer (with its distinctive values), total batch, LR, iterations, evaluation
    period, iterations per epoch, training images. ``config_file`` is recorded as given."""
    from ..config import load_config
    from ..data import register_datasets, train_set_size
    from ..solver import prepare_solver

    cfg = load_config(config_file, opts, num_workers)
    register_datasets(cfg)
    images = train_set_size(cfg)
    resolved = prepare_solver(cfg, num_workers, images)
    s = resolved.SOLVER
    total_batch = s.IMS_PER_BATCH * s.ACCUMULATE_STEPS
    optimizer = s.OPTIMIZER.upper()
    if optimizer == "LARS":
        optimizer += f" (eta {s.LARS.TRUST_COEFFICIENT:g})"
    elif optimizer == "PMDLAMB":  # its LR is the global eta: every layer moves by eta x alpha x ||w||
        optimizer += f" (alpha {s.PMDLAMB.SCALE:g}, T {s.PMDLAMB.CYCLE})"
    if s.AGVM.ENABLED:
        optimizer += f" + AGVM (tau {s.AGVM.INTERVAL})"
    return {
        "arm": arm,
        "config": config_file,
        "optimizer": optimizer,
        "total_batch": total_batch,
        "lr": s.BASE_LR,
        "max_iter": s.MAX_ITER,
        "eval_period": resolved.TEST.EVAL_PERIOD,
        "iters_per_epoch": images / total_batch,
        "train_images": images,
    }


# ---------------------------------------------------------------------------------------------------------------
# reading an arm's output
# ---------------------------------------------------------------------------------------------------------------
def eval_iterations(info: dict) -> List[int]:
    """Iterations at which detectron2 records the evaluations: EvalHook runs after iteration k * period - 1
    while k * period < MAX_ITER, and after training (recorded at MAX_ITER)."""
    period, max_iter = info.get("eval_period", 0), info["max_iter"]
    periodic = list(range(period - 1, max_iter - 1, period)) if period > 0 else []
    return periodic + [max_iter]


def log_evals(log: str) -> List[tuple]:
    """(AP, AP50) of each evaluation, in order, from detectron2's "copypaste:" lines of the main process."""
    out, lines = [], log.splitlines()
    for i, line in enumerate(lines):
        if line.rstrip().endswith("copypaste: AP,AP50,AP75,APs,APm,APl") and i + 1 < len(lines):
            values = lines[i + 1].split("copypaste:")[-1].strip().split(",")
            try:
                out.append((float(values[0]), float(values[1])))
            except (ValueError, IndexError):
                pass
    return out


def merge_evals(metrics: List[dict], log: str, iterations: List[int]) -> List[tuple]:
    """(iteration, AP, AP50) of every evaluation. metrics.json can miss one: its writer (every 20 iterations)
    keeps only the latest value of a key, so of two evaluations less than 20 iterations apart (1 epoch = 16
    iterations at batch 64) only the second is written. The log has them all (4 decimals): its k-th evaluation
    is at the k-th of ``iterations``; metrics.json's value is used where it has one."""
    found = {m["iteration"]: (m["bbox/AP"], m.get("bbox/AP50", float("nan")))
             for m in metrics if "bbox/AP" in m and "iteration" in m}
    for it, values in zip(iterations, log_evals(log)):
        found.setdefault(it, values)
    return [(it, *found[it]) for it in sorted(found)]


def summarize_arm(arm_dir: str, info: dict) -> dict:
    """Curves and final numbers of one arm from its metrics.json, train.log and result.json (``info``: its
    :func:`resolve_arm`)."""
    metrics = read_metrics_rows(os.path.join(arm_dir, "metrics.json"))
    result = read_json(os.path.join(arm_dir, "result.json")) or {}
    log = read_text(os.path.join(arm_dir, "train.log")) or read_text(os.path.join(arm_dir, "log.txt"))
    ipe = info["iters_per_epoch"]
    evals = merge_evals(metrics, read_text(os.path.join(arm_dir, "log.txt")), eval_iterations(info))
    losses = [(m["iteration"], m["total_loss"]) for m in metrics if "total_loss" in m and "iteration" in m]
    guard = [m["explosion_ratio_max"] for m in metrics if "explosion_ratio_max" in m]
    lr = info["lr"]
    match = LR_LINE.search(log)
    if match:
        lr = float(match.group(2))
    returncode = result.get("returncode")
    diverged = bool(result.get("diverged")) or (returncode not in (None, 0) and bool(DIVERGED.search(log)))
    failed = returncode not in (None, 0) and not diverged
    # detectron2 records the periodic evaluations at iteration k * period - 1 and the final one (after_train) at
    # MAX_ITER; an evaluation at MAX_ITER - 1 or later is the final one
    finished = any(it >= info["max_iter"] - 1 for it, *_ in evals)
    ap = ap50 = None
    if diverged:
        ap = ap50 = 0.0
    elif finished:
        _, ap, ap50 = max(evals)
    # largebatch's guard names the iteration; detectron2's own checks ("Predicted boxes or scores contain
    # Inf/NaN. Training has diverged.") do not: then the last iteration metrics.json holds (detectron2 writes
    # the failing iteration's metrics when training stops)
    match = re.search(r"Training diverged at iteration (\d+)", log)
    diverged_at = int(match.group(1)) if match else (max(m["iteration"] for m in metrics) if metrics else None)
    return {
        **info,
        "lr": lr,
        "ap": ap,
        "ap50": ap50,
        "final_loss": losses[-1][1] if losses else None,
        "guard_max": guard[-1] if guard else None,  # the explosion guard's highest ratio over the steps taken
        "wall_s": result.get("wall_s"),
        "cpu_s": result.get("cpu_s"),
        "load": result.get("load_avg"),
        "started": result.get("started"),
        "ended": result.get("finished"),
        "returncode": returncode,
        "diverged": diverged,
        "diverged_at": diverged_at if diverged else None,
        "failed": failed,
        "finished": finished,
        # curves against epochs: iteration i ends after (i + 1) / iterations-per-epoch epochs
        "ap_curve": [(min(it + 1, info["max_iter"]) / ipe, a, a50) for it, a, a50 in evals],
        "loss_curve": [(min(it + 1, info["max_iter"]) / ipe, loss) for it, loss in losses],
    }


def grad_var_records(arm_dir: str) -> List[tuple]:
    """(iteration, {part: Phi}) of every gradient-variance record of the run (the monitor's layer_stats.jsonl,
    which keeps every record; metrics.json keeps only the latest of each 20 iterations)."""
    _, records = read_layer_stats(os.path.join(arm_dir, "layer_stats.jsonl"))
    return [(r["iter"], {k: v for k, v in r["grad_var"].items() if v is not None})
            for r in records if isinstance(r.get("grad_var"), dict)]


def noise_records(arm_dir: str) -> List[tuple]:
    """(iteration, {part: (|G|^2, tr(Sigma))}) of every gradient-variance record of the run: each measurement's
    unbiased terms of the gradient noise scale (largebatch.noise_scale), from layer_stats.jsonl."""
    _, records = read_layer_stats(os.path.join(arm_dir, "layer_stats.jsonl"))
    return [(r["iter"], {k: tuple(v) for k, v in r["noise"].items() if v and None not in v})
            for r in records if isinstance(r.get("noise"), dict)]


def phi_summary(row: dict, records: List[tuple], bn: str, after_epochs: float = 1.0) -> dict:
    """Mean Phi per part over the records after ``after_epochs`` (the warm-up), and how many of them have the
    backbone's Phi above 1 (cos < 0: the two halves' backbone gradients point apart)."""
    start = after_epochs * row["iters_per_epoch"]
    kept = [phi for it, phi in records if it >= start]
    parts = sorted({p for phi in kept for p in phi})
    mean = {p: sum(phi[p] for phi in kept if p in phi) / sum(1 for phi in kept if p in phi) for p in parts}
    above = sum(1 for phi in kept if phi.get("backbone", 0.0) > 1.0)
    return {"arm": row["arm"], "total_batch": row["total_batch"], "bn": bn, "records": len(kept), "mean": mean,
            "backbone_above_1": f"{above} of {len(kept)}"}


def is_done(arm_dir: str, info: dict, opts: Sequence[str], num_workers: int) -> bool:
    """A finished run of the same settings: result.json says so and metrics.json has its final evaluation
    (or it diverged, which is a result too)."""
    result = read_json(os.path.join(arm_dir, "result.json"))
    if not result or result.get("overrides") != list(opts) or result.get("num_workers") != num_workers:
        return False
    if result.get("diverged"):
        return True
    return result.get("returncode") == 0 and summarize_arm(arm_dir, info)["finished"]


# ---------------------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------------------
def fmt_number(x, spec: str = ".2f") -> str:
    """``x`` formatted, "-" for None / NaN."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def fmt_duration(seconds) -> str:
    """Seconds as m:ss, "-" for None."""
    if seconds is None:
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"


def _divergence(r: dict) -> str:
    if r["diverged"]:
        return f"yes (iteration {r['diverged_at']})" if r["diverged_at"] is not None else "yes"
    if r["failed"]:
        return f"no: failed (exit {r['returncode']}, see train.log)"
    if r["returncode"] is None:
        return "not run"
    return "no" if r["finished"] else "no: unfinished"


def table(rows: List[dict]) -> str:
    """The markdown table of the arms (rows of :func:`summarize_arm`)."""
    head = ("| arm | optimizer | total batch | iterations | LR (resolved) | AP | AP50 | final loss | guard max "
            "| wall time | CPU time | load | diverged? |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['optimizer']} | {r['total_batch']} | {r['max_iter']} | {r['lr']:g} "
            f"| {fmt_number(r['ap'])} | {fmt_number(r['ap50'])} | {fmt_number(r['final_loss'], '.3f')} "
            f"| {fmt_number(r['guard_max'], '.1f')} | {fmt_duration(r['wall_s'])} | {fmt_duration(r['cpu_s'])} "
            f"| {fmt_number(r['load'], '.1f')} | {_divergence(r)} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# the sweep at the critical batch (bench/study_sweep.py): every recipe at chosen batches x the same LR multipliers
# ---------------------------------------------------------------------------------------------------------------
def sweep_run_name(recipe: str, batch: int, multiplier: float) -> str:
    """``lamb_b64`` at batch 48 and LR x0.5 -> ``lamb_b48_x0.5`` (the recipe's name without its batch)."""
    stem = re.sub(r"_b\d+", "", recipe, count=1)
    return f"{stem}_b{batch}_x{multiplier:g}"


def sweep_overrides(cfg, batch: int, multiplier: float, steps: int, records: int = 20) -> List[str]:
    """KEY VALUE overrides that move a recipe (its loaded config ``cfg``) to total batch ``batch`` with its
    BASE_LR x ``multiplier`` (the recipe's own scaling rule still applies on top), for a run of ``steps``
    optimizer steps. What the recipes tie to their run length or batch follows the recipe's own rule:
    PMD-LAMB's T stays 10% of the run (LargeDet), MegDet's warm-up starts at the reference batch's LR
    (WARMUP_FACTOR = REFERENCE_BATCH / batch, for a recipe that states it so), and the monitor measures about
    ``records`` times per run."""
    s = cfg.SOLVER
    out = ["SOLVER.IMS_PER_BATCH", str(batch // s.ACCUMULATE_STEPS), "SOLVER.BASE_LR", repr(s.BASE_LR * multiplier),
           "MONITOR.PERIOD", str(max(1, round(steps / records)))]
    if s.OPTIMIZER.upper() == "PMDLAMB":
        out += ["SOLVER.PMDLAMB.CYCLE", str(max(1, round(0.1 * steps)))]
    reference = s.LR_SCALING.REFERENCE_BATCH
    # the recipe starts its warm-up at the reference batch's LR (MegDet): keep that at the new batch
    recipe_batch = s.IMS_PER_BATCH * s.ACCUMULATE_STEPS
    if s.LR_SCALING.RULE != "none" and math.isclose(s.WARMUP_FACTOR, reference / recipe_batch):
        out += ["SOLVER.WARMUP_FACTOR", repr(min(1.0, reference / batch))]
    return out


def last_value(arm_dir: str, key: str):
    """The last value metrics.json holds for ``key`` (None where it has none)."""
    values = [m[key] for m in read_metrics_rows(os.path.join(arm_dir, "metrics.json")) if key in m]
    return values[-1] if values else None


def best_run(runs: List[dict]):
    """The run with the highest AP (None if none has one; a diverged run counts with AP 0)."""
    scored = [r for r in runs if r.get("ap") is not None]
    return max(scored, key=lambda r: r["ap"]) if scored else None


def sweep_table(rows: List[dict], baseline_best: dict, batches: Sequence[int], multipliers: Sequence[float],
                keep_within: float = 1.0) -> str:
    """One line per recipe: its AP at every (batch, LR multiplier), the best of each batch's sweep in bold, and
    that best against the baseline's best (rows of :func:`summarize_arm` with ``recipe`` and ``multiplier``):
    "keeps" where it is at most ``keep_within`` AP below."""
    by_recipe: dict = {}
    for r in rows:
        by_recipe.setdefault(r["recipe"], []).append(r)
    cols = [(b, m) for b in batches for m in multipliers]
    lines = ["| recipe | " + " | ".join(f"B {b} x{m:g}" for b, m in cols) + " | "
             + " | ".join(f"best at B {b} against the baseline" for b in batches) + " |",
             "|---|" + "---:|" * len(cols) + "---|" * len(batches)]
    for recipe, runs in by_recipe.items():
        cells, verdicts = [], []
        for b in batches:
            at_b = [r for r in runs if r["total_batch"] == b]
            best = best_run(at_b)
            for m in multipliers:
                r = next((x for x in at_b if x["multiplier"] == m), None)
                cell = "-" if r is None or r["ap"] is None else fmt_number(r["ap"])
                if r is not None and r["diverged"]:
                    cell += " (diverged)"
                cells.append(f"**{cell}**" if r is not None and r is best and len(at_b) > 1 else cell)
            if best is None or baseline_best is None:
                verdicts.append("-")
            else:
                delta = best["ap"] - baseline_best["ap"]
                verdicts.append(f"{'keeps' if delta >= -keep_within else 'loses'} ({delta:+.2f} AP, "
                                f"x{best['multiplier']:g})")
        lines.append(f"| {recipe} | " + " | ".join(cells) + " | " + " | ".join(verdicts) + " |")
    return "\n".join(lines)
