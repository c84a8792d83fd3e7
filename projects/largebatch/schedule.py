"""LR schedules and the solver set-up of largebatch.

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

Iteration-based schedulers map ``where`` to an iteration ``where * MAX_ITER`` and snap it to the nearest
integer when it is within floating-point noise of one (``58 / 100 * 100 == 57.99999999999999``), so that a
step or a restart happens exactly at its iteration.

``prepare_solver(cfg, world_size, num_train_images)`` is the one place where the trainer resolves the solver
keys: REFERENCE_WORLD_SIZE auto-scaling, the LR scaling rule (SOLVER.LR_SCALING), epoch units and
SOLVER.SCHEDULE_MULT, every change logged on the "largebatch" logger.
"""
import bisect
import logging
import math
from typing import List, NamedTuple, Optional, Tuple

import torch
from fvcore.common.param_scheduler import CosineParamScheduler, ParamScheduler

from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler

from .norm import bn_size
from .config import LR_SCHEDULERS, ConfigError, _choice, _fail, validate

__all__ = [
    "MultiStepParamScheduler",
    "CosineRestartsParamScheduler",
    "build_param_scheduler",
    "build_lr_scheduler",
    "lr_scale_factor",
    "scale_learning_rate",
    "auto_scale_workers",
    "prepare_solver",
    "lr_curve",
    "schedule_marks",
    "train_set_size",
]

logger = logging.getLogger("largebatch")


def _iteration(where: float, num_updates: float) -> float:
    """``where * num_updates``, snapped to the nearest integer when it is within rounding noise of it."""
    t = where * num_updates
    r = round(t)
    if abs(t - r) <= 1e-9 * max(1.0, abs(t)):
        return float(r)
    return t


class MultiStepParamScheduler(ParamScheduler):
    """The product of the gammas of the milestones (iterations) <= the current iteration: ``gamma ** k`` with
    one ``gamma``, or per-milestone multipliers ``gammas`` (MegDet's long policy: 0.1, 0.1, 0.5).

    Unlike fvcore's MultiStepParamScheduler, milestones may be 0 or repeat (a repeated milestone multiplies by
    its gamma twice), and ``where`` is snapped to whole iterations (see module doc).
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


def _end_ratio(cfg) -> float:
    s = cfg.SOLVER
    if s.BASE_LR == 0:
        return 1.0  # the LR is 0 whatever the multiplier
    ratio = s.BASE_LR_END / s.BASE_LR
    if ratio > 1:
        _fail("SOLVER.BASE_LR_END", s.BASE_LR_END, f"expected a number <= SOLVER.BASE_LR ({s.BASE_LR})")
    return ratio


def _main_scheduler(cfg) -> ParamScheduler:
    s = cfg.SOLVER
    name = _choice(s.LR_SCHEDULER_NAME, "SOLVER.LR_SCHEDULER_NAME", LR_SCHEDULERS)
    max_iter = s.MAX_ITER
    if name == "WarmupMultiStepLR":
        kept = [i for i, x in enumerate(s.STEPS) if x < max_iter]
        if len(kept) != len(s.STEPS):
            logger.warning(
                "SOLVER.STEPS %s: the steps >= SOLVER.MAX_ITER (%s) are ignored", tuple(s.STEPS), max_iter
            )
        gammas = [s.STEP_GAMMAS[i] for i in kept] if s.STEP_GAMMAS else None
        return MultiStepParamScheduler(s.GAMMA, [s.STEPS[i] for i in kept], max_iter, gammas)
    if name == "WarmupCosineLR":
        return CosineParamScheduler(1.0, _end_ratio(cfg))
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

    ``cfg`` holds iterations (run :func:`prepare_solver` first when it uses epochs or scaling).
    An unknown SOLVER.LR_SCHEDULER_NAME raises ConfigError.
    """
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
# LR scaling rules
# ---------------------------------------------------------------------------------------------------------------
class LRScaling(NamedTuple):
    base_lr: float
    base_lr_end: float
    factor: float
    message: str


def lr_scale_factor(rule: str, total_batch: float, reference_batch: float, sqrt_above: float = 128) -> float:
    """Factor applied to the LR tuned for ``reference_batch`` images per step to train with ``total_batch``.

    none: 1; linear: B/ref (MegDet / Goyal et al.); sqrt: sqrt(B/ref); linear_then_sqrt (AGVM): linear up to
    S = sqrt_above images, then square root: ``B/ref`` for B <= S, ``(S/ref) * sqrt(B/S)`` for B > S
    (continuous at B = S).
    """
    b, ref = float(total_batch), float(reference_batch)
    if rule == "none":
        return 1.0
    if rule == "linear":
        return b / ref
    if rule == "sqrt":
        return math.sqrt(b / ref)
    if rule == "linear_then_sqrt":
        s = float(sqrt_above)
        return b / ref if b <= s else (s / ref) * math.sqrt(b / s)
    raise ConfigError(
        f"SOLVER.LR_SCALING.RULE = {rule!r} is not allowed: expected one of none, linear, sqrt, linear_then_sqrt"
    )


def _total_batch(cfg) -> int:
    return cfg.SOLVER.IMS_PER_BATCH * cfg.SOLVER.ACCUMULATE_STEPS


def _batch_text(cfg) -> str:
    s = cfg.SOLVER
    total = _total_batch(cfg)
    if s.ACCUMULATE_STEPS == 1:
        return f"total batch {total}"
    return f"total batch {total} = {s.IMS_PER_BATCH} images x {s.ACCUMULATE_STEPS} accumulation steps"


def scale_learning_rate(cfg, total_batch: Optional[int] = None) -> LRScaling:
    """Apply SOLVER.LR_SCALING to SOLVER.BASE_LR (cfg is not modified).

    ``total_batch`` defaults to IMS_PER_BATCH * ACCUMULATE_STEPS (images per optimizer step). BASE_LR_END is
    scaled by the same factor: the end LR keeps its ratio to the base LR. Returns
    ``(base_lr, base_lr_end, factor, message)``.
    """
    s = cfg.SOLVER
    sc = s.LR_SCALING
    batch = _total_batch(cfg) if total_batch is None else total_batch
    factor = lr_scale_factor(sc.RULE, batch, sc.REFERENCE_BATCH, sc.SQRT_ABOVE)
    lr, lr_end = s.BASE_LR * factor, s.BASE_LR_END * factor
    batch_text = _batch_text(cfg) if total_batch is None else f"total batch {batch}"
    rule = sc.RULE
    if rule == "linear_then_sqrt":
        rule += f", square root above {sc.SQRT_ABOVE}"
    msg = (
        f"BASE_LR {s.BASE_LR:g} -> {lr:g} (rule {rule}, {batch_text}, reference {sc.REFERENCE_BATCH}, "
        f"factor {factor:g})"
    )
    if s.BASE_LR_END:
        msg += f"; BASE_LR_END {s.BASE_LR_END:g} -> {lr_end:g}"
    return LRScaling(lr, lr_end, factor, msg)


# ---------------------------------------------------------------------------------------------------------------
# prepare_solver
# ---------------------------------------------------------------------------------------------------------------
# keys holding iteration counts (or epochs with SCHEDULE_UNIT "epoch"): (path, minimum when > 0)
_PERIOD_KEYS = ("SOLVER.CHECKPOINT_PERIOD", "TEST.EVAL_PERIOD")


def _get(cfg, path):
    node = cfg
    for part in path.split("."):
        node = node[part]
    return node


def _set(cfg, path, value):
    *parents, last = path.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[last] = value


def _rescale_counts(cfg, fn, what: str, note: str = ""):
    """Apply fn(value, key) -> int to every iteration-count key; log the changes."""
    s = cfg.SOLVER
    changes = []

    def update(path, value):
        old = _get(cfg, path)
        if isinstance(old, (tuple, list)):
            old_text = str(tuple(old))
            value = tuple(value)
        else:
            old_text = f"{old:g}" if isinstance(old, float) else str(old)
        _set(cfg, path, value)
        if str(value) != old_text:
            changes.append(f"{path} {old_text} -> {value}")

    update("SOLVER.MAX_ITER", max(1, fn(s.MAX_ITER)))
    update("SOLVER.STEPS", [fn(x) for x in s.STEPS])
    update("SOLVER.WARMUP_ITERS", fn(s.WARMUP_ITERS))
    update("SOLVER.RESTARTS.CYCLE_ITERS", max(1, fn(s.RESTARTS.CYCLE_ITERS)))
    for path in _PERIOD_KEYS:
        old = _get(cfg, path)
        update(path, 0 if old <= 0 else max(1, fn(old)))
    if s.AGVM.START_ITER >= 0:
        update("SOLVER.AGVM.START_ITER", fn(s.AGVM.START_ITER))
    if changes:
        logger.info("%s%s: %s", what, note, ", ".join(changes))


def auto_scale_workers(cfg, world_size: int, scale_lr: bool = True):
    """detectron2's ``DefaultTrainer.auto_scale_workers`` on a defrosted cfg, in place, extended to our keys.

    With SOLVER.REFERENCE_WORLD_SIZE = R != 0 and != world_size, scale = world_size / R: IMS_PER_BATCH is
    multiplied by it, BASE_LR (and BASE_LR_END, keeping their ratio) too when ``scale_lr``; MAX_ITER, STEPS,
    WARMUP_ITERS, CHECKPOINT_PERIOD, TEST.EVAL_PERIOD and also RESTARTS.CYCLE_ITERS and AGVM.START_ITER
    (>= 0) are divided by it (``int(round(x / scale))`` like detectron2; MAX_ITER, CYCLE_ITERS and positive
    periods stay >= 1) -- unless SCHEDULE_UNIT is "epoch", where they are epochs and the epoch conversion
    accounts for the new batch. REFERENCE_WORLD_SIZE becomes world_size, so a second call is a no-op.
    """
    s = cfg.SOLVER
    old = s.REFERENCE_WORLD_SIZE
    if old == 0 or old == world_size:
        return cfg
    if s.IMS_PER_BATCH % old != 0:
        _fail("SOLVER.IMS_PER_BATCH", s.IMS_PER_BATCH, f"expected a multiple of SOLVER.REFERENCE_WORLD_SIZE ({old})")
    scale = world_size / old
    ims = int(round(s.IMS_PER_BATCH * scale))
    msg = f"auto-scaling from REFERENCE_WORLD_SIZE {old} to {world_size} workers: IMS_PER_BATCH {s.IMS_PER_BATCH} -> {ims}"
    s.IMS_PER_BATCH = ims
    if scale_lr:
        msg += f", BASE_LR {s.BASE_LR:g} -> {s.BASE_LR * scale:g} (linear)"
        s.BASE_LR = s.BASE_LR * scale
        s.BASE_LR_END = s.BASE_LR_END * scale
    else:
        msg += " (BASE_LR left to SOLVER.LR_SCALING)"
    s.REFERENCE_WORLD_SIZE = world_size
    logger.info(msg)
    if s.SCHEDULE_UNIT != "epoch":
        _rescale_counts(cfg, lambda x: int(round(x / scale)), "auto-scaling iterations", f" (x 1/{scale:g})")
    return cfg


def train_set_size(cfg) -> Optional[int]:
    """Number of training images: the summed lengths of DATASETS.TRAIN in DatasetCatalog (before detectron2's
    filtering of images without annotations), or None when one of them is not registered."""
    from detectron2.data import DatasetCatalog

    names = list(cfg.DATASETS.TRAIN)
    if not names or any(n not in DatasetCatalog.list() for n in names):
        return None
    return sum(len(DatasetCatalog.get(n)) for n in names)


def prepare_solver(cfg, world_size: int = 1, num_train_images: Optional[int] = None):
    """Resolve the solver keys for a run on ``world_size`` workers; return a new cfg (same frozen state).

    In this order, each change logged on the "largebatch" logger:

    a. REFERENCE_WORLD_SIZE auto-scaling (:func:`auto_scale_workers`). When SOLVER.LR_SCALING.RULE is not
       "none", its linear LR factor is skipped (batch and iteration changes are kept): the LR comes only from
       the rule, applied to the original BASE_LR and the final total batch -- no double scaling.
    b. SOLVER.LR_SCALING (:func:`scale_learning_rate`), total batch = IMS_PER_BATCH * ACCUMULATE_STEPS.
    c. SCHEDULE_UNIT "epoch": MAX_ITER, STEPS, WARMUP_ITERS, RESTARTS.CYCLE_ITERS, CHECKPOINT_PERIOD,
       TEST.EVAL_PERIOD and AGVM.START_ITER (when >= 0) are epochs (floats allowed), converted to
       ``round(epochs * num_train_images / total_batch)`` iterations (MAX_ITER, CYCLE_ITERS and positive
       periods at least 1; EVAL_PERIOD 0 stays 0). num_train_images must then be > 0.
    d. SCHEDULE_MULT: the same keys multiplied, ``round(x * mult)``.

    Rounding is Python's round (half to even), as detectron2's auto-scaling; all those keys are ints after.
    The returned cfg is *resolved*: LR_SCALING.RULE "none", SCHEDULE_UNIT "iter", SCHEDULE_MULT 1.0 and
    REFERENCE_WORLD_SIZE = world_size (when it was not 0), so its dump reproduces the run as it is and calling
    prepare_solver on it again changes nothing.
    """
    validate(cfg)
    frozen = cfg.is_frozen()
    cfg = cfg.clone()
    cfg.defrost()
    s = cfg.SOLVER
    rule = s.LR_SCALING.RULE
    unit = s.SCHEDULE_UNIT
    if unit == "epoch" and not (num_train_images is not None and num_train_images > 0):
        raise ConfigError(
            f"SOLVER.SCHEDULE_UNIT = 'epoch' is not allowed with num_train_images = {num_train_images!r}: "
            "expected the training set size (> 0 images)"
        )

    # a. detectron2's auto-scaling; the LR is left to our rule when there is one
    auto_scale_workers(cfg, world_size, scale_lr=(rule == "none"))

    # b. LR scaling rule
    if rule != "none":
        scaled = scale_learning_rate(cfg)
        logger.info(scaled.message)
        s.BASE_LR, s.BASE_LR_END = scaled.base_lr, scaled.base_lr_end
        s.LR_SCALING.RULE = "none"

    # c. epochs -> iterations
    total = _total_batch(cfg)
    if unit == "epoch":
        per_epoch = num_train_images / total
        _rescale_counts(
            cfg,
            lambda x: int(round(x * per_epoch)),
            "epochs -> iterations",
            f" ({num_train_images} images / {_batch_text(cfg)} = {per_epoch:g} iterations per epoch)",
        )
        s.SCHEDULE_UNIT = "iter"
    else:
        _rescale_counts(cfg, lambda x: int(round(x)), "iterations as integers")

    # d. schedule multiplier
    mult = s.SCHEDULE_MULT
    if mult != 1:
        _rescale_counts(cfg, lambda x: int(round(x * mult)), "SCHEDULE_MULT", f" (x {mult:g})")
        s.SCHEDULE_MULT = 1.0

    if frozen:
        cfg.freeze()
    return cfg


def describe_batch(cfg, world_size: int) -> Tuple[str, Optional[str]]:
    """What the run's batch is on ``world_size`` workers, for the start-up log: (info line, warning or None).

    The info line states images per worker, the total batch and the BN size (images that share BN
    statistics). The warning is there when a worker gets more images than SOLVER.RECIPE_IMS_PER_WORKER (the
    recipe's memory use and BN size assume it), with the IMS_PER_BATCH / ACCUMULATE_STEPS that keep the
    recipe's total batch at the recipe's images per worker."""
    s = cfg.SOLVER
    per_worker = s.IMS_PER_BATCH // world_size
    if cfg.MODEL.SYNC_BN.ENABLED:
        group = cfg.MODEL.SYNC_BN.GROUP_SIZE
        bn = f"BN size {bn_size(group, world_size, per_worker)} (SyncBN over {group or 'all'} workers)"
    else:
        bn = f"BN size {per_worker} (no SyncBN: BatchNorm layers, if any, see one worker's images)"
    info = (f"Batch: {world_size} workers x {per_worker} images = {s.IMS_PER_BATCH} per micro-batch, "
            f"{_batch_text(cfg)} per optimizer step; {bn}")
    limit = s.RECIPE_IMS_PER_WORKER
    if not limit or per_worker <= limit:
        return info, None
    warning = (f"{per_worker} images per worker ({s.IMS_PER_BATCH} on {world_size} workers) is more than the "
               f"{limit} this recipe was written for (SOLVER.RECIPE_IMS_PER_WORKER): more memory, and another BN size")
    for k in range(2, per_worker + 1):
        ims, rest = divmod(s.IMS_PER_BATCH, k)
        if not rest and ims % world_size == 0 and ims // world_size <= limit:
            warning += (f". To keep the total batch of {_total_batch(cfg)} at {ims // world_size} images per worker: "
                        f"SOLVER.IMS_PER_BATCH {ims} SOLVER.ACCUMULATE_STEPS {s.ACCUMULATE_STEPS * k}")
            break
    return info, warning


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
