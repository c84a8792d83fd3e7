"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
Algorithm 2) and PMD-LAMB, LAMB with periodical moments decay (Wang et al. 2020, "Large Batch Optimization
for Object Detection: Training COCO in 12 Minutes" = LargeDet, Algorithm 1, eq. 3-5).

Plain PyTorch: no detectron2 import.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional

import torch
from torch import Tensor

from .checks import check, check_betas, check_lr, check_nonneg, check_positive, check_trust_clip
from .trust_ratio import (
    TrustRatioOptimizer,
    axpy_,
    foreach_norms,
    group_by_device_and_dtype,
    norm_dtype,
    safe_ratio,
    scaled_lists,
    sub_scaled_,
    tensor_norm,
)

__all__ = ["LAMB", "PMDLAMB", "lamb_trust_ratio", "pmd_xi"]


def lamb_trust_ratio(w_norm: Tensor, u_norm: Tensor, trust_clip: Optional[float] = None) -> Tensor:
    """``||w|| / ||u||`` (LAMB Algorithm 2 with phi = identity; LargeDet Algorithm 1 line 9), 1.0 where
    either norm is 0 (no NaN from 0/0), then capped at ``trust_clip``. Elementwise on 0-dim or 1-D tensors
    of norms."""
    ratio = safe_ratio(w_norm, u_norm)
    if trust_clip is not None:
        ratio = ratio.clamp(max=trust_clip)
    return ratio


def pmd_xi(t: int, cycle: int) -> float:
    """The moments-decay coefficient of LargeDet eq. 3: ``xi = cos(pi/2 * (t % T) / T)``. A Python float
    computed from the Python step counter: nothing is read back from the device."""
    return math.cos(math.pi / 2 * (t % cycle) / cycle)


class _LambBase(TrustRatioOptimizer):
    """Adam moments + a per-tensor trust ratio. Keeps a per-group step counter ``group["step"]`` (a Python
    int, so it is in ``state_dict()["param_groups"]`` and a resumed run continues exactly); it counts the
    steps in which the group had at least one gradient."""

    #: where Adam's second moment v lives (``state[p][...]``), declared for the gradient probe, which measures
    #: AGVM's Phi on Adam-normalised gradients for Adam-family optimizers
    second_moment_state = "exp_avg_sq"

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        complex_ = [tuple(p.shape) for p in params if torch.is_complex(p)]
        if complex_:
            raise ValueError(
                f"{type(self).__name__} does not support complex parameters (shapes {complex_}): its second moment and "
                "trust ratio are defined for real tensors; pass torch.view_as_real(p) views or real parameters"
            )
        param_group["params"] = params
        param_group.setdefault("step", 0)
        super().add_param_group(param_group)

    def _moments(self, params: List[Tensor]):
        exp_avgs, exp_avg_sqs = [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
        return exp_avgs, exp_avg_sqs

    def _update(self, group, params, grads, foreach):
        group["step"] += 1
        m, v = self._moments(params)
        if foreach:
            return self._update_foreach(group, params, grads, m, v)
        return self._update_single(group, params, grads, m, v)

    # For the multi-tensor path both subclasses describe one step through these few Python floats:
    #   m = m_decay * m + (1 - beta1) * g;  v = v_decay * v + (1 - beta2) * g^2
    #   u = k * m / (sqrt(v + eps_in) + eps_out) + weight_decay * w;  w -= lr_scale * lr * ratio * u
    def _coefficients(self, group: dict) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def _direction(self, group: dict, m: Tensor, v: Tensor) -> Tensor:  # pragma: no cover - overridden
        """``r`` of one tensor from its updated moments, written as in the paper (per-tensor path)."""
        raise NotImplementedError

    def _ratio(self, group: dict, w_norm: Tensor, u_norm: Tensor) -> Tensor:
        return lamb_trust_ratio(w_norm, u_norm, group.get("trust_clip"))

    def _update_single(self, group, params, grads, exp_avgs, exp_avg_sqs):
        """The per-tensor loop: the equations as written."""
        c = self._coefficients(group)
        beta1, beta2 = group["betas"]
        wd, lr = group["weight_decay"], group["lr"]
        ratios = []
        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
            m.mul_(c["m_decay"]).add_(g, alpha=1 - beta1)
            v.mul_(c["v_decay"]).addcmul_(g, g, value=1 - beta2)
            r = self._direction(group, m, v)
            u = r.add(p, alpha=wd) if wd != 0 else r
            if group["adapt"]:
                ratio = self._ratio(group, tensor_norm(p), tensor_norm(u))
            else:
                ratio = torch.ones((), dtype=norm_dtype(p.dtype), device=p.device)
            sub_scaled_(p, u * (c["lr_scale"] * ratio), lr)
            ratios.append(ratio)
        return [(range(len(params)), torch.stack(ratios))]

    def _update_foreach(self, group, params, grads, exp_avgs, exp_avg_sqs):
        """Multi-tensor path, per device/dtype bucket, with few passes over memory: the moments in place
        (``lerp_`` when the decay is the plain beta1); ``u`` up to a scalar factor, either in one persistent
        work buffer (CPU) or from two temporaries (one ``addcdiv`` builds ``u / wd``); two fused norm
        reductions; the parameter update as one fused multiply-add whose per-tensor factor (ratio, LR and
        the scalar factor of ``u``) is a 0-dim tensor. Bias corrections are folded into Python scalars:
        ``m_hat / (sqrt(v_hat) + eps) = k * m / (sqrt(v) + eps * sqrt(bc2))`` with ``k = sqrt(bc2) / bc1``."""
        c = self._coefficients(group)
        beta1, beta2 = group["betas"]
        wd, lr = group["weight_decay"], group["lr"]
        pieces = []
        grouped = group_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs])
        for (b_params, b_grads, b_m, b_v), pos in grouped:
            dtype = b_params[0].dtype
            if c["m_decay"] == beta1:
                torch._foreach_lerp_(b_m, b_grads, 1 - beta1)  # b1*m + (1-b1)*g in one pass
            else:
                torch._foreach_mul_(b_m, c["m_decay"])
                torch._foreach_add_(b_m, b_grads, alpha=1 - beta1)
            torch._foreach_mul_(b_v, c["v_decay"])
            torch._foreach_addcmul_(b_v, b_grads, b_grads, value=1 - beta2)

            k, eps_out, unfold = c["k"], c["eps_out"], None
            if eps_out != 0 and float(torch.tensor(eps_out, dtype=dtype)) == 0.0:
                # the folded eps * sqrt(bc2) underflows in this dtype (float16, a small eps, early steps): a zero
                # v would give 0 / 0. Unfold it: k m / (sqrt(v) + eps') = (k / f) m / (sqrt(v) / f + eps' / f)
                unfold = 1.0 / c["fold"]
                k, eps_out = k * unfold, eps_out * unfold
            if self._use_work_buffers(b_params[0].device):
                # reuse one persistent buffer (why: TrustRatioOptimizer._reuse_buffers)
                u = self._scratch(b_params)
                torch._foreach_copy_(u, b_v)
                if c["eps_in"] != 0:
                    torch._foreach_add_(u, c["eps_in"])
                torch._foreach_sqrt_(u)
                if unfold is not None:
                    torch._foreach_mul_(u, unfold)
                if eps_out != 0:
                    torch._foreach_add_(u, eps_out)
                # m / denom in place, as 1 / (denom / m): overflows only where m / denom itself does
                torch._foreach_div_(u, b_m)
                torch._foreach_reciprocal_(u)
                if wd != 0:
                    torch._foreach_add_(u, b_params, alpha=wd / k)
                u_scale = k  # u_true = k * u
            else:
                # CUDA & co: temporaries come from the caching allocator; fewest passes
                if c["eps_in"] != 0:
                    denom = torch._foreach_add(b_v, c["eps_in"])
                    torch._foreach_sqrt_(denom)
                else:
                    denom = torch._foreach_sqrt(b_v)
                if unfold is not None:
                    torch._foreach_mul_(denom, unfold)
                if eps_out != 0:
                    torch._foreach_add_(denom, eps_out)
                if wd != 0 and dtype != torch.float16:
                    # u / wd = w + (k / wd) * m / denom in one pass (float16 could overflow here)
                    u = torch._foreach_addcdiv(b_params, b_m, denom, value=k / wd)
                    u_scale = wd
                else:
                    # u / k = m / denom + (wd / k) * w
                    u = torch._foreach_div(b_m, denom)
                    if wd != 0:
                        torch._foreach_add_(u, b_params, alpha=wd / k)
                    u_scale = k
                del denom
            # the true u is u_scale * u: its norm and the step size carry the factor instead of a pass
            if group["adapt"]:
                ratio = self._ratio(group, foreach_norms(b_params), u_scale * foreach_norms(u))
                axpy_(b_params, u, scaled_lists(ratio * (-lr * c["lr_scale"] * u_scale), dtype))
            else:
                ratio = torch.ones(len(b_params), dtype=norm_dtype(dtype), device=b_params[0].device)
                axpy_(b_params, u, -lr * (c["lr_scale"] * u_scale))
            pieces.append((pos, ratio))
        return pieces


class LAMB(_LambBase):
    r"""LAMB, You et al. 2020, Algorithm 2 (phi = identity), with Adam's bias correction optional.

    For each parameter tensor ``w`` with gradient ``g``, at step ``t`` (counted per param group from 1)::

        m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g^2
        m_hat = m / (1 - beta1^t);  v_hat = v / (1 - beta2^t)      (raw m, v when bias_correction=False)
        r = m_hat / (sqrt(v_hat) + eps);   u = r + weight_decay * w
        trust = ||w|| / ||u||;   w -= lr * trust * u

    ``trust`` is 1.0 where ``||w||`` or ``||u||`` is 0 and for a param group with ``"adapt": False``;
    ``trust_clip=c`` caps the trust at ``c`` in adapting groups (the zero-norm 1.0 included; an
    ``adapt=False`` group always uses exactly 1.0). Weight decay is inside the trust-ratio update. No global
    gradient clipping.

    Args:
        params: iterable of parameters or of param-group dicts (other group keys are kept untouched).
        lr: learning rate (read from ``group["lr"]`` at every step).
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: added to ``sqrt(v_hat)``.
        weight_decay: ``lambda`` of ``u = r + lambda * w`` (inside the trust-ratio update, not L2 in g).
        bias_correction: Adam's bias correction of the moments.
        trust_clip: upper bound of the trust ratio, or None.
        foreach: True: multi-tensor path; False: per-tensor loop; None: multi-tensor on CPU/CUDA.

    State: ``state[p]["exp_avg"]``, ``state[p]["exp_avg_sq"]``, and the step counter ``group["step"]``.
    The ratios of the last step: :meth:`last_trust_ratios` (NaN for params without a gradient, skipped).
    """

    def __init__(
        self,
        params,
        lr: float,
        betas=(0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        trust_clip: Optional[float] = None,
        foreach: Optional[bool] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            trust_clip=trust_clip,
            adapt=True,
            foreach=foreach,
        )
        self._validate(defaults)
        super().__init__(params, defaults)

    def _validate(self, group: dict) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonneg("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_trust_clip(group["trust_clip"])

    def _direction(self, group: dict, m: Tensor, v: Tensor) -> Tensor:
        if group["bias_correction"]:
            beta1, beta2 = group["betas"]
            t = group["step"]
            m, v = m / (1 - beta1**t), v / (1 - beta2**t)
        return m / (v.sqrt() + group["eps"])

    def _coefficients(self, group: dict) -> dict:
        beta1, beta2 = group["betas"]
        t = group["step"]
        if group["bias_correction"]:
            bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        else:
            bc1 = bc2 = 1.0
        # m_hat / (sqrt(v_hat) + eps) = (sqrt(bc2) / bc1) * m / (sqrt(v) + eps * sqrt(bc2))
        return dict(
            m_decay=beta1,
            v_decay=beta2,
            k=math.sqrt(bc2) / bc1,
            eps_in=0.0,
            eps_out=group["eps"] * math.sqrt(bc2),
            fold=math.sqrt(bc2),  # the factor folded into eps_out and k
            lr_scale=1.0,
        )


class PMDLAMB(_LambBase):
    r"""PMD-LAMB: LAMB with periodical moments decay, LargeDet Algorithm 1 (eq. 3-5).

    At step ``t`` (counted per param group from 1, the iteration of Algorithm 1) and for each tensor ``w``::

        xi = cos(pi/2 * (t % T) / T)                                   (eq. 3, T = cycle)
        m  = xi * beta1 * m + (1 - beta1) * g                          (eq. 4)
        v  = xi * beta2 * v + (1 - beta2) * g^2                        (eq. 5)
        r  = m / sqrt(v + eps)                                         (line 8, no bias correction)
        u  = r + weight_decay * w
        w -= lr * scale * ratio * u,   ratio = ||w|| / ||u||            (line 9, scale = alpha)

    ``ratio`` is 1.0 where either norm is 0 and for a param group with ``"adapt": False`` (``scale`` still
    applies). Defaults are the paper's: alpha=0.012, T=200, wd=5e-4, beta1=0.9, beta2=0.999. The cycle
    position lives in ``group["step"]`` and so in ``state_dict()``.
    :meth:`last_trust_ratios` returns ``ratio`` (without ``scale``; NaN for params without a gradient).
    """

    def __init__(
        self,
        params,
        lr: float,
        betas=(0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 5e-4,
        cycle: int = 200,
        scale: float = 0.012,
        foreach: Optional[bool] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            cycle=cycle,
            scale=scale,
            adapt=True,
            foreach=foreach,
        )
        self._validate(defaults)
        super().__init__(params, defaults)

    def _validate(self, group: dict) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonneg("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        cycle = group["cycle"]
        is_int = isinstance(cycle, numbers.Integral) and not isinstance(cycle, bool)
        check("cycle", is_int and cycle >= 1, cycle, "an int >= 1")
        check_positive("scale", group["scale"])

    def _direction(self, group: dict, m: Tensor, v: Tensor) -> Tensor:
        return m / (v + group["eps"]).sqrt()

    def _coefficients(self, group: dict) -> dict:
        beta1, beta2 = group["betas"]
        xi = pmd_xi(group["step"], group["cycle"])
        return dict(
            m_decay=xi * beta1,
            v_decay=xi * beta2,
            k=1.0,
            eps_in=group["eps"],
            eps_out=0.0,
            fold=1.0,
            lr_scale=group["scale"],
        )
