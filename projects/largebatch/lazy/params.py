"""Param groups for a LazyConfig optimizer, by detector part: ``L(LAMB)(params=L(get_part_params)(...), lr=...)``."""
import inspect
from typing import Callable, Dict, List, Optional, Sequence

import torch
from detectron2.solver.build import get_default_optimizer_params

from ..optim.groups import ModulePartition, split_param_groups_by_part

__all__ = ["get_part_params"]


def get_part_params(
    model: torch.nn.Module,
    base_lr: Optional[float] = None,
    weight_decay: Optional[float] = None,
    weight_decay_norm: Optional[float] = None,
    bias_lr_factor: Optional[float] = 1.0,
    weight_decay_bias: Optional[float] = None,
    lr_factor_func: Optional[Callable] = None,
    overrides: Optional[Dict[str, Dict[str, float]]] = None,
    adapt_norm: bool = False,
    adapt_bias: bool = False,
    partition: Sequence[Sequence[str]] = (),
) -> List[Dict]:
    """detectron2's ``get_default_optimizer_params`` (the same arguments and meaning: weight decay of norm layers
    and biases, the bias LR factor, per-name overrides and, on detectron2 main, ViTDet's ``lr_factor_func``
    layer-wise LR decay), its groups split by detector part: each carries ``"module"`` (the part, for AGVM and the
    monitor), ``"adapt"`` (whether LARS / LAMB / PMD-LAMB apply their trust ratio: not for norm layers and biases
    unless ``adapt_norm`` / ``adapt_bias``) and ``"param_names"``. ``partition``: extra ``[part, regex]`` rules,
    as MODEL.MODULE_PARTITION.

    The trainer sets ``model`` before instantiating the optimizer, as detectron2's lazyconfig_train_net.py does for
    ``get_default_optimizer_params``; an optimizer config that names detectron2's function gets this one instead.
    """
    kwargs = dict(base_lr=base_lr, weight_decay=weight_decay, weight_decay_norm=weight_decay_norm,
                  bias_lr_factor=bias_lr_factor, weight_decay_bias=weight_decay_bias, overrides=overrides)
    if lr_factor_func is not None:
        if "lr_factor_func" not in inspect.signature(get_default_optimizer_params).parameters:
            raise ValueError("get_part_params(lr_factor_func=...): layer-wise LR decay needs detectron2 main; this "
                             "detectron2's get_default_optimizer_params (v0.6) has no lr_factor_func")
        kwargs["lr_factor_func"] = lr_factor_func
    groups = get_default_optimizer_params(model, **kwargs)
    return split_param_groups_by_part(model, groups, adapt_norm=adapt_norm, adapt_bias=adapt_bias,
                                      partition=ModulePartition(partition))
