"""Solver preparation: the one place where the solver keys of a config are resolved for a run.

``prepare_solver(cfg, world_size, num_train_images)`` applies, in order and each change logged on the
"largebatch" logger: detectron2's REFERENCE_WORLD_SIZE auto-scaling, the LR scaling rule
(SOLVER.LR_SCALING: linear for MegDet, linear then square root for AGVM), epoch units and
SOLVER.SCHEDULE_MULT. ``describe_batch`` states what the batch is on the workers at hand (images per
worker, total batch, BN size). The values have been checked by ``largebatch.config.validate``.
"""
import logging
import math
from typing import NamedTuple, Optional, Tuple

from .config import ConfigError, validate
from .norm import bn_size

__all__ = ["LRScaling", "lr_scale_factor", "scale_learning_rate", "auto_scale_workers", "prepare_solver",
           "describe_batch"]

logger = logging.getLogger("largebatch")


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
    scale = world_size / old
    ims = int(round(s.IMS_PER_BATCH * scale))
    msg = (f"auto-scaling from REFERENCE_WORLD_SIZE {old} to {world_size} workers: "
           f"IMS_PER_BATCH {s.IMS_PER_BATCH} -> {ims}")
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


#: a layer-wise optimizer whose step moves every layer by more than this fraction of its weight norm is warned about:
#: the largest in the papers' recipes is LargeDet's PMD-LAMB at batch 1056 (0.02 x 1056 / 16 x alpha 0.012 = 1.6%)
LAYERWISE_STEP_WARNING = 0.02


def describe_step_size(cfg) -> Tuple[Optional[str], Optional[str]]:
    """For the layer-wise optimizers (LARS, LAMB, PMD-LAMB), what SOLVER.BASE_LR means, for the start-up log:
    (info line, warning or None); (None, None) for SGD / AdamW. Their step is a fraction of each layer's weight
    norm (the trust ratio: LAMB's update is BASE_LR x ||w|| along a unit direction, PMD-LAMB's BASE_LR x alpha x
    ||w||, LARS's about BASE_LR x TRUST_COEFFICIENT x ||w|| before momentum), so an LR written for SGD (a model-zoo
    YAML's 0.01 or 0.02) means something else here; the warning says when that fraction is past the papers'."""
    s = cfg.SOLVER
    name = s.OPTIMIZER.upper()
    factor = {"LAMB": 1.0, "PMDLAMB": s.PMDLAMB.SCALE, "LARS": s.LARS.TRUST_COEFFICIENT}.get(name)
    if factor is None:
        return None, None
    fraction = s.BASE_LR * factor
    how = {"LAMB": "BASE_LR", "PMDLAMB": "BASE_LR x SOLVER.PMDLAMB.SCALE",
           "LARS": "BASE_LR x SOLVER.LARS.TRUST_COEFFICIENT (before momentum)"}[name]
    info = (f"{name} at SOLVER.BASE_LR {s.BASE_LR:g}: each layer moves by about {fraction:.3g} of its weight norm per "
            f"step after warm-up ({how}, the trust ratio's scale; not for biases and norm layers, whose ratio is 1)")
    if fraction <= LAYERWISE_STEP_WARNING:
        return info, None
    return info, (f"{name} at SOLVER.BASE_LR {s.BASE_LR:g} moves every layer by {fraction:.1%} of its weight norm "
                  f"per step, more than the {LAYERWISE_STEP_WARNING:.0%} of the papers' largest recipes: an LR written "
                  "for SGD (a model-zoo YAML's) is too large here; see the README's optimizer table for each one's LR")
