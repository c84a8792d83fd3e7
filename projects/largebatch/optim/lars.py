"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017, "Scaling SGD batch size to 32k for
ImageNet training"), as CoolDet uses it for Mask R-CNN (CoolDet eq. 1-2).

Plain PyTorch: no detectron2 import.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .checks import check_lr, check_nonneg, check_positive, check_trust_clip
from .trust_ratio import (
    Scalar,
    TrustRatioOptimizer,
    axpy_,
    foreach_norms,
    group_by_device_and_dtype,
    norm_dtype,
    scaled_lists,
    sub_scaled_,
    tensor_norm,
)

__all__ = ["LARS", "LarsHyper", "lars", "lars_local_lr"]


class LarsHyper(NamedTuple):
    """The hyper-parameters of one param group, as :func:`lars` takes them (the LR is apart: it may be a tensor
    that a scheduler fills)."""

    momentum: float
    weight_decay: float  # beta of eq. 2, L2 inside the trust-ratio update
    trust_coefficient: float  # eta of eq. 2
    eps: float
    trust_clip: Optional[float]  # cap of the local LR, or None
    adapt: bool  # False: local LR 1.0 (biases and norm layers, usually)


def lars_local_lr(w_norm: Tensor, g_norm: Tensor, hyper: LarsHyper) -> Tensor:
    """The local LR of CoolDet eq. 2 / You et al. 2017 (with weight decay in the denominator, as in the LARS
    paper's Algorithm 1): ``eta * ||w|| / (||g|| + beta * ||w|| + eps)``, 1.0 where ``||w||`` or ``||g||``
    is 0 (a zero-initialised bias would otherwise never move; no NaN from 0/0), then capped at
    ``trust_clip``. Works elementwise on 0-dim or 1-D tensors of norms."""
    local = hyper.trust_coefficient * w_norm / (g_norm + hyper.weight_decay * w_norm + hyper.eps)
    local = torch.where((w_norm == 0) | (g_norm == 0), 1.0, local)
    if hyper.trust_clip is not None:
        local = local.clamp(max=hyper.trust_clip)
    return local


class LARS(TrustRatioOptimizer):
    r"""SGD with momentum and a layer-wise (per-tensor) local learning rate.

    For each parameter tensor ``w`` with gradient ``g`` (CoolDet eq. 1-2; You et al. 2017, Algorithm 1)::

        local_lr = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)   (eq. 2)
        buf      = momentum * buf + local_lr * (g + weight_decay * w)                   (eq. 1 + momentum)
        w       -= lr * buf

    ``local_lr`` is 1.0 where ``||w||`` or ``||g||`` is 0, and for a param group with ``"adapt": False``
    (biases and norm layers, usually). ``trust_clip=c`` caps ``local_lr`` at ``c`` in adapting groups
    (the zero-norm 1.0 included; an ``adapt=False`` group always uses exactly 1.0). On the first step ``buf`` is
    the update itself, as in ``torch.optim.SGD``. The global LR stays outside the momentum buffer (as in
    ``torch.optim.SGD``), so a scheduler's change of ``lr`` acts at once; weight decay sits inside the
    trust-ratio update.

    Args:
        params: iterable of parameters or of param-group dicts. Groups may carry any other keys
            (``"module"``, names, ...); they are kept untouched.
        lr: global learning rate ``gamma`` (read from ``group["lr"]`` at every step, so LR schedulers work).
        momentum: momentum factor (0 disables the buffer).
        weight_decay: L2 coefficient ``beta``.
        trust_coefficient: ``eta`` of eq. 2.
        eps: added to the denominator of eq. 2.
        trust_clip: upper bound of the local LR, or None.
        foreach: True: multi-tensor ``torch._foreach_*`` path; False: a per-tensor loop (for reading and for
            tests); None (default): multi-tensor when all tensors are on CPU or CUDA.

    The local LRs of the last step: :meth:`last_trust_ratios` (NaN for params without a gradient, which are
    skipped). Sparse gradients raise ``RuntimeError``.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
        trust_clip: Optional[float] = None,
        foreach: Optional[bool] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            trust_clip=trust_clip,
            adapt=True,
            foreach=foreach,
        )
        self._validate(defaults)
        super().__init__(params, defaults)

    def _validate(self, group: dict) -> None:
        check_lr(group["lr"])
        check_nonneg("momentum", group["momentum"])
        check_nonneg("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_positive("trust_coefficient", group["trust_coefficient"])
        check_trust_clip(group["trust_clip"])

    def _state_keys(self, group: dict):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _init_state(self, p: Tensor, state: dict, group: dict) -> None:
        if group["momentum"] != 0:
            # zeros: momentum * 0 + update == the update, i.e. torch SGD's "first step: buf = update"
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update(self, group, params, grads, states):
        hyper = LarsHyper(
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            trust_coefficient=group["trust_coefficient"],
            eps=group["eps"],
            trust_clip=group["trust_clip"],
            adapt=group["adapt"],
        )
        momentum_buffers = states[0] if states else None
        return lars(
            params, grads, momentum_buffers, lr=group["lr"], hyper=hyper, foreach=self._use_foreach(group, params),
            reuse_buffers=self._use_work_buffers(params[0].device),
        )


def lars(
    params: List[Tensor],
    grads: List[Tensor],
    momentum_buffers: Optional[List[Tensor]],
    *,
    lr: Scalar,
    hyper: LarsHyper,
    foreach: bool,
    reuse_buffers: bool = False,
) -> List[Tuple[Sequence[int], Tensor]]:
    """One LARS step of ``params`` (all with a gradient) in place; ``momentum_buffers`` (None when momentum is 0)
    are updated too. Returns the local LRs used, as ``(positions, local_lrs)`` per device/dtype bucket.
    ``reuse_buffers``: the multi-tensor path avoids a param-sized temporary (CPU)."""
    if foreach:
        return _multi_tensor_lars(params, grads, momentum_buffers, lr, hyper, reuse_buffers)
    return _single_tensor_lars(params, grads, momentum_buffers, lr, hyper)


def _single_tensor_lars(params, grads, momentum_buffers, lr, hyper: LarsHyper):
    """The per-tensor loop: the equations as written."""
    ratios = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if hyper.adapt:
            local = lars_local_lr(tensor_norm(p), tensor_norm(g), hyper)
        else:
            local = torch.ones((), dtype=norm_dtype(p.dtype), device=p.device)
        wd = hyper.weight_decay
        d = g.add(p, alpha=wd) if wd != 0 else g  # a new tensor: p.grad is never modified
        if momentum_buffers is not None:
            buf = momentum_buffers[i]
            buf.mul_(hyper.momentum).add_(d * local)
            sub_scaled_(p, buf, lr)
        else:
            sub_scaled_(p, d * local, lr)
        ratios.append(local)
    return [(range(len(params)), torch.stack(ratios))]


def _multi_tensor_lars(params, grads, momentum_buffers, lr, hyper: LarsHyper, reuse_buffers: bool):
    """Multi-tensor path: per device/dtype bucket, two fused norm reductions, the local LRs as one
    vector, and the momentum update as fused multiply-adds whose per-tensor factor is a 0-dim tensor."""
    momentum, wd, adapt = hyper.momentum, hyper.weight_decay, hyper.adapt
    bufs = momentum_buffers if momentum_buffers is not None else [None] * len(params)
    pieces = []
    for (b_params, b_grads, b_bufs), pos in group_by_device_and_dtype([params, grads, bufs]):
        dtype = b_params[0].dtype
        if adapt:
            local = lars_local_lr(foreach_norms(b_params), foreach_norms(b_grads), hyper)
            coef = scaled_lists(local, dtype)
        else:
            local = torch.ones(len(b_params), dtype=norm_dtype(dtype), device=b_params[0].device)
            coef = 1.0  # plain scalars: the fast fused kernels
        if momentum_buffers is not None:
            torch._foreach_mul_(b_bufs, momentum)
            if wd != 0 and adapt and not reuse_buffers:
                # buf += local * (g + wd * w): one temporary, and a single op with per-tensor factors
                # (such ops take torch's per-tensor fallback on CUDA, the scalar ones are fused)
                axpy_(b_bufs, torch._foreach_add(b_grads, b_params, alpha=wd), coef)
            else:
                # buf += local * g + (local * wd) * w: no temporary
                axpy_(b_bufs, b_grads, coef)
                if wd != 0:
                    axpy_(b_bufs, b_params, scaled_lists(local * wd, dtype) if adapt else wd)
            axpy_(b_params, b_bufs, -lr)
        else:
            # w = w * (1 - lr * local * wd) - (lr * local) * g
            if adapt:
                if wd != 0:
                    torch._foreach_mul_(b_params, scaled_lists(1 - lr * wd * local, dtype))
                axpy_(b_params, b_grads, scaled_lists(-lr * local, dtype))
            else:
                if wd != 0:
                    torch._foreach_mul_(b_params, 1 - lr * wd)
                axpy_(b_params, b_grads, -lr)
        pieces.append((pos, local))
    return pieces
