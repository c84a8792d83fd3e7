"""Reading what a training run wrote: ``metrics.json`` (detectron2's JSONWriter, one JSON object per line),
``layer_stats.jsonl`` (the monitor's per-layer records) and small JSON / text files, all tolerant of a last
line cut short by a crash or a kill. Per-part series are ordered as ``largebatch.config.DETECTOR_PARTS``."""
import json
import math
import os
from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Tuple

from ..optim.groups import DETECTOR_PARTS

__all__ = [
    "iter_jsonl", "read_metrics_rows", "read_metrics", "read_layer_stats", "layer_values", "add_layer_series",
    "part_order", "parts_with", "choose_records", "read_json", "read_text",
]


def iter_jsonl(path: str) -> Iterator[Optional[dict]]:
    """One parsed object per line of ``path`` (None for a line that is not JSON: blank, or cut short by a
    crash); nothing when the file is absent."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except ValueError:
                yield None


def read_metrics_rows(path: str) -> List[dict]:
    """metrics.json -> its records (dicts), in file order."""
    return [row for row in iter_jsonl(path) if isinstance(row, dict)]


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def read_metrics(path: str) -> Dict[str, Dict[int, float]]:
    """metrics.json -> {key: {iteration: value}} (numbers only); for an iteration written twice (a resumed run)
    the last line wins."""
    series: Dict[str, Dict[int, float]] = defaultdict(dict)
    for row in read_metrics_rows(path):
        it = row.get("iteration")
        if not isinstance(it, int):
            continue
        for key, value in row.items():
            v = _number(value)
            if key != "iteration" and v is not None:
                series[key][it] = v
    return dict(series)


def read_layer_stats(path: str) -> Tuple[Optional[dict], List[dict]]:
    """layer_stats.jsonl -> (header, [records sorted by iter]); (None, []) when absent, empty or headless. A
    record written twice (a resumed run) keeps its last line."""
    rows = iter_jsonl(path)
    header = next(rows, None)
    if not isinstance(header, dict) or "names" not in header:
        return None, []
    records = {row["iter"]: row for row in rows if isinstance(row, dict) and isinstance(row.get("iter"), int)}
    return header, [records[k] for k in sorted(records)]


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def layer_values(header: dict, record: dict, what: str) -> List[float]:
    """Per-layer ``"trust_ratio"`` or ``"local_lr"`` (= lr of the layer's param group x trust ratio) of one
    record of layer_stats.jsonl."""
    ratios = [_nan(v) for v in record["trust_ratio"]]
    if what == "trust_ratio":
        return ratios
    lrs = [_nan(v) for v in record["lr"]]
    return [lrs[g] * r for g, r in zip(header["groups"], ratios)]


def add_layer_series(series: dict, header: dict, records: List[dict]) -> None:
    """Add to ``series`` ({key: {iteration: value}}) the per-part mean / min / max of trust ratio and local LR,
    grad_var, agvm_mu and noise_scale of every layer_stats.jsonl record, for the iterations metrics.json lacks (its
    writer keeps only the latest value every 20 iterations, so a MONITOR.PERIOD below 20 is sampled there)."""
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
        for key in ("grad_var", "agvm_mu", "noise_scale"):
            for part, v in (record.get(key) or {}).items():
                if v is not None:
                    series.setdefault(f"{key}/{part}", {}).setdefault(it, float(v))


def part_order(parts) -> List[str]:
    """``parts`` in the order of DETECTOR_PARTS, other names (MODEL.MODULE_PARTITION's own) after, sorted."""
    parts = set(parts)
    return [p for p in DETECTOR_PARTS if p in parts] + sorted(p for p in parts if p not in DETECTOR_PARTS)


def parts_with(series: dict, prefix: str) -> List[str]:
    """The parts of the ``<prefix><part>`` keys of ``series``, in part order."""
    return part_order(k[len(prefix):] for k in series if k.startswith(prefix))


def choose_records(records: List[dict], wanted: Optional[List[int]]) -> Tuple[List[dict], List[str]]:
    """The records nearest to each wanted iteration (default: first, middle, last), without repeats, and a
    note for each wanted iteration that was not recorded."""
    if not records:
        return [], []
    iters = [r["iter"] for r in records]
    if not wanted:
        picks = [0, len(records) // 2, len(records) - 1]
    else:
        picks = [min(range(len(iters)), key=lambda i: (abs(iters[i] - w), iters[i])) for w in wanted]
    notes = [f"--iters {w}: not recorded, using the nearest record, iteration {iters[i]}"
             for w, i in zip(wanted or [], picks) if iters[i] != w]
    return [records[i] for i in dict.fromkeys(picks)], notes


def read_json(path: str) -> Optional[dict]:
    """A JSON file's content, or None when it is missing or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_text(path: str) -> str:
    """A text file's content ("" when missing; undecodable bytes replaced)."""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""
