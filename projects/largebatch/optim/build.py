"""``build_optimizer(cfg, model)``: SOLVER.OPTIMIZER -> an optimizer over part-aware param groups.

``cfg`` is read by attribute only (a detectron2 CfgNode in practice), so this file needs no detectron2.
"""
import logging

import torch

from .agvm import AGVM
from .compile import compile_step
from .groups import ModulePartition, build_param_groups
from .lamb import LAMB, PMDLAMB
from .lars import LARS

#: SOLVER.OPTIMIZER names and the classes they build
OPTIMIZER_CLASSES = {"SGD": torch.optim.SGD, "ADAMW": torch.optim.AdamW, "LARS": LARS, "LAMB": LAMB, "PMDLAMB": PMDLAMB}
OPTIMIZERS = tuple(OPTIMIZER_CLASSES)
logger = logging.getLogger("largebatch")


def optimizer_name(cfg) -> str:
    """SOLVER.OPTIMIZER in upper case; an unknown name is one ValueError line listing the valid ones."""
    name = str(cfg.SOLVER.OPTIMIZER).upper()
    if name not in OPTIMIZERS:
        raise ValueError(
            f"SOLVER.OPTIMIZER = {cfg.SOLVER.OPTIMIZER!r} is not allowed: expected one of {', '.join(OPTIMIZERS)}"
        )
    return name


def _trust_clip(value):
    return value if value > 0 else None  # 0 in the config means "no cap"


def build_base_optimizer(cfg, param_groups) -> torch.optim.Optimizer:
    """The optimizer SOLVER.OPTIMIZER names, with its hyper-parameters from the config."""
    s = cfg.SOLVER
    name = optimizer_name(cfg)
    foreach = bool(s.FOREACH)
    if name == "SGD":
        return torch.optim.SGD(
            param_groups, lr=s.BASE_LR, momentum=s.MOMENTUM, nesterov=s.NESTEROV,
            weight_decay=s.WEIGHT_DECAY, foreach=foreach,
        )
    if name == "ADAMW":
        return torch.optim.AdamW(
            param_groups, lr=s.BASE_LR, betas=tuple(s.ADAMW.BETAS), eps=s.ADAMW.EPS,
            weight_decay=s.WEIGHT_DECAY, foreach=foreach,
        )
    if name == "LARS":
        return LARS(
            param_groups, lr=s.BASE_LR, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY,
            trust_coefficient=s.LARS.TRUST_COEFFICIENT, eps=s.LARS.EPS,
            trust_clip=_trust_clip(s.LARS.TRUST_CLIP), foreach=foreach,
        )
    if name == "LAMB":
        return LAMB(
            param_groups, lr=s.BASE_LR, betas=tuple(s.LAMB.BETAS), eps=s.LAMB.EPS,
            weight_decay=s.WEIGHT_DECAY, bias_correction=s.LAMB.BIAS_CORRECTION,
            trust_clip=_trust_clip(s.LAMB.TRUST_CLIP), foreach=foreach,
        )
    return PMDLAMB(
        param_groups, lr=s.BASE_LR, betas=tuple(s.PMDLAMB.BETAS), eps=s.PMDLAMB.EPS,
        weight_decay=s.WEIGHT_DECAY, cycle=s.PMDLAMB.CYCLE, scale=s.PMDLAMB.SCALE, foreach=foreach,
    )


def build_param_groups_from_cfg(cfg, model):
    s = cfg.SOLVER
    return build_param_groups(
        model,
        base_lr=s.BASE_LR,
        weight_decay=s.WEIGHT_DECAY,
        weight_decay_norm=s.WEIGHT_DECAY_NORM,
        weight_decay_bias=s.WEIGHT_DECAY_BIAS,
        bias_lr_factor=s.BIAS_LR_FACTOR,
        adapt_norm=s.ADAPT_NORM,
        adapt_bias=s.ADAPT_BIAS,
        partition=ModulePartition(cfg.MODEL.MODULE_PARTITION),
    )


def describe_param_groups(optimizer) -> str:
    """One log line: the optimizer and its part-aware groups (part, LR, weight decay, trust-ratio adaptation, size)."""
    summary = ", ".join(
        f"{g['module']}(lr={g['lr']:g}, wd={g['weight_decay']:g}, adapt={g['adapt']}, n={len(g['params'])})"
        for g in optimizer.param_groups
    )
    return f"Optimizer {type(optimizer).__name__} with {len(optimizer.param_groups)} groups: {summary}"


def agvm_start_iter(cfg) -> int:
    """SOLVER.AGVM.START_ITER, where -1 means the end of the warm-up."""
    start = cfg.SOLVER.AGVM.START_ITER
    return cfg.SOLVER.WARMUP_ITERS if start < 0 else start


def build_optimizer(cfg, model, wrap=None) -> torch.optim.Optimizer:
    """Build SOLVER.OPTIMIZER over part-aware param groups, wrapped in AGVM when SOLVER.AGVM.ENABLED.

    ``wrap`` (optional) is applied to the base optimizer before the AGVM wrapper, e.g. detectron2's
    gradient clipping, so that it acts on the optimizer that really steps. With SOLVER.COMPILE_STEP the base
    optimizer's update is compiled (``compile_step``) and both wrappers stay eager around it.
    """
    groups = build_param_groups_from_cfg(cfg, model)
    optimizer = build_base_optimizer(cfg, groups)
    if cfg.SOLVER.COMPILE_STEP:
        optimizer = compile_step(optimizer)  # before the wrappers: they stay eager around the compiled update
    if wrap is not None:
        optimizer = wrap(optimizer)
    logger.info(describe_param_groups(optimizer))
    a = cfg.SOLVER.AGVM
    if a.ENABLED:
        optimizer = AGVM(
            optimizer, anchor=a.ANCHOR, momentum=a.MOMENTUM, interval=a.INTERVAL,
            start_iter=agvm_start_iter(cfg), clamp=tuple(a.CLAMP),
        )
    return optimizer
