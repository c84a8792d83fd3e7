"""``MonitorHook``: per-layer and per-part trust ratios and local LRs, and the divergence jump check.

Every MONITOR.PERIOD iterations, right after the optimizer step and before the LR scheduler moves on:
- the trust ratio of every layer: the one LARS / LAMB / PMD-LAMB used in the step (read from the
  optimizer, not recomputed), else ||w|| / ||g|| (SGD, AdamW; LargeDet Fig. 3) from the gradient norms
  the trainer already took for its finiteness check;
- local LR = the LR the layer's group stepped with (times AGVM's mu) x trust ratio (CoolDet Fig. 1, 4, 5);
- per-part mean / min / max into EventStorage (metrics.json, TensorBoard), per-layer values into
  OUTPUT_DIR/layer_stats.jsonl on the main process (the parameter names once, in the first line);
- a part whose gradient norm or mean trust ratio grew more than MONITOR.DIVERGENCE_FACTOR times since the
  previous record, or became non-finite, stops training with one error naming the iteration and the parts.
The gradient variance (grad_var/<part>) is measured by the trainer's inner loop, where gradients are.
"""
import json
import math
import os
from collections import OrderedDict
from typing import Dict, List

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..optim import AGVM


def _part_stats(values: torch.Tensor, parts: List[str]) -> "OrderedDict[str, tuple]":
    """(mean, min, max) of the finite-or-inf (not NaN: no gradient) values of each part."""
    out = OrderedDict()
    for part in OrderedDict.fromkeys(parts):
        mask = torch.tensor([p == part for p in parts]) & ~torch.isnan(values)
        if mask.any():
            v = values[mask]
            out[part] = (v.mean().item(), v.min().item(), v.max().item())
    return out


class MonitorHook(HookBase):
    def __init__(self, cfg):
        self.period = cfg.MONITOR.PERIOD
        self.trust_ratio = cfg.MONITOR.TRUST_RATIO
        self.per_layer = cfg.MONITOR.PER_LAYER and comm.is_main_process()
        self.factor = cfg.MONITOR.DIVERGENCE_FACTOR
        self.path = os.path.join(cfg.OUTPUT_DIR, "layer_stats.jsonl")
        self.previous: Dict[str, Dict[str, float]] = {}  # part -> {"grad_norm", "trust_ratio"} of the last record

    def before_train(self):
        stepper = self.trainer._trainer
        self.stepper = stepper
        self.layout = stepper.layout
        self.names = self._param_names()
        if self.per_layer and not os.path.exists(self.path):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"names": self.names, "parts": [g["module"] for g in self.layout.groups]}) + "\n")

    def _param_names(self) -> List[str]:
        index = {id(p): name for g in self.stepper.optimizer.param_groups for p, name in zip(g["params"], g["param_names"])}
        return [index[id(p)] for p in self.layout.params]

    def _ratios_in_layout_order(self) -> torch.Tensor:
        """Trust ratio of every parameter in the layout's order (NaN where it had no gradient)."""
        optimizer = self.stepper.optimizer
        getter = getattr(optimizer, "last_trust_ratios", None)
        recorded = getter() if getter is not None else None
        if recorded is not None and all(r is not None for r in recorded):
            by_param = {}
            for group, ratios in zip(optimizer.param_groups, recorded):
                for p, r in zip(group["params"], ratios.float().cpu().tolist()):
                    by_param[id(p)] = r
            return torch.tensor([by_param[id(p)] for p in self.layout.params])
        # ||w|| / ||g||, with the gradient norms the trainer took this iteration
        params = self.layout.params
        has_grad = [p.grad is not None for p in params]
        w = torch.stack(torch._foreach_norm([p.detach() for p, h in zip(params, has_grad) if h])).float().cpu()
        g = self.stepper.grad_norms.float().cpu()
        ratio = torch.where((w > 0) & (g > 0), w / g.clamp_min(1e-30), torch.ones_like(w))
        out = torch.full((len(params),), float("nan"))
        out[torch.tensor(has_grad)] = ratio
        return out

    def _lrs_in_layout_order(self) -> torch.Tensor:
        optimizer = self.stepper.optimizer
        mu = optimizer.mu if isinstance(optimizer, AGVM) and optimizer.iteration > optimizer.start_iter else {}
        return torch.tensor([g["lr"] * mu.get(g["module"], 1.0) for g in self.layout.groups], dtype=torch.float64)

    def after_step(self):
        iteration = self.trainer.iter
        if iteration % self.period != 0 or not self.trust_ratio:
            return
        parts = [g["module"] for g in self.layout.groups]
        ratios = self._ratios_in_layout_order().double()
        lrs = self._lrs_in_layout_order()
        local_lr = lrs * ratios
        storage = self.trainer.storage
        ratio_stats = _part_stats(ratios, parts)
        for name, stats in (("trust_ratio", ratio_stats), ("local_lr", _part_stats(local_lr, parts))):
            for part, (mean, lo, hi) in stats.items():
                storage.put_scalar(f"{name}/{part}", mean, smoothing_hint=False)
                storage.put_scalar(f"{name}_min/{part}", lo, smoothing_hint=False)
                storage.put_scalar(f"{name}_max/{part}", hi, smoothing_hint=False)
        grad_norms = self._part_grad_norms(parts)
        if self.per_layer:
            record = {"iter": iteration, "lr": lrs.tolist(), "trust_ratio": ratios.tolist()}
            with open(self.path, "a") as f:
                f.write(json.dumps(record, allow_nan=True) + "\n")
        self._check_jumps(iteration, ratio_stats, grad_norms)

    def _part_grad_norms(self, parts: List[str]) -> Dict[str, float]:
        norms = self.stepper.grad_norms.double().cpu()
        with_grad = [part for part, p in zip(parts, self.layout.params) if p.grad is not None]
        out = {}
        for part in OrderedDict.fromkeys(with_grad):
            mask = torch.tensor([q == part for q in with_grad])
            out[part] = norms[mask].square().sum().sqrt().item()
        return out

    def _check_jumps(self, iteration, ratio_stats, grad_norms):
        current = {
            part: {"grad_norm": grad_norms.get(part, float("nan")), "trust_ratio": ratio_stats[part][0]}
            for part in ratio_stats
        }
        bad = []
        for part, values in current.items():
            for key, value in values.items():
                before = self.previous.get(part, {}).get(key)
                if math.isinf(value) or (
                    self.factor > 0 and before is not None and before > 0 and value > self.factor * before
                ):
                    bad.append(f"{part} {key} {before if before is not None else 'n/a'} -> {value:.4g}")
        if bad:
            raise FloatingPointError(
                f"Training diverged at iteration {iteration}: {'; '.join(bad)} (MONITOR.DIVERGENCE_FACTOR "
                f"{self.factor:g}). The last good checkpoint is the one --resume uses."
            )
        self.previous = current

    def state_dict(self):
        return {"previous": self.previous}

    def load_state_dict(self, state_dict):
        self.previous = state_dict.get("previous", {})
