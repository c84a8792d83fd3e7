"""The LR schedules of largebatch: warm-up + multistep / cosine / cosine with warm restarts (SGDR) / poly.

Everything here is built on fvcore ``ParamScheduler`` objects (a multiplier of the base LR as a function of
``where`` in [0, 1) of the run) driven by detectron2's ``LRMultiplier``, a torch LR scheduler whose only state
is ``last_epoch`` (= the iteration) and ``base_lrs``: it checkpoints and resumes on detectron2 0.6 and main.

Schedules (``SOLVER.LR_SCHEDULER_NAME``), all with detectron2's warm-up (WARMUP_FACTOR, WARMUP_ITERS,
WARMUP_METHOD, ``WarmupParamScheduler``: the warm-up starts at ``WARMUP_FACTOR * schedule(0)`` and, when
linear, ends at the schedule's value at WARMUP_ITERS):

``WarmupMultiStepLR``
    multiplier ``GAMMA ** k`` from the k-th of SOLVER.STEPS on (any GAMMA, > 1 included); steps >= MAX_ITER
    are ignored with a warning. Unlike fvcore's MultiStepParamScheduler, steps may repeat or be 0.
``WarmupCosineLR``
    detectron2 main's semantics: ``CosineParamScheduler(1, BASE_LR_END / BASE_LR)`` over the whole run
    (the warm-up is composed on top, so it ends slightly below 1); BASE_LR == 0 gives a constant multiplier.
``WarmupCosineRestartsLR``
    SGDR (Loshchilov & Hutter 2017, eq. 5; CoolDet eq. 3). The cycles start where the warm-up ends
    (iteration WARMUP_ITERS; the warm-up only happens once, at the start of training, and ramps to the first
    cycle's start value 1). Cycle i lasts ``L_i = max(1, round(CYCLE_ITERS * CYCLE_MULT ** i))`` iterations
    (each length rounded on its own, Python's round, so a non-integer CYCLE_MULT gives deterministic integer
    lengths), its peak is ``GAMMA ** i`` and inside it the multiplier is
    ``end + (GAMMA**i - end) * (1 + cos(pi * t_cur / L_i)) / 2`` with ``end = BASE_LR_END / BASE_LR`` and
    ``t_cur`` the iterations since the cycle started. Cycles continue to the end of the run (the last one may
    be cut short). With no warm-up, GAMMA 1 and integer CYCLE_MULT this is exactly torch's
    ``CosineAnnealingWarmRestarts(T_0=CYCLE_ITERS, T_mult=CYCLE_MULT, eta_min=BASE_LR_END)``.

``WarmupPolyLR``
    semantic segmentation's "poly" (mmsegmentation's, which AGVM's Semantic FPN runs follow):
    ``end + (1 - end) * (1 - where) ** POLY_POWER`` with ``end = BASE_LR_END / BASE_LR``, over the whole run as
    the cosine (mmsegmentation's ``(base - min) * (1 - t / T) ** power + min``).

Iteration-based schedulers map ``where`` to an iteration ``where * MAX_ITER`` and snap it to the nearest
integer when it is within floating-point noise of one (``58 / 100 * 100 == 57.99999999999999``), so that a
step or a restart happens exactly at its iteration.

The solver keys these schedules read are resolved first by ``largebatch.solver.prepare_solver``.
"""
import bisect
import logging
import math
from typing import List, Optional

import torch
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler, ParamScheduler

from .config import validate

__all__ = [
    "GammaStepsParamScheduler",
    "CosineRestartsParamScheduler",
    "PolyParamScheduler",
    "build_param_scheduler",
    "build_lr_scheduler",
    "lr_curve",
    "schedule_marks",
]

logger = logging.getLogger("largebatch")


def _iteration(where: float, num_updates: float) -> float:
    """``where * num_updates``, snapped to the nearest integer when it is within rounding noise of it."""
    t = where * num_updates
    r = round(t)
    if abs(t - r) <= 1e-9 * max(1.0, abs(t)):
        return float(r)
    return t


class GammaStepsParamScheduler(ParamScheduler):
    """The product of the gammas of the milestones (iterations) <= the current iteration: ``gamma ** k`` with
    one ``gamma``, or per-milestone multipliers ``gammas`` (MegDet's long policy: 0.1, 0.1, 0.5).

    Not fvcore's MultiStepParamScheduler (one gamma, strictly increasing milestones > 0): milestones may be 0
    or repeat (a repeated milestone multiplies by its gamma twice), and ``where`` is snapped to whole
    iterations (see module doc).
    """

    def __init__(self, gamma: float, milestones: List[int], num_updates: int, gammas: Optional[List[float]] = None):
        if num_updates <= 0:
            raise ValueError(f"num_updates must be > 0, got {num_updates}")
        gammas = [float(gamma)] * len(milestones) if not gammas else [float(g) for g in gammas]
        if len(gammas) != len(milestones):
            raise ValueError(f"gammas: expected one per milestone ({len(milestones)}), got {len(gammas)}")
        pairs = sorted(zip(milestones, gammas), key=lambda pair: pair[0])
        self._milestones = [m for m, _ in pairs]
        self._products = [1.0]  # the multiplier after k milestones
        for _, g in pairs:
            self._products.append(self._products[-1] * g)
        self._num_updates = num_updates

    def __call__(self, where: float) -> float:
        k = bisect.bisect_right(self._milestones, _iteration(where, self._num_updates))
        return self._products[k]


class CosineRestartsParamScheduler(ParamScheduler):
    """Cosine annealing with warm restarts (SGDR), lengths in iterations.

    Args:
        start_value: multiplier at the start of the first cycle (its peak).
        end_value: multiplier every cycle anneals to (SGDR's eta_min, relative).
        cycle_length: length of the first cycle in iterations (T_0, >= 1).
        cycle_mult: each cycle is this many times longer than the one before (T_mult >= 1); cycle i lasts
            ``max(1, round(cycle_length * cycle_mult ** i))`` iterations.
        gamma: the peak of cycle i is ``start_value * gamma ** i``.
        num_updates: iterations of the whole run: ``where`` is mapped to iteration ``where * num_updates``.
        offset: iteration at which the first cycle starts (the end of the warm-up); before it the
            multiplier is ``start_value``, the value a warm-up composed on top ramps to.
    """

    def __init__(
        self,
        start_value: float,
        end_value: float,
        cycle_length: int,
        cycle_mult: float = 1.0,
        gamma: float = 1.0,
        num_updates: int = 1,
        offset: int = 0,
    ):
        if not cycle_length >= 1:
            raise ValueError(f"cycle_length must be >= 1 iteration, got {cycle_length}")
        if not cycle_mult >= 1:
            raise ValueError(f"cycle_mult must be >= 1, got {cycle_mult}")
        if num_updates <= 0:
            raise ValueError(f"num_updates must be > 0, got {num_updates}")
        self._start_value = float(start_value)
        self._end_value = float(end_value)
        self._cycle_length = cycle_length
        self._cycle_mult = float(cycle_mult)
        self._gamma = float(gamma)
        self._num_updates = num_updates
        self._offset = offset
        # cycle i spans [starts[i], starts[i + 1]) iterations after the offset; extended lazily (mult > 1)
        self._starts = [0, self._length(0)]

    def _length(self, i: int) -> int:
        return max(1, int(round(self._cycle_length * self._cycle_mult ** i)))

    def _cycle(self, t: float):
        """(index, start, length) of the cycle holding t iterations after the offset (t >= 0)."""
        if self._cycle_mult == 1.0:
            length = self._length(0)
            i = int(t // length)
            return i, i * length, length
        starts = self._starts
        while starts[-1] <= t:
            starts.append(starts[-1] + self._length(len(starts) - 1))
        i = bisect.bisect_right(starts, t) - 1
        return i, starts[i], starts[i + 1] - starts[i]

    def cycle_starts(self, until: float) -> List[int]:
        """Iterations (offset included) at which the cycles start, those < ``until``."""
        out, start, i = [], 0, 0
        while start + self._offset < until:
            out.append(start + self._offset)
            start += self._length(i)
            i += 1
        return out

    def __call__(self, where: float) -> float:
        t = _iteration(where, self._num_updates) - self._offset
        if t < 0:
            return self._start_value
        i, start, length = self._cycle(t)
        peak = self._start_value * self._gamma ** i
        end = self._end_value
        return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * (t - start) / length))


class PolyParamScheduler(ParamScheduler):
    """``end_value + (start_value - end_value) * (1 - where) ** power``: the poly schedule with a floor (fvcore's
    PolynomialDecayParamScheduler decays to 0)."""

    def __init__(self, start_value: float, end_value: float, power: float):
        self._start_value, self._end_value, self._power = start_value, end_value, power

    def __call__(self, where: float) -> float:
        return self._end_value + (self._start_value - self._end_value) * max(0.0, 1.0 - where) ** self._power


def _end_ratio(cfg) -> float:
    s = cfg.SOLVER
    return 1.0 if s.BASE_LR == 0 else s.BASE_LR_END / s.BASE_LR  # with BASE_LR 0, the LR is 0 whatever the multiplier


def _main_scheduler(cfg) -> ParamScheduler:
    s = cfg.SOLVER
    name = s.LR_SCHEDULER_NAME
    max_iter = s.MAX_ITER
    if name == "WarmupMultiStepLR":
        kept = [i for i, x in enumerate(s.STEPS) if x < max_iter]
        if len(kept) != len(s.STEPS):
            logger.warning(
                "SOLVER.STEPS %s: the steps >= SOLVER.MAX_ITER (%s) are ignored", tuple(s.STEPS), max_iter
            )
        gammas = [s.STEP_GAMMAS[i] for i in kept] if s.STEP_GAMMAS else None
        return GammaStepsParamScheduler(s.GAMMA, [s.STEPS[i] for i in kept], max_iter, gammas)
    if name == "WarmupCosineLR":
        return CosineParamScheduler(1.0, _end_ratio(cfg))
    if name == "WarmupPolyLR":
        return PolyParamScheduler(1.0, _end_ratio(cfg), s.POLY_POWER)
    # WarmupCosineRestartsLR
    r = s.RESTARTS
    return CosineRestartsParamScheduler(
        1.0,
        _end_ratio(cfg),
        r.CYCLE_ITERS,
        cycle_mult=r.CYCLE_MULT,
        gamma=r.GAMMA,
        num_updates=max_iter,
        offset=min(s.WARMUP_ITERS, max_iter),
    )


def build_param_scheduler(cfg) -> ParamScheduler:
    """The multiplier of BASE_LR as a function of ``where = iteration / MAX_ITER`` (warm-up included).

    ``cfg`` holds iterations (run ``largebatch.solver.prepare_solver`` first when it uses epochs or scaling).
    It is validated first: an unknown SOLVER.LR_SCHEDULER_NAME, or a BASE_LR_END above BASE_LR, raises ConfigError.
    """
    validate(cfg)
    s = cfg.SOLVER
    sched = _main_scheduler(cfg)
    return WarmupParamScheduler(
        sched, s.WARMUP_FACTOR, min(s.WARMUP_ITERS / s.MAX_ITER, 1.0), s.WARMUP_METHOD
    )


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer) -> LRMultiplier:
    """detectron2's ``LRMultiplier`` over :func:`build_param_scheduler`: every param group's LR is its initial
    LR times the multiplier (so per-group LR factors are kept)."""
    return LRMultiplier(optimizer, multiplier=build_param_scheduler(cfg), max_iter=cfg.SOLVER.MAX_ITER)


# ---------------------------------------------------------------------------------------------------------------
# what the trainer sees
# ---------------------------------------------------------------------------------------------------------------
def lr_curve(cfg, base_lr: Optional[float] = None) -> List[float]:
    """LR at iterations 0..MAX_ITER-1 as the trainer sees it: an LRMultiplier from :func:`build_lr_scheduler`
    on a dummy optimizer, stepped once per iteration (cfg in iterations, i.e. after :func:`prepare_solver`)."""
    lr = cfg.SOLVER.BASE_LR if base_lr is None else base_lr
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = build_lr_scheduler(cfg, optimizer)
    out = []
    for _ in range(cfg.SOLVER.MAX_ITER):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def schedule_marks(cfg) -> dict:
    """Iterations worth marking on a plot: ``warmup_end`` (None without warm-up), ``steps`` (LR drops or
    rises of WarmupMultiStepLR, those < MAX_ITER) and ``restarts`` (WarmupCosineRestartsLR cycle starts
    after the first, < MAX_ITER)."""
    s = cfg.SOLVER
    marks = {"warmup_end": None, "steps": [], "restarts": []}
    if s.WARMUP_ITERS > 0:
        marks["warmup_end"] = min(s.WARMUP_ITERS, s.MAX_ITER)
    if s.LR_SCHEDULER_NAME == "WarmupMultiStepLR":
        marks["steps"] = [x for x in s.STEPS if x < s.MAX_ITER]
    elif s.LR_SCHEDULER_NAME == "WarmupCosineRestartsLR":
        sched = _main_scheduler(cfg)
        marks["restarts"] = sched.cycle_starts(s.MAX_ITER)[1:]
    return marks
