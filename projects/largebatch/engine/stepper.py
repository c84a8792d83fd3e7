"""``LargeBatchStepper``: the inner loop of the trainer (a detectron2 SimpleTrainer), one optimizer step a call.

It is the one place that sees the gradients after the backward pass and before the optimizer step: it
accumulates micro-batches, forms the two half means of the workers on measurement iterations and publishes
the gradient measurement (``largebatch.probe``) that AGVM and the monitor read, stops every worker at once on
non-finite losses or gradients, and handles AMP itself, so every feature sees unscaled gradients.
"""
import time
from contextlib import nullcontext
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch.nn.parallel import DistributedDataParallel

from ..noise_scale import WHOLE_MODEL, NoiseScale, noise_terms
from ..optim import AGVM
from ..probe import (
    GradientMeasurement,
    HalfGroupReducer,
    ModuleLayout,
    ReducedGradients,
    broadcast_from_main,
    cosine_variance,
    second_moment_state,
)
from .divergence import ExplosionGuard

__all__ = ["LargeBatchStepper"]


class LargeBatchStepper(SimpleTrainer):
    """One optimizer step from ``accumulate_steps`` micro-batches, with the gradient probe of AGVM/monitor.

    Args:
        model: the (possibly DDP-wrapped) model.
        data_loader, optimizer: as for SimpleTrainer; ``optimizer`` may be an ``AGVM`` wrapper.
        accumulate_steps: micro-batches per optimizer step (DDP all-reduces only the last one).
        variance_period: measure grad_var/<part> every this many iterations (0: only when AGVM needs it).
        amp: torch.autocast (float16 on CUDA, bfloat16 on CPU) + GradScaler; the gradients are unscaled
            before anything reads them (finiteness check, gradient variance, clipping, trust ratios).
        device_type: "cuda" or "cpu", for AMP.
        explosion_guard: an ``ExplosionGuard`` checked every iteration (none by default).
        noise_decay: the decay per measurement of the noise scale's moving averages (``noise_scale.NoiseScale``);
            None: the noise scale is not measured.
    """

    def __init__(self, model, data_loader, optimizer, *, accumulate_steps=1, variance_period=0, amp=False,
                 device_type="cuda", explosion_guard=None, noise_decay=0.9):
        super().__init__(model, data_loader, optimizer)
        #: the gradient noise scale per part (McCandlish et al. 2018), averaged over the measurement iterations
        #: (None: not measured)
        self.noise_scale = NoiseScale(noise_decay) if noise_decay is not None else None
        self.explosion_guard = explosion_guard if explosion_guard is not None else ExplosionGuard(factor=0)
        self.accumulate_steps = accumulate_steps
        self.variance_period = variance_period
        self.device_type = device_type
        self.grad_scaler = torch.amp.GradScaler(device_type) if amp else None
        self.layout = ModuleLayout(optimizer)  # follows the optimizer's groups across load_state_dict
        self.world_size = comm.get_world_size()
        self.reducer = HalfGroupReducer(self.world_size) if self.world_size > 1 else None
        self.agvm = optimizer if isinstance(optimizer, AGVM) else None
        self._stepping = self.agvm.optimizer if self.agvm else optimizer  # the optimizer that does the update
        # AdamW, LAMB, PMD-LAMB: Phi on Adam-normalised gradients (the official AGVM code)
        self._second_moment = second_moment_state(self._stepping)
        self.adam_normalized = self._second_moment is not None
        #: for Adam-family optimizers, the noise scale of the gradient preconditioned by 1 / (sqrt(v) + eps) too
        self.noise_scale_adam = NoiseScale(noise_decay) if noise_decay is not None and self.adam_normalized else None
        #: this iteration's GradientMeasurement (largebatch.probe), published before the optimizer step
        self.measurement: Optional[GradientMeasurement] = None
        self._last_phi: Optional[Dict[str, float]] = None
        self._stop_requested = False
        #: True on every worker from the iteration in which any worker called request_stop()
        self.stop_agreed = False

    def request_stop(self) -> None:
        """Ask every worker to stop after the current iteration (safe in a signal handler: it only sets a flag;
        the workers agree on it in the next iteration's all-reduce, see ``_check_finite``)."""
        self._stop_requested = True

    @property
    def last_phi(self) -> Optional[Dict[str, float]]:
        """The most recent Phi per part (grad_var), of this or an earlier measurement iteration."""
        return self._last_phi

    @property
    def grad_norms(self) -> Optional[torch.Tensor]:
        """This iteration's per-parameter gradient norms (see GradientMeasurement)."""
        return None if self.measurement is None else self.measurement.grad_norms

    def is_measurement_iter(self, iteration: int) -> bool:
        if self.agvm is not None and self.agvm.is_measurement_iter(iteration):
            return True
        return self.variance_period > 0 and iteration % self.variance_period == 0

    def _forward_backward(self, data, scale: float, sync: bool) -> Dict[str, torch.Tensor]:
        no_sync = isinstance(self.model, DistributedDataParallel) and not sync
        with self.model.no_sync() if no_sync else nullcontext():
            with torch.autocast(self.device_type) if self.grad_scaler is not None else nullcontext():
                loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                loss_dict = {"total_loss": loss_dict}
            losses = sum(loss_dict.values()) * scale
            (self.grad_scaler.scale(losses) if self.grad_scaler is not None else losses).backward()
        return {k: v.detach() for k, v in loss_dict.items()}

    def run_step(self):
        assert self.model.training, "[LargeBatchStepper] model was changed to eval mode!"
        start = time.perf_counter()
        batches = [next(self._data_loader_iter) for _ in range(self.accumulate_steps)]
        data_time = time.perf_counter() - start
        measure = self.is_measurement_iter(self.iter)
        k = len(batches)
        self.optimizer.zero_grad()
        loss_dicts: List[Dict[str, torch.Tensor]] = []
        reduced = None
        pre = self._preconditioner() if measure else None  # Adam's, for the preconditioned noise scale
        if measure and self.reducer is None:
            reduced = self._split_batch_halves(batches, loss_dicts, pre)
            samples = [sum(len(data) // 2 for data in batches), sum(len(data) - len(data) // 2 for data in batches)]
        else:
            for i, data in enumerate(batches):
                # DDP all-reduces the last micro-batch only, and none on measurement iterations
                loss_dicts.append(self._forward_backward(data, 1.0 / k, sync=(i == k - 1 and not measure)))
            if measure:
                reduced = self.reducer.reduce(self.layout, local_norms=self.noise_scale is not None,
                                              preconditioner=pre)
                samples = [sum(len(data) for data in batches)] * self.world_size  # equal shares (validated)
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
            if reduced is not None:
                inv_scale = 1.0 / self.grad_scaler.get_scale()
                local_sq, local_sq_pre = (None if sq is None else sq * inv_scale ** 2
                                          for sq in (reduced.local_sq, reduced.local_sq_pre))
                reduced = ReducedGradients(reduced.g1 * inv_scale, reduced.g2 * inv_scale, local_sq,
                                           reduced.mean * inv_scale, local_sq_pre)
        loss_dict = {key: sum(d[key] for d in loss_dicts) / len(loss_dicts) for key in loss_dicts[0]}
        norms, grads_finite, explosion_check = self._check_finite(loss_dict)
        phi = noise = noise_adam = None
        if reduced is not None and grads_finite:  # a step GradScaler skips is not measured: its gradients overflowed
            phi = self.measure_variance(reduced.g1, reduced.g2)
            if self.noise_scale is not None:
                noise = self.measure_noise_scale(reduced.local_sq, reduced.mean, samples, self.noise_scale, "")
            if self.noise_scale_adam is not None:
                noise_adam = self.measure_noise_scale(reduced.local_sq_pre, reduced.mean * pre, samples,
                                                      self.noise_scale_adam, "_adam")
        self.measurement = GradientMeasurement(self.iter, norms, grads_finite, phi, explosion_check, noise,
                                               noise_adam)
        self._write_metrics(loss_dict, data_time)
        if self.agvm is not None:
            if phi is not None and self.agvm.is_measurement_iter(self.iter):
                storage = get_event_storage()
                for module, mu in self.agvm.update(phi).items():  # AGVM eq. 4-5
                    storage.put_scalar(f"agvm_mu/{module}", mu, smoothing_hint=False)
            self.agvm.set_iteration(self.iter)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def _split_batch_halves(self, batches, loss_dicts, preconditioner=None):
        """One worker: G1 / G2 from the two halves of every micro-batch (two backward passes); the step then
        uses their mean, i.e. what two workers holding one half each would all-reduce."""
        if any(len(data) < 2 for data in batches):
            raise ValueError("gradient variance on one worker needs >= 2 images per batch (SOLVER.IMS_PER_BATCH)")
        halves = []
        for part in (0, 1):
            self.optimizer.zero_grad()
            for data in batches:
                n = len(data) // 2
                loss_dicts.append(self._forward_backward(data[:n] if part == 0 else data[n:], 1.0 / len(batches), True))
            halves.append(self.layout.flat_grads())
        g1, g2 = halves
        mean = (g1 + g2) / 2
        self.layout.write_grads(mean)
        local_sq = local_sq_pre = None
        if self.noise_scale is not None:
            local_sq = (self.layout.part_sq_norms(g1).double() + self.layout.part_sq_norms(g2).double()) / 2
        if preconditioner is not None:
            local_sq_pre = (self.layout.part_sq_norms(g1 * preconditioner).double() +
                            self.layout.part_sq_norms(g2 * preconditioner).double()) / 2
        return ReducedGradients(g1, g2, local_sq, mean, local_sq_pre)

    def _preconditioner(self) -> Optional[torch.Tensor]:
        """Adam's 1 / (sqrt(v) + eps) per element before this step, for the preconditioned noise scale; None
        unless the optimizer is of the Adam family and the noise scale is measured."""
        if self.noise_scale_adam is None:
            return None
        p0 = self.layout.params[0]
        like = torch.empty(0, device=p0.device, dtype=torch.promote_types(torch.float32, p0.dtype))
        return self.layout.adam_preconditioner(like, self._stepping, self._second_moment)

    def _check_finite(self, loss_dict) -> Tuple[torch.Tensor, bool]:
        """The divergence guard, every iteration, before the step: a non-finite loss (on any worker) or
        gradient stops training on every worker at once, with one FloatingPointError naming the iteration,
        the workers and their non-finite losses, and the parts whose gradients (and weights) are not finite.
        Nothing of this iteration is applied or checkpointed.

        The losses are each worker's own: one small all-reduce of a (workers x losses) table, each worker
        filling its row, gives every worker every loss, so all take the same decision and raise the same
        message (a worker that raised alone would leave the others waiting in the next collective for the
        whole timeout). The gradients are all-reduced already. The same table carries the workers' stop
        requests (``request_stop``, e.g. on SIGTERM): ``stop_agreed`` is True on every worker in the iteration in
        which any worker asked. One host sync for all of it.

        Returns the per-parameter gradient norms (layout order, parameters with a gradient only), whether
        the gradients are finite (with AMP, non-finite gradients are GradScaler's overflow, whose step it skips:
        not a divergence) and the explosion guard's reading (``GradientMeasurement.explosion_check``)."""
        with_grad = [p for p in self.layout.params if p.grad is not None]
        norms = torch.stack(torch._foreach_norm([p.grad for p in with_grad])).float() if with_grad else None
        device = norms.device if norms is not None else self.layout.params[0].device
        keys = list(loss_dict)
        # columns: the losses, "gradients not finite" (NaN), the global gradient norm (the same on every worker:
        # this worker's row only), "stop requested" (1)
        table = torch.zeros(self.world_size, len(keys) + 3, device=device)
        rank = comm.get_rank()
        table[rank, : len(keys)] = torch.stack([loss_dict[k].detach().float().sum() for k in keys])
        if norms is not None:
            table[rank, -3] = torch.where(torch.isfinite(norms).all(), 0.0, float("nan"))
            table[rank, -2] = norms.double().square().sum().sqrt()
        table[rank, -1] = float(self._stop_requested)
        if self.world_size > 1:
            torch.distributed.all_reduce(table)  # rows of zeros elsewhere: every value arrives exactly
        table = table.cpu()  # the host sync
        self.stop_agreed = bool(table[:, -1].any())
        losses = table[:, :-2]  # with the "gradients not finite" column last
        finite = torch.isfinite(losses)
        grads_finite = bool(finite[:, -1].all())
        if bool(finite[:, :-1].all()) and (grads_finite or self.grad_scaler is not None):
            explosion_check = None
            if grads_finite:  # the same values on every worker: the same decision
                explosion_check = self._check_explosion(float(losses[:, :-1].sum(dim=1).mean()),
                                                        float(table[rank, -2]))
            return norms if norms is not None else torch.zeros(0, device=device), grads_finite, explosion_check
        part_of = {id(p): g["module"] for p, g in zip(self.layout.params, self.layout.groups)}
        parts = list(dict.fromkeys(part_of[id(p)] for p in self.layout.params))  # detector-part order

        def non_finite(params, values):
            bad = {part_of[id(p)] for p, ok in zip(params, torch.isfinite(values).tolist()) if not ok}
            return [part for part in parts if part in bad]

        bad_grads = non_finite(with_grad, norms) if self.grad_scaler is None and norms is not None else []
        with torch.no_grad():
            weight_norms = torch.stack(torch._foreach_norm([p.detach() for p in self.layout.params])).float()
        bad_weights = non_finite(self.layout.params, weight_norms)
        values = losses[:, :-1]
        bad_losses = [
            f"{'' if self.world_size == 1 else f'rank {rank}: '}"
            + ", ".join(f"{k}={values[rank, i].item():g}" for i, k in enumerate(keys) if not finite[rank, i])
            for rank in range(self.world_size) if not finite[rank, :-1].all()
        ]
        found = ([f"non-finite gradients in {', '.join(bad_grads)}"] if bad_grads else []) + (
            [f"non-finite weights in {', '.join(bad_weights)}"] if bad_weights else []) + (
            [f"non-finite losses {'; '.join(bad_losses)}"] if bad_losses else [])
        raise FloatingPointError(
            f"Training diverged at iteration {self.iter}: {'; '.join(found)}. Stopped on every worker before the "
            "optimizer step: nothing of this iteration was applied or checkpointed, and --resume continues from "
            "the last good checkpoint (OUTPUT_DIR/last_checkpoint)."
        )

    def _check_explosion(self, total_loss: float, grad_norm: float) -> Dict[str, Optional[float]]:
        """The explosion guard's check (raises when it trips); logs the global gradient norm, the guard's ratio
        and the run's highest ratio so far every iteration (metrics.json, TensorBoard): how close a run comes to
        MONITOR.EXPLOSION_FACTOR."""
        guard = self.explosion_guard
        guard.check(self.iter, total_loss, grad_norm)
        ratio = guard.ratio if guard.ratio_of else None
        storage = get_event_storage()
        storage.put_scalar("grad_norm", grad_norm, smoothing_hint=False)
        if ratio is not None:
            storage.put_scalar("explosion_ratio", ratio, smoothing_hint=False)
            storage.put_scalar("explosion_ratio_max", guard.highest[0], smoothing_hint=False)  # of the run so far
        return {"total_loss": total_loss, "grad_norm": grad_norm, "explosion_ratio": ratio}

    def measure_variance(self, g1: torch.Tensor, g2: torch.Tensor) -> Dict[str, float]:
        """grad_var/<part> = 1 - cos(G1, G2) (AGVM eq. 3) from the two half means G1 / G2 (flat, layout order),
        on the Adam-normalised gradients for Adam-family optimizers; identical on all workers (rank 0's values).
        Writes the grad_var/<part> metrics and returns Phi per part. Called on measurement iterations whose step
        is taken; a subclass may override it to observe G1 / G2."""
        if self.adam_normalized:
            g1 = self.layout.adam_normalize(g1, self._stepping, self._second_moment)
            g2 = self.layout.adam_normalize(g2, self._stepping, self._second_moment)
        phi_values = broadcast_from_main(cosine_variance(g1, g2, self.layout.slices)).tolist()
        phi = dict(zip(self.layout.modules, phi_values))
        storage = get_event_storage()
        for module, value in phi.items():
            storage.put_scalar(f"grad_var/{module}", value, smoothing_hint=False)
        self._last_phi = phi
        return phi

    def measure_noise_scale(self, local_sq: torch.Tensor, mean: torch.Tensor, samples: List[int],
                            tracker: NoiseScale, suffix: str) -> Dict[str, Tuple[float, float]]:
        """The gradient noise scale's two terms (``noise_scale.noise_terms``: McCandlish et al. App. A.1) per part
        and for the whole model, from the small gradients' mean squared norms ``local_sq`` and the step's gradient
        ``mean``, with ``samples`` images behind each small gradient (the workers', or the two halves of the
        batch); averaged into ``tracker`` and written as metrics: ``noise_scale<suffix>/<part>`` (B_simple in
        images, of the averages), ``noise_grad_sq<suffix>/<part>``, ``noise_trace<suffix>/<part>`` (the averaged
        terms) and this measurement's own terms (``..._raw/<part>``); suffix "" for the raw gradient, "_adam" for
        the Adam-preconditioned one. Identical on all workers (rank 0's values). Returns this measurement's terms."""
        big_sq = self.layout.part_sq_norms(mean).double()
        weights = [1.0 / len(samples)] * len(samples)
        grad_sq, trace = noise_terms(local_sq, big_sq, samples, weights)
        terms = torch.stack([grad_sq, trace])
        values = broadcast_from_main(torch.cat([terms, terms.sum(1, keepdim=True)], dim=1)).tolist()
        parts = [*self.layout.modules, WHOLE_MODEL]
        raw_grad_sq, raw_trace = dict(zip(parts, values[0])), dict(zip(parts, values[1]))
        tracker.update(raw_grad_sq, raw_trace)
        storage = get_event_storage()
        for part in parts:
            averaged_grad_sq, averaged_trace = tracker.terms(part)
            storage.put_scalar(f"noise_grad_sq{suffix}/{part}", averaged_grad_sq, smoothing_hint=False)
            storage.put_scalar(f"noise_trace{suffix}/{part}", averaged_trace, smoothing_hint=False)
            storage.put_scalar(f"noise_grad_sq{suffix}_raw/{part}", raw_grad_sq[part], smoothing_hint=False)
            storage.put_scalar(f"noise_trace{suffix}_raw/{part}", raw_trace[part], smoothing_hint=False)
            value = tracker.value(part)
            if value is not None:
                storage.put_scalar(f"noise_scale{suffix}/{part}", value, smoothing_hint=False)
        return {part: (raw_grad_sq[part], raw_trace[part]) for part in parts}

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        ret["explosion_guard"] = self.explosion_guard.state_dict()
        for key in ("noise_scale", "noise_scale_adam"):
            if getattr(self, key) is not None:
                ret[key] = getattr(self, key).state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        if "explosion_guard" in state_dict:
            self.explosion_guard.load_state_dict(state_dict["explosion_guard"])
        for key in ("noise_scale", "noise_scale_adam"):
            if key in state_dict and getattr(self, key) is not None:
                getattr(self, key).load_state_dict(state_dict[key])
