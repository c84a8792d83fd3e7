"""``compile_step(optimizer)``: run an optimizer's update through ``torch.compile``, wrappers left eager.

``torch.compile`` fuses an optimizer's many small element-wise kernels into a few (PyTorch's own way to get a
fused optimizer). The update alone is compiled: what wraps it (detectron2's gradient clipping, AGVM's
per-module LR, GradScaler's unscale / skip) stays eager, so it behaves exactly as without compilation, and the
compiled graph sees only the optimizer's tensors.

How many graphs: LARS, LAMB and PMD-LAMB keep their step counter as a tensor and compute the bias corrections
and PMD's xi with tensor ops, and the LR enters as a tensor (see ``compile_step``), so neither a new step, a
PMD cycle wrap nor a new LR needs a new graph; loading a state dict gives new state tensors, hence one more
graph. torch.optim's SGD and AdamW compile the same way.

Plain PyTorch: no detectron2 import.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["compile_step", "is_compiled_step", "supports_tensor_lr"]


def compile_step(optimizer: torch.optim.Optimizer, tensor_lr: Optional[bool] = None, **compile_kwargs
                 ) -> torch.optim.Optimizer:
    """Make ``optimizer.step()`` run its class's step compiled (``compile_kwargs`` go to ``torch.compile``).

    The optimizer's class becomes a subclass of its own (as detectron2's gradient clipping does), so wrappers
    applied afterwards (clipping, AGVM) call the compiled step through ``super().step()`` or ``.step()``. A
    ``closure`` (which re-evaluates the model) runs the eager step: it cannot be part of the optimizer's graph.
    The compilation itself happens at the first step. Returns ``optimizer``.

    The LR reaches the graph as a tensor: inductor specializes on a Python float that a kernel takes as a scalar,
    so a scheduler (or AGVM) changing the float LR would compile a new graph every step. During the compiled
    call each group's float ``"lr"`` is copied into a persistent CPU tensor of that group (float32) and put in its
    place; afterwards the float is back. Schedulers, AGVM, hooks and checkpoints see the floats they always see,
    and a checkpoint is the same with or without compilation. A group whose ``"lr"`` is already a tensor keeps it.
    ``tensor_lr=None``: so for every optimizer that takes a tensor LR in its compiled step, i.e. all but torch's
    Adam / AdamW on the CPU (their multi-tensor step takes one only with ``capturable``, which dynamo turns on for
    GPU params alone): those keep the float, and each new LR value costs a new graph (``supports_tensor_lr``).
    """
    cls = type(optimizer)
    if is_compiled_step(optimizer):
        return optimizer
    if tensor_lr is None:
        tensor_lr = supports_tensor_lr(optimizer)
    eager_step = cls.step
    compiled = torch.compile(eager_step, **compile_kwargs)

    def step(self, closure=None):
        if closure is not None:
            return eager_step(self, closure)
        if not tensor_lr:
            return compiled(self)
        groups = self.param_groups
        tensors = self.__dict__.setdefault("_compiled_step_lrs", [])
        while len(tensors) < len(groups):  # groups added after compile_step get their own tensor too
            tensors.append(torch.zeros(()))  # the default dtype, as torch's own tensor LRs (a float64 LR trips dynamo)
        floats = [g["lr"] for g in groups]
        for g, lr, t in zip(groups, floats, tensors):
            if not isinstance(lr, torch.Tensor):
                t.fill_(lr)
                g["lr"] = t
        try:
            return compiled(self)
        finally:
            for g, lr in zip(groups, floats):
                g["lr"] = lr

    optimizer.__class__ = type(
        "Compiled" + cls.__name__, (cls,), {"step": step, "_largebatch_compiled_step": True, "__doc__": cls.__doc__}
    )
    return optimizer


def is_compiled_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``compile_step`` was applied to ``optimizer`` (or to the optimizer an AGVM wrapper holds)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return bool(getattr(type(inner), "_largebatch_compiled_step", False))


def supports_tensor_lr(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the compiled step of ``optimizer`` takes a tensor LR: torch's Adam / AdamW only with every param on
    a GPU (dynamo sets ``capturable`` there); every other optimizer (SGD, LARS, LAMB, PMD-LAMB) always."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return all(p.is_cuda for g in optimizer.param_groups for p in g["params"])
    return True
