"""The gradient noise scale per detector part: how large a batch can grow before it stops paying.

McCandlish et al. (2018), "An Empirical Model of Large-Batch Training": with G the true gradient and Sigma the
per-example covariance of the gradients, a gradient estimated from B examples has E|G_B|^2 = |G|^2 + tr(Sigma) / B
(their eq. A.1, for the mean of B independent examples). The "simple" noise scale

    B_simple = tr(Sigma) / |G|^2                                               (their eq. 2.9)

predicts the critical batch size B_crit, up to which steps and examples trade off as S / S_min - 1 =
(E / E_min - 1)^-1 (their eq. 2.11) and doubling the batch nearly halves the steps.

Estimator (their Appendix A.1): gradients of two sizes, B_small and B_big, give unbiased estimates

    |G|^2   = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

Here the small gradients are the ones a measurement iteration already has before the all-reduce: every worker's
own gradient (W samples of ``images per worker x ACCUMULATE_STEPS`` images, |G_small|^2 their mean squared norm),
or on one worker the two halves of the batch; G_big is the global mean the step uses. The squared norms are
taken per detector part (the slices of ``probe.ModuleLayout``), so B_simple comes per part and for the whole
model (the parts' sums: both terms add over the parameters). Individual estimates are noisy and |G|^2 can come
out negative: as McCandlish recommend, the two terms are smoothed separately by exponential moving averages
(bias-corrected, as Adam's moments) and B_simple is the ratio of the averages.

``noise_terms`` computes one measurement's two terms; ``NoiseScale`` keeps their averages (checkpointed).
"""
from typing import Dict, Optional, Sequence, Tuple

import torch

from .optim.groups import DETECTOR_PARTS

__all__ = ["WHOLE_MODEL", "NoiseScale", "critical_batch_statement", "noise_terms"]

#: the key of the whole-model figure beside the parts'
WHOLE_MODEL = "all"


def noise_terms(small_sq: torch.Tensor, big_sq: torch.Tensor, small_sizes: Sequence[float],
                weights: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unbiased |G|^2 and tr(Sigma) (per example) of one measurement, per part (McCandlish App. A.1).

    small_sq: per part, the mean over the S small gradients of their squared norms (float64, shape (parts,)).
    big_sq: per part, the squared norm of the big gradient G_big = sum_s weights[s] * g_s.
    small_sizes: the examples (images) behind each small gradient g_s. weights: how G_big combines them (1/S each
    for the global mean of S workers with equal batches).

    With E|g_s|^2 = |G|^2 + tr(Sigma) / b_s and E|G_big|^2 = |G|^2 + tr(Sigma) sum_s w_s^2 / b_s (independent
    samples), the two measured means solve for the two unknowns; for S equal samples of b images and w_s = 1/S,
    this is McCandlish's pair of formulas with B_small = b and B_big = S b. Returns (grad_sq, trace), float64."""
    c_small = sum(1.0 / b for b in small_sizes) / len(small_sizes)
    c_big = sum(w * w / b for w, b in zip(weights, small_sizes))
    if not c_small > c_big:
        raise ValueError(f"the small gradients ({list(small_sizes)} examples) must be noisier than their combination")
    trace = (small_sq - big_sq) / (c_small - c_big)
    grad_sq = big_sq - c_big * trace
    return grad_sq, trace


class NoiseScale:
    """Exponential moving averages of |G|^2 and tr(Sigma) per part (and for the whole model), bias-corrected,
    and their ratio B_simple in examples (images). ``decay``: the averages' decay per measurement."""

    def __init__(self, decay: float = 0.9):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.count = 0  # measurements averaged
        self.grad_sq: Dict[str, float] = {}  # the raw (not bias-corrected) averages
        self.trace: Dict[str, float] = {}

    def update(self, grad_sq: Dict[str, float], trace: Dict[str, float]) -> None:
        """Average one measurement's terms in (every part on every measurement: a part that had no gradient this
        time contributes zeros)."""
        self.count += 1
        d = self.decay
        for part in grad_sq:
            self.grad_sq[part] = d * self.grad_sq.get(part, 0.0) + (1 - d) * float(grad_sq[part])
            self.trace[part] = d * self.trace.get(part, 0.0) + (1 - d) * float(trace[part])

    def terms(self, part: str) -> Tuple[float, float]:
        """The bias-corrected averages (|G|^2, tr(Sigma)) of ``part``."""
        correction = 1 - self.decay ** self.count
        return self.grad_sq[part] / correction, self.trace[part] / correction

    def value(self, part: str) -> Optional[float]:
        """B_simple = tr(Sigma) / |G|^2 of ``part`` in images, or None before a measurement or while the averaged
        |G|^2 is not positive (the signal is still below the noise of its estimate)."""
        if part not in self.grad_sq:
            return None
        grad_sq, trace = self.terms(part)
        return trace / grad_sq if grad_sq > 0 else None

    @property
    def parts(self):
        return list(self.grad_sq)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "count": self.count, "grad_sq": dict(self.grad_sq), "trace": dict(self.trace)}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state.get("count", 0))
        self.grad_sq = {k: float(v) for k, v in state.get("grad_sq", {}).items()}
        self.trace = {k: float(v) for k, v in state.get("trace", {}).items()}


def critical_batch_statement(noise: NoiseScale, batch: int) -> Optional[str]:
    """The one line a run ends with: the whole model's B_simple at the end (the averaged estimate McCandlish relate
    to the critical batch), each part's, and this run's batch; None when nothing was measured."""
    if WHOLE_MODEL not in noise.grad_sq:
        return None
    whole = noise.value(WHOLE_MODEL)
    known = [p for p in DETECTOR_PARTS if p in noise.parts]
    ordered = known + sorted(p for p in noise.parts if p not in known and p != WHOLE_MODEL)
    parts = ", ".join(f"{part} {_images(noise.value(part))}" for part in ordered)
    head = (f"critical batch ~{_images(whole)} at the end" if whole is not None else
            "critical batch not estimated: the averaged |G|^2 is not positive (gradient signal below its noise)")
    measurements = f"{noise.count} measurement{'' if noise.count == 1 else 's'}"
    return (f"Gradient noise scale (B_simple, McCandlish et al. 2018; {measurements}): {head}; this run's batch "
            f"{batch} images; per part: {parts}")


def _images(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3g} images"
