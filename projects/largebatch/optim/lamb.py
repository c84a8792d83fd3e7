"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
Algorithm 2) and PMD-LAMB, LAMB with periodical moments decay (Wang et al. 2020, "Large Batch Optimization
for Object Detection: Training COCO in 12 Minutes" = LargeDet, Algorithm 1, eq. 3-5).

As in torch.optim: the classes keep the param groups and the state (``exp_avg``, ``exp_avg_sq`` per param, a
step counter per group), the math is :func:`lamb`, which takes tensor lists and a :class:`LambHyper`. The step
counter is a CPU tensor so that ``torch.compile(opt.step)`` builds one graph for a whole run: the bias
corrections and PMD's xi are tensor ops on it there (eagerly, Python floats read from it, as torch's Adam).

Plain PyTorch: no detectron2 import.
"""
from __future__ import annotations

import math
import numbers
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .checks import check, check_betas, check_lr, check_nonneg, check_positive, check_trust_clip
from .trust_ratio import (
    _LOW_PRECISION,
    Scalar,
    TrustRatioOptimizer,
    axpy_,
    foreach_norms,
    group_by_device_and_dtype,
    norm_dtype,
    safe_ratio,
    scalar_arg,
    scaled_lists,
    step_dtype,
    sub_scaled_,
    tensor_norm,
)

__all__ = ["LAMB", "PMDLAMB", "LambHyper", "LambCoefficients", "lamb", "lamb_coefficients", "lamb_trust_ratio",
           "pmd_xi"]


def lamb_trust_ratio(w_norm: Tensor, u_norm: Tensor, trust_clip: Optional[float] = None) -> Tensor:
    """``||w|| / ||u||`` (LAMB Algorithm 2 with phi = identity; LargeDet Algorithm 1 line 9), 1.0 where
    either norm is 0 (no NaN from 0/0), then capped at ``trust_clip``. Elementwise on 0-dim or 1-D tensors
    of norms."""
    ratio = safe_ratio(w_norm, u_norm)
    if trust_clip is not None:
        ratio = ratio.clamp(max=trust_clip)
    return ratio


def pmd_xi(t: Scalar, cycle: int) -> Scalar:
    """The moments-decay coefficient of LargeDet eq. 3: ``xi = cos(pi/2 * (t % T) / T)``, for a step count
    ``t`` that is a number (a float back) or a tensor (tensor ops, a tensor back: what a compiled step traces)."""
    phase = math.pi / 2 * (t % cycle) / cycle
    return torch.cos(phase) if isinstance(phase, Tensor) else math.cos(phase)


class LambHyper(NamedTuple):
    """The hyper-parameters of one param group, as :func:`lamb` takes them (the LR is apart: it may be a tensor
    that a scheduler fills). LAMB: ``cycle=0, scale=1, eps_inside_sqrt=False``; PMD-LAMB: ``cycle=T,
    scale=alpha, bias_correction=False, eps_inside_sqrt=True``."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float  # lambda of u = r + lambda * w (inside the trust-ratio update)
    bias_correction: bool  # Adam's m / (1 - beta1^t), v / (1 - beta2^t)
    eps_inside_sqrt: bool  # PMD-LAMB line 8: m / sqrt(v + eps); LAMB: m_hat / (sqrt(v_hat) + eps)
    cycle: int  # T of the periodic moments decay (LargeDet eq. 3-5); 0: none (LAMB)
    scale: float  # alpha of LargeDet line 9; 1.0 for LAMB
    trust_clip: Optional[float]  # cap of the trust ratio, or None
    adapt: bool  # False: ratio 1.0 (biases and norm layers, usually)


class LambCoefficients(NamedTuple):
    """One step of LAMB / PMD-LAMB at step count ``t``, as numbers (or per-tensor 1-D tensors)::

        m <- m_decay * m + (1 - beta1) * g;   v <- v_decay * v + (1 - beta2) * g^2
        r  = m_scale * m / (v_scale * sqrt(v + eps_in) + eps_out)
    """

    m_decay: Scalar  # beta1; xi * beta1 for PMD-LAMB (eq. 4)
    v_decay: Scalar  # beta2; xi * beta2 for PMD-LAMB (eq. 5)
    m_scale: Scalar  # 1 / (1 - beta1^t) with bias correction, else 1
    v_scale: Scalar  # 1 / sqrt(1 - beta2^t) with bias correction, else 1
    eps_in: float
    eps_out: float


def lamb_coefficients(t: Scalar, hyper: LambHyper) -> LambCoefficients:
    """The coefficients of step ``t`` (counted from 1): LAMB Algorithm 2 lines 6-8 / LargeDet eq. 3-5 and line 8.
    ``t`` a number gives numbers; ``t`` a tensor gives tensors of its shape (tensor ops only)."""
    b1, b2 = hyper.beta1, hyper.beta2
    m_decay, v_decay = b1, b2
    if hyper.cycle:
        xi = pmd_xi(t, hyper.cycle)
        m_decay, v_decay = xi * b1, xi * b2
    m_scale = v_scale = 1.0
    if hyper.bias_correction:
        m_scale = 1 / (1 - b1**t)
        v_scale = (1 - b2**t) ** -0.5
    if hyper.eps_inside_sqrt:
        return LambCoefficients(m_decay, v_decay, m_scale, v_scale, eps_in=hyper.eps, eps_out=0.0)
    return LambCoefficients(m_decay, v_decay, m_scale, v_scale, eps_in=0.0, eps_out=hyper.eps)


def _coefficients_op(step: Tensor, beta1: float, beta2: float, bias_correction: bool, cycle: int) -> Tensor:
    """``m_decay, v_decay, m_scale, v_scale`` of :func:`lamb_coefficients` at ``step`` as one float64 tensor."""
    hyper = LambHyper(beta1, beta2, 0.0, 0.0, bias_correction, False, cycle, 1.0, None, True)
    c = lamb_coefficients(step.to(torch.float64), hyper)
    return torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in c[:4]])


# Under torch.compile the coefficients come from this op, which inductor cannot see into: it runs once per step
# and its four numbers are loaded by the kernels. Written as plain tensor ops in the graph, inductor fuses them
# into every element-wise kernel and recomputes beta^t (a float64 pow) or PMD's cos at every vector of every
# tensor: measured, that made the compiled LAMB step 4.5x slower than without bias correction.
if hasattr(torch.library, "custom_op"):  # torch >= 2.4
    _coefficients_op = torch.library.custom_op("largebatch::lamb_coefficients", mutates_args=())(_coefficients_op)

    @_coefficients_op.register_fake
    def _(step, beta1, beta2, bias_correction, cycle):
        return step.new_empty((4,), dtype=torch.float64)


def _traced_coefficients(step: Tensor, hyper: LambHyper) -> LambCoefficients:
    m_decay, v_decay, m_scale, v_scale = _coefficients_op(
        step, hyper.beta1, hyper.beta2, hyper.bias_correction, hyper.cycle
    ).unbind(0)
    eps_in, eps_out = (hyper.eps, 0.0) if hyper.eps_inside_sqrt else (0.0, hyper.eps)
    return LambCoefficients(m_decay, v_decay, m_scale, v_scale, eps_in, eps_out)


def lamb(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    step: Tensor,
    *,
    lr: Scalar,
    hyper: LambHyper,
    foreach: bool,
    work_buffers: Optional[List[Tensor]] = None,
) -> List[Tuple[Sequence[int], Tensor]]:
    """One LAMB / PMD-LAMB step of ``params`` (all with a gradient) in place; the moments and the step counter
    ``step`` (a 0-dim tensor: the steps taken, the ``t`` of the equations after this call) are updated too.
    Returns the trust ratios used, as ``(positions, ratios)`` per device/dtype bucket.
    ``work_buffers`` (param-shaped, optional): the multi-tensor path builds ``u`` in them instead of in
    temporaries."""
    step.add_(1)
    if torch.compiler.is_compiling():
        # tensors, so that a new step count needs no new graph
        c = _traced_coefficients(step, hyper)
        if params[0].device != step.device:  # GPU params: the scalars go with them
            c = LambCoefficients(*(x.to(params[0].device) if isinstance(x, Tensor) else x for x in c))
    else:  # Python floats read from the CPU counter (no device sync): the scalar kernels
        c = lamb_coefficients(step.item(), hyper)
    if foreach:
        return _multi_tensor_lamb(params, grads, exp_avgs, exp_avg_sqs, c, lr, hyper, work_buffers)
    return _single_tensor_lamb(params, grads, exp_avgs, exp_avg_sqs, c, lr, hyper)


def _single_tensor_lamb(params, grads, exp_avgs, exp_avg_sqs, c: LambCoefficients, lr, hyper: LambHyper):
    """The per-tensor loop: the equations as written."""
    wd = hyper.weight_decay
    ratios = []
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        m.mul_(c.m_decay).add_(g, alpha=1 - hyper.beta1)
        v.mul_(c.v_decay).addcmul_(g, g, value=1 - hyper.beta2)
        r = (m * c.m_scale) / ((v + c.eps_in).sqrt() * c.v_scale + c.eps_out)
        u = r.add(p, alpha=wd) if wd != 0 else r
        if hyper.adapt:
            ratio = lamb_trust_ratio(tensor_norm(p), tensor_norm(u), hyper.trust_clip)
        else:
            ratio = torch.ones((), dtype=norm_dtype(p.dtype), device=p.device)
        sub_scaled_(p, u * (hyper.scale * ratio), lr)
        ratios.append(ratio)
    return [(range(len(params)), torch.stack(ratios))]


def _multi_tensor_lamb(params, grads, exp_avgs, exp_avg_sqs, c: LambCoefficients, lr, hyper: LambHyper,
                       work_buffers):
    """Multi-tensor path, per device/dtype bucket, with few passes over memory: the moments in place
    (``lerp_`` when the decay is the plain beta1); ``u`` up to a scalar factor, either in the work buffers (CPU)
    or from two temporaries (one ``addcdiv`` builds ``u / wd``); two fused norm reductions; the parameter update
    as one fused multiply-add whose per-tensor factor (ratio, LR and the scalar factor of ``u``) is a 0-dim
    tensor. In float32 / float64 the bias correction of v is folded into the scalars:
    ``m_scale * m / (v_scale * sqrt(v) + eps) = (m_scale / v_scale) * m / (sqrt(v) + eps / v_scale)``; in
    float16 / bfloat16 not (``eps / v_scale`` could underflow to 0, and a zero v would give 0 / 0)."""
    beta1, beta2, wd = hyper.beta1, hyper.beta2, hyper.weight_decay
    buffers = work_buffers if work_buffers is not None else [None] * len(params)
    pieces = []
    grouped = group_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, buffers])
    for (b_params, b_grads, b_m, b_v, b_buffers), pos in grouped:
        dtype, device = b_params[0].dtype, b_params[0].device
        if isinstance(c.m_decay, Tensor):  # compiling: the scalars in the bucket's dtype (a float64 scalar tensor
            # in a float32 foreach op is read back to the host: a graph break)
            c = LambCoefficients(*(x.to(dtype) if isinstance(x, Tensor) else x for x in c))
        if not isinstance(c.m_decay, Tensor) and c.m_decay == beta1:
            torch._foreach_lerp_(b_m, b_grads, 1 - beta1)  # b1*m + (1-b1)*g in one pass
        else:
            torch._foreach_mul_(b_m, scalar_arg(c.m_decay, len(b_m)))
            torch._foreach_add_(b_m, b_grads, alpha=1 - beta1)
        torch._foreach_mul_(b_v, scalar_arg(c.v_decay, len(b_v)))
        torch._foreach_addcmul_(b_v, b_grads, b_grads, value=1 - beta2)

        # r = k * m / denom, denom = sqrt(v + eps_in) * denom_scale + eps_out
        if dtype in _LOW_PRECISION:
            k, denom_scale, eps_out = c.m_scale, c.v_scale, c.eps_out
        else:
            k, denom_scale, eps_out = c.m_scale / c.v_scale, 1.0, c.eps_out / c.v_scale
        if b_buffers[0] is not None:
            # build u / k in the persistent buffers (why: TrustRatioOptimizer._reuse_buffers)
            u = _denominator(b_v, c.eps_in, denom_scale, eps_out, out=b_buffers)
            # m / denom in place, as 1 / (denom / m): overflows only where m / denom itself does
            torch._foreach_div_(u, b_m)
            torch._foreach_reciprocal_(u)
            if wd != 0:
                axpy_(u, b_params, wd / k)
            u_scale = k  # u_true = k * u
        else:
            # CUDA & co: temporaries come from the caching allocator; fewest passes
            denom = _denominator(b_v, c.eps_in, denom_scale, eps_out)
            if wd != 0 and dtype != torch.float16 and not isinstance(k, Tensor):
                # u / wd = w + (k / wd) * m / denom in one pass (float16 could overflow here)
                u = torch._foreach_addcdiv(b_params, b_m, denom, value=k / wd)
                u_scale = wd
            else:
                # u / k = m / denom + (wd / k) * w
                u = torch._foreach_div(b_m, denom)
                if wd != 0:
                    axpy_(u, b_params, wd / k)
                u_scale = k
            del denom
        # the true u is u_scale * u: its norm and the step size carry the factor instead of a pass
        if hyper.adapt:
            ratio = lamb_trust_ratio(foreach_norms(b_params), u_scale * foreach_norms(u), hyper.trust_clip)
            if torch.compiler.is_compiling():
                # Compiled: u feeds only its norm, so inductor fuses it into the moments' pass without writing it
                # out, and the update recomputes r from the new moments (w <- (1 - s wd) w - s r, s = lr scale
                # ratio) in a second pass: 10 tensor passes in all, LAMB's floor. Updating with u, inductor wrote u
                # to a fresh buffer and read it twice more (measured 65 -> 40 ms on 4 x 4M floats, 1 thread).
                del u
                step_size = ratio * (-lr * hyper.scale)
                torch._foreach_mul_(b_params, scaled_lists(1 + step_size * wd, dtype))
                inv_denom = _denominator(b_v, c.eps_in, c.v_scale, c.eps_out)
                torch._foreach_reciprocal_(inv_denom)
                torch._foreach_mul_(inv_denom, scaled_lists(step_size * c.m_scale, dtype))
                torch._foreach_addcmul_(b_params, b_m, inv_denom)
            else:
                axpy_(b_params, u, scaled_lists(ratio * (-lr * hyper.scale * u_scale), dtype))
        else:
            ratio = torch.ones(len(b_params), dtype=norm_dtype(dtype), device=device)
            axpy_(b_params, u, -lr * (hyper.scale * u_scale))
        pieces.append((pos, ratio))
    return pieces


def _denominator(v: List[Tensor], eps_in: float, scale: Scalar, eps_out: Scalar,
                 out: Optional[List[Tensor]] = None) -> List[Tensor]:
    """``sqrt(v + eps_in) * scale + eps_out`` per tensor, written into ``out`` (work buffers) or new tensors."""
    if out is not None:
        torch._foreach_copy_(out, v)
        if eps_in != 0:
            torch._foreach_add_(out, eps_in)
        torch._foreach_sqrt_(out)
        denom = out
    elif eps_in != 0:
        denom = torch._foreach_add(v, eps_in)
        torch._foreach_sqrt_(denom)
    else:
        denom = torch._foreach_sqrt(v)
    if isinstance(scale, Tensor) or scale != 1.0:
        torch._foreach_mul_(denom, scalar_arg(scale, len(denom)))
    if isinstance(eps_out, Tensor) or eps_out != 0:
        torch._foreach_add_(denom, scalar_arg(eps_out, len(denom)))
    return denom


class _LambBase(TrustRatioOptimizer):
    """Adam moments + a per-tensor trust ratio. State per param: ``exp_avg`` and ``exp_avg_sq``. The step counter
    ``t`` is ``group["step"]``, a float CPU tensor (exact up to 2**24 steps) that counts the steps in which the
    group had at least one gradient (LargeDet's iteration t; timm's Lamb also counts per group). It is in
    ``state_dict()["param_groups"]``, so a resumed run continues exactly; checkpoints of earlier versions, whose
    ``group["step"]`` was a Python int, still load."""

    #: where Adam's second moment v lives (``state[p][...]``), declared for the gradient probe, which measures
    #: AGVM's Phi on Adam-normalised gradients for Adam-family optimizers
    second_moment_state = "exp_avg_sq"

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        # (name, tensor) pairs, as model.named_parameters() gives them: torch.optim takes the names apart
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        complex_ = [tuple(p.shape) for p in tensors if isinstance(p, Tensor) and torch.is_complex(p)]
        if complex_:
            raise ValueError(
                f"{type(self).__name__} does not support complex parameters (shapes {complex_}): its second moment and "
                "trust ratio are defined for real tensors; pass torch.view_as_real(p) views or real parameters"
            )
        param_group["params"] = params
        param_group["step"] = _step_tensor(param_group.get("step", 0))
        super().add_param_group(param_group)

    def _state_keys(self, group: dict):
        return ("exp_avg", "exp_avg_sq")

    def _init_state(self, p: Tensor, state: dict, group: dict) -> None:
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _hyper(self, group: dict) -> LambHyper:  # pragma: no cover - overridden
        raise NotImplementedError

    def _update(self, group, params, grads, states):
        exp_avgs, exp_avg_sqs = states
        return lamb(
            params, grads, exp_avgs, exp_avg_sqs, group["step"], lr=group["lr"], hyper=self._hyper(group),
            foreach=self._use_foreach(group, params), work_buffers=self._scratch(params),
        )

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # an earlier version's Python-int step, or a tensor loaded elsewhere
            group["step"] = _step_tensor(group.get("step", 0))


def _step_tensor(step) -> Tensor:
    """A group's step counter as the step expects it: a 0-dim float CPU tensor of its own."""
    if isinstance(step, Tensor) and step.device.type == "cpu" and step.dtype == step_dtype() and step.dim() == 0:
        return step
    return torch.tensor(float(step), dtype=step_dtype())


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

    State: ``state[p]["exp_avg"]``, ``state[p]["exp_avg_sq"]`` and the step counter ``group["step"]`` (a CPU tensor).
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

    def _hyper(self, group: dict) -> LambHyper:
        beta1, beta2 = group["betas"]
        return LambHyper(
            beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            bias_correction=group["bias_correction"], eps_inside_sqrt=False, cycle=0, scale=1.0,
            trust_clip=group["trust_clip"], adapt=group["adapt"],
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
    position is ``group["step"]`` (a CPU tensor), and so in ``state_dict()``.
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

    def _hyper(self, group: dict) -> LambHyper:
        beta1, beta2 = group["betas"]
        return LambHyper(
            beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            bias_correction=False, eps_inside_sqrt=True, cycle=group["cycle"], scale=group["scale"],
            trust_clip=None, adapt=group["adapt"],
        )
