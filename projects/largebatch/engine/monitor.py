"""``MonitorHook``: per-layer and per-part trust ratios and local LRs, and the divergence jump check.

On every MONITOR.PERIOD-th iteration (``iter % PERIOD == 0``), and on no other, right after the optimizer
step and before the LR scheduler moves on (the trainer inserts the hook right after the IterationTimer):

- the trust ratio of every layer (parameter tensor):
  * LARS / LAMB / PMD-LAMB (also under AGVM or gradient clipping): the ratio the optimizer used in this
    step, read from its ``last_trust_ratios()``, never recomputed (LARS: its local LR
    ``eta * ||w|| / (||g|| + beta * ||w||)``; LAMB: ``||w|| / ||u||``; PMD-LAMB: ``||w|| / ||u||`` without
    its ``scale``); 1.0 in ``adapt=False`` groups, as the optimizer applied it;
  * any other optimizer (SGD, AdamW): LargeDet's ratio ``||w|| / ||g||`` (Fig. 3), 1.0 where a norm is 0.
    ``g`` is the gradient the step used (global mean over the workers, unscaled, before gradient clipping);
    its norms are the ones the trainer already took for its finiteness check (``stepper.grad_norms``).
    ``w`` is the weight that gradient was taken at, i.e. *before* the step: its norms are taken in
    ``before_step`` of a recording iteration (one fused ``_foreach_norm``), so that ratio and gradient
    belong to the same point, as for LARS / LAMB, which also use the pre-step weights;
- local LR = the LR the layer's param group stepped with (the scheduler's LR, times AGVM's mu where AGVM
  applied it) x trust ratio (CoolDet Fig. 1, 4, 5);
- per part (backbone, fpn, rpn, box_head, ...): ``trust_ratio/<part>`` and ``local_lr/<part>`` (means over
  the part's layers, i.e. its trainable parameter tensors, ``adapt=False`` ones with the 1.0 the optimizer
  used; layers without a gradient are left out) and ``trust_ratio_min|max/<part>``,
  ``local_lr_min|max/<part>`` into EventStorage (metrics.json, TensorBoard), with ``smoothing_hint=False``;
- per layer, on the main process only, one compact JSON line per record appended to
  ``OUTPUT_DIR/layer_stats.jsonl``; the first line names the layers once (see ``LAYER_STATS_FORMAT``);
- the jump check: a part whose gradient norm or mean trust ratio became non-finite, or grew more than
  MONITOR.DIVERGENCE_FACTOR times since the previous record, stops training with one FloatingPointError
  naming the iteration and the parts. It runs before the PeriodicCheckpointer hook, so nothing of the
  diverged iteration is saved: ``--resume`` uses the last good checkpoint. (Non-finite losses and gradients
  are caught earlier, every iteration and before the step, by the trainer's stepper.)

What the hook reads, and nothing else: the stepper's published ``GradientMeasurement`` of the iteration
(``trainer.stepper.measurement``: per-layer gradient norms, whether GradScaler skipped the step, and Phi where
it was measured; ``largebatch.probe``) and public optimizer methods (``last_trust_ratios()``, AGVM's ``mu``
and ``applied_lrs()``). The gradient variance ``grad_var/<part>`` is measured by the stepper, where the
per-worker gradients are, every MONITOR.PERIOD iterations as well.

All values are identical on every worker (the gradients are all-reduced, the weights replicated), so every
worker takes the same decision in the jump check. Work is done only on recording iterations, with tensor
ops over all layers at once; the per-layer to per-part mapping is built once, in ``before_train``.
"""
import json
import logging
import math
import os
from typing import Dict, List, Optional

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..files import atomic_write
from ..optim import AGVM
from ..optim.build import OPTIMIZER_CLASSES, optimizer_name
from ..probe import GradientMeasurement

logger = logging.getLogger("largebatch")

#: Layout of ``layer_stats.jsonl``. Line 1, once: ``{"format": LAYER_STATS_FORMAT, "names": [layer names],
#: "parts": [part of each layer], "groups": [optimizer param-group index of each layer], "ratio":
#: "optimizer" | "weight_grad_norm", "optimizer": class name, "period": MONITOR.PERIOD}``. Then one line
#: per record: ``{"iter": i, "lr": [LR each param group stepped with], "trust_ratio": [one per layer]}``,
#: plus ``"grad_var": {part: Phi}`` when the trainer measured Phi in that iteration and ``"agvm_mu": {part:
#: mu}`` (AGVM's multipliers after that iteration's update) when AGVM is on, and ``"explosion_check":
#: {"total_loss", "grad_norm", "explosion_ratio"}`` (what the explosion guard judged; the ratio is null in the
#: first iterations, before the guard has history), and on gradient-variance iterations ``"noise": {part:
#: [|G|^2, tr(Sigma)]}`` (that measurement's unbiased terms of the gradient noise scale, "all" = whole model) and
#: ``"noise_scale": {part: B_simple}`` (of the averaged terms, null while the averaged |G|^2 is not positive);
#: for Adam-family optimizers also ``"noise_adam"`` / ``"noise_scale_adam"``, of the preconditioned gradient.
#: LRs are exact, the other values have 6 significant digits; ``null`` marks a layer without gradient (or a
#: non-finite value). Strict JSON (no NaN / Infinity tokens). local_lr[k] = lr[groups[k]] * trust_ratio[k].
#: metrics.json and TensorBoard only get the latest value of each scalar every 20 iterations (detectron2's
#: writers): this file has every record.
LAYER_STATS_FORMAT = "largebatch.layer_stats/1"
LAYER_STATS_FILE = "layer_stats.jsonl"


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _compact(values: torch.Tensor) -> List[Optional[float]]:
    """6 significant digits; None (JSON null) for NaN / inf."""
    return [float(f"{v:.6g}") if math.isfinite(v) else None for v in values.tolist()]


def segment_stats(values: torch.Tensor, index: torch.Tensor, n: int):
    """(count, mean, min, max) of ``values`` per segment ``index`` (0 <= index < n), NaN values left out.
    Segments without a value have count 0 (and NaN statistics)."""
    valid = ~torch.isnan(values)
    v, i = values[valid], index[valid]
    count = torch.bincount(i, minlength=n)
    nan = torch.full((n,), float("nan"), dtype=values.dtype)
    mean = nan.clone().scatter_reduce_(0, i, v, "mean", include_self=False)
    lo = nan.clone().scatter_reduce_(0, i, v, "amin", include_self=False)
    hi = nan.clone().scatter_reduce_(0, i, v, "amax", include_self=False)
    return count, mean, lo, hi


def records_trust_ratios(optimizer) -> bool:
    """Whether the optimizer reports the ratios its step used (LARS, LAMB, PMD-LAMB, also inside AGVM)."""
    getter = getattr(optimizer, "last_trust_ratios", None)
    return callable(getter) and getter() is not None


class MonitorHook(HookBase):
    def __init__(self, cfg):
        monitor = cfg.MONITOR
        self.period = int(monitor.PERIOD)
        self.trust_ratio = bool(monitor.TRUST_RATIO)
        self.per_layer = bool(monitor.PER_LAYER)
        self.factor = float(monitor.DIVERGENCE_FACTOR)
        self.path = os.path.join(cfg.OUTPUT_DIR, LAYER_STATS_FILE)
        self.optimizer_name = OPTIMIZER_CLASSES[optimizer_name(cfg)].__name__
        # part -> {"grad_norm": ..., "trust_ratio": ...} of the last record, and its iteration
        self.previous: Dict[str, Dict[str, float]] = {}
        self.previous_iter: Optional[int] = None
        self._w_norms: Optional[torch.Tensor] = None

    # -- set-up, once -------------------------------------------------------------------------------------
    def before_train(self):
        self.stepper = self.trainer.stepper
        self.layout = self.stepper.layout
        self.optimizer = self.stepper.optimizer
        groups = self.optimizer.param_groups
        # params are matched by identity: the group dicts themselves are replaced by optimizer.load_state_dict
        where = {id(p): (gi, j) for gi, g in enumerate(groups) for j, p in enumerate(g["params"])}
        loc = [where[id(p)] for p in self.layout.params]
        offsets = [0]
        for g in groups:
            offsets.append(offsets[-1] + len(g["params"]))
        self.parts: List[str] = list(dict.fromkeys(groups[gi]["module"] for gi, _ in loc))
        part_id = {part: i for i, part in enumerate(self.parts)}
        self.layer_parts = [groups[gi]["module"] for gi, _ in loc]
        self.part_index = torch.tensor([part_id[part] for part in self.layer_parts], dtype=torch.long)
        self.group_index = torch.tensor([gi for gi, _ in loc], dtype=torch.long)
        # position of each layout param in the concatenation of last_trust_ratios() (optimizer group order)
        self.ratio_order = torch.tensor([offsets[gi] + j for gi, j in loc], dtype=torch.long)
        self.names = [
            groups[gi]["param_names"][j] if "param_names" in groups[gi] else f"group{gi}.param{j}" for gi, j in loc
        ]
        self.from_optimizer = records_trust_ratios(self.optimizer)
        self.write_layers = self.trust_ratio and self.per_layer and comm.is_main_process()
        if self.write_layers:
            self._start_layer_file(self.trainer.start_iter)

    def _header(self) -> dict:
        return {
            "format": LAYER_STATS_FORMAT,
            "names": self.names,
            "parts": self.layer_parts,
            "groups": self.group_index.tolist(),
            "ratio": "optimizer" if self.from_optimizer else "weight_grad_norm",
            "optimizer": self.optimizer_name,
            "period": self.period,
        }

    def _start_layer_file(self, start_iter: int) -> None:
        """A new file whose first line is the header; on resume, the existing file's records before
        ``start_iter`` are kept (those after it are being redone), if its header names the same layers."""
        header = self._header()
        kept: List[str] = []
        if start_iter > 0 and os.path.exists(self.path):
            with open(self.path) as f:
                lines = f.read().splitlines()
            try:
                old = json.loads(lines[0]) if lines else {}
            except ValueError:
                old = {}
            if all(old.get(k) == header[k] for k in ("format", "names", "parts", "groups")):
                for line in lines[1:]:
                    try:
                        if json.loads(line)["iter"] < start_iter:
                            kept.append(line)
                    except (ValueError, KeyError, TypeError):
                        break  # a line cut short by a crash: nothing after it is kept
            else:
                logger.warning("%s describes other layers: starting it anew", self.path)
        atomic_write(self.path, lambda f: f.write("\n".join([_dumps(header)] + kept) + "\n"))

    # -- every iteration: one modulo, nothing else ----------------------------------------------------------
    def before_step(self):
        if self.trust_ratio and not self.from_optimizer and self.trainer.iter % self.period == 0:
            # ||w|| before the step: the weights the gradient of this iteration is taken at
            with torch.no_grad():
                norms = torch._foreach_norm([p.detach() for p in self.layout.params])
            self._w_norms = torch.stack([n.float() for n in norms]).to("cpu", torch.float64)

    def after_step(self):
        iteration = self.trainer.iter
        if iteration % self.period != 0:
            return
        measurement = self._measurement(iteration)
        if not measurement.grads_finite:
            # only with AMP (otherwise the trainer has stopped already): GradScaler skipped this step
            logger.info("MonitorHook: iteration %d skipped by GradScaler (non-finite gradients): not recorded",
                        iteration)
            return
        grad_norms = self._grad_norms(measurement)
        if grad_norms is None:
            return
        n = len(self.parts)
        has_grad = ~torch.isnan(grad_norms)
        part_grad = torch.zeros(n, dtype=torch.float64).index_add_(
            0, self.part_index[has_grad], grad_norms[has_grad].square()
        ).sqrt_()
        part_has_grad = (torch.bincount(self.part_index[has_grad], minlength=n) > 0).tolist()
        current = {
            part: {"grad_norm": g} for part, g, ok in zip(self.parts, part_grad.tolist(), part_has_grad) if ok
        }
        if self.trust_ratio:
            ratios = self._trust_ratios(grad_norms, has_grad)
            lrs = self._step_lrs()
            local_lr = lrs[self.group_index] * ratios
            storage = self.trainer.storage
            for key, values in (("trust_ratio", ratios), ("local_lr", local_lr)):
                count, mean, lo, hi = (t.tolist() for t in segment_stats(values, self.part_index, n))
                for i, part in enumerate(self.parts):
                    if count[i] == 0:
                        continue
                    if key == "trust_ratio" and part in current:
                        current[part]["trust_ratio"] = mean[i]
                    storage.put_scalar(f"{key}/{part}", mean[i], smoothing_hint=False)
                    storage.put_scalar(f"{key}_min/{part}", lo[i], smoothing_hint=False)
                    storage.put_scalar(f"{key}_max/{part}", hi[i], smoothing_hint=False)
            if self.write_layers:
                record = {"iter": iteration, "lr": lrs.tolist(), "trust_ratio": _compact(ratios)}
                phi = measurement.phi
                if phi:
                    record["grad_var"] = dict(zip(phi, _compact(torch.tensor(list(phi.values())))))
                if isinstance(self.optimizer, AGVM):
                    mu = self.optimizer.mu
                    record["agvm_mu"] = dict(zip(mu, _compact(torch.tensor(list(mu.values()), dtype=torch.float64))))
                for suffix, noise, tracker in (("", measurement.noise, self.stepper.noise_scale),
                                               ("_adam", measurement.noise_adam, self.stepper.noise_scale_adam)):
                    if noise:  # this measurement's unbiased terms, and B_simple of their averages
                        parts = list(noise)
                        terms = torch.tensor([noise[p] for p in parts], dtype=torch.float64)
                        record[f"noise{suffix}"] = dict(zip(parts, ([g, t] for g, t in zip(
                            _compact(terms[:, 0]), _compact(terms[:, 1])))))
                        scales = [tracker.value(p) for p in parts]
                        record[f"noise_scale{suffix}"] = dict(zip(parts, _compact(torch.tensor(
                            [math.nan if v is None else v for v in scales], dtype=torch.float64))))
                if measurement.explosion_check is not None:
                    check = measurement.explosion_check
                    record["explosion_check"] = dict(zip(check, _compact(torch.tensor(
                        [math.nan if v is None else v for v in check.values()], dtype=torch.float64))))
                with open(self.path, "a") as f:
                    f.write(_dumps(record) + "\n")
        self._check_jumps(iteration, current)

    # -- the values ------------------------------------------------------------------------------------------
    def _measurement(self, iteration: int) -> GradientMeasurement:
        """The stepper's measurement of this iteration; one taken here where the hook is driven by hand."""
        measurement = self.stepper.measurement
        if measurement is not None and measurement.iteration == iteration:
            return measurement
        grads = [p.grad for p in self.layout.params if p.grad is not None]
        norms = torch.stack([n.float() for n in torch._foreach_norm(grads)]) if grads else torch.zeros(0)
        return GradientMeasurement(iteration, norms, bool(torch.isfinite(norms).all()))

    def _grad_norms(self, measurement: GradientMeasurement) -> Optional[torch.Tensor]:
        """||g|| of every layer (layout order, float64, NaN: no gradient), from the measurement."""
        params = self.layout.params
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.bool)
        if not has_grad.any():
            return None
        out = torch.full((len(params),), float("nan"), dtype=torch.float64)
        out[has_grad] = measurement.grad_norms.to("cpu", torch.float64)
        return out

    def _trust_ratios(self, grad_norms: torch.Tensor, has_grad: torch.Tensor) -> torch.Tensor:
        """Trust ratio of every layer in layout order (float64, NaN where the layer had no gradient)."""
        if self.from_optimizer:
            recorded = self.optimizer.last_trust_ratios()
            if recorded is not None and all(r is not None for r in recorded):
                flat = torch.cat([r.to("cpu", torch.float64) for r in recorded])
                return flat[self.ratio_order]
        w = self._w_norms
        if w is None:  # no before_step on this iteration (driven by hand): the post-step weights
            w = torch.stack([n.float() for n in torch._foreach_norm([p.detach() for p in self.layout.params])])
            w = w.to("cpu", torch.float64)
        self._w_norms = None
        g = grad_norms
        ratio = torch.where((w > 0) & (g > 0), w / g, torch.ones_like(w))
        return torch.where(has_grad, ratio, torch.full_like(ratio, float("nan")))

    def _step_lrs(self) -> torch.Tensor:
        """The LR each optimizer param group stepped with (AGVM's mu included where it applied it)."""
        opt = self.optimizer
        applied = opt.applied_lrs() if isinstance(opt, AGVM) else None
        lrs = applied if applied is not None else [g["lr"] for g in opt.param_groups]
        return torch.tensor(lrs, dtype=torch.float64)

    # -- divergence -------------------------------------------------------------------------------------------
    def _check_jumps(self, iteration: int, current: Dict[str, Dict[str, float]]) -> None:
        bad = []
        for part, values in current.items():
            for key, value in values.items():
                label = "gradient norm" if key == "grad_norm" else "trust ratio"
                before = self.previous.get(part, {}).get(key)
                if not math.isfinite(value):
                    bad.append(f"{part} {label} became {value}")
                elif (
                    self.factor > 0 and before is not None and math.isfinite(before) and before > 0
                    and value > self.factor * before
                ):
                    bad.append(
                        f"{part} {label} jumped {before:.4g} -> {value:.4g} (x{value / before:.3g} since "
                        f"iteration {self.previous_iter})"
                    )
        if bad:
            raise FloatingPointError(
                f"Training diverged at iteration {iteration}: {'; '.join(bad)} "
                f"(MONITOR.DIVERGENCE_FACTOR = {self.factor:g}). Stopped before this iteration was "
                f"checkpointed: {self._last_checkpoint_note()}"
            )
        self.previous = current
        self.previous_iter = iteration

    def _last_checkpoint_note(self) -> str:
        try:
            checkpointer = self.trainer.checkpointer
            if checkpointer.has_checkpoint():
                return f"--resume continues from the last good checkpoint, {checkpointer.get_checkpoint_file()}."
            return "no checkpoint had been saved yet."
        except Exception:  # a trainer without a checkpointer (tests, benchmarks)
            return "--resume continues from the last good checkpoint."

    def state_dict(self):
        return {"previous": self.previous, "previous_iter": self.previous_iter}

    def load_state_dict(self, state_dict):
        self.previous = dict(state_dict.get("previous", {}))
        self.previous_iter = state_dict.get("previous_iter")
