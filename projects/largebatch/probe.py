"""The gradient probe: per-part gradient variance (AGVM eq. 3) and the measurement the trainer publishes.

Gradient variance (AGVM eq. 3, without the eta^2 that all parts share): Phi_i = 1 - cos(G1_i, G2_i), where
G1 / G2 are the mean gradients of the two halves of the workers, ranks [0, W/2) and [W/2, W). On a
measurement iteration the backward runs without DDP's all-reduce and ``HalfGroupReducer`` forms, from one
flattened bucket, the mean of the worker's own half (the one extra all-reduce, within the half group) and
the exact global mean (the all-reduce DDP would have done), writes the global mean into ``p.grad`` for the
step, and derives the other half's mean from the two. Phi is computed on rank 0's numbers and broadcast,
so every worker applies the same AGVM multipliers. On one worker the two halves are two halves of the
batch (see the trainer). AGVM and the monitoring hook share this one implementation.
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["GradientMeasurement", "ModuleLayout", "cosine_variance", "HalfGroupReducer", "ReducedGradients",
           "broadcast_from_main", "second_moment_state"]


@dataclass(frozen=True)
class GradientMeasurement:
    """What the trainer's stepper measured on one iteration, published as ``stepper.measurement`` for AGVM and
    the monitor (neither measures anything itself).

    iteration: the trainer iteration it belongs to.
    grad_norms: ||g|| of every parameter that has a gradient, in ``ModuleLayout.params`` order (float32, on the
        parameters' device): the gradient the step uses (global mean over the workers, unscaled).
    grads_finite: False when the gradients overflowed under AMP: GradScaler skips that step, and nothing of it
        is measured or recorded.
    phi: grad_var per detector part, Phi_i = 1 - cos(G1_i, G2_i) (AGVM eq. 3), identical on every worker;
        None on iterations that are not measurement iterations (or whose step is skipped).
    explosion_check: what the explosion guard (``engine.divergence``) judged on this iteration, the same on every
        worker: ``{"total_loss", "grad_norm", "explosion_ratio"}``, the ratio being the larger of loss / median
        and gradient norm / median (None before the guard has enough history); None when the gradients
        overflowed under AMP (not judged).
    noise: this measurement's unbiased (|G|^2, tr(Sigma)) per part and for the whole model ("all"), the gradient
        noise scale's two terms (``largebatch.noise_scale``), identical on every worker; None where phi is.
    noise_adam: the same for the gradient preconditioned by Adam's 1 / (sqrt(v) + eps) (AdamW, LAMB, PMD-LAMB; v
        before this step), else None.
    """

    iteration: int
    grad_norms: torch.Tensor
    grads_finite: bool = True
    phi: Optional[Dict[str, float]] = None
    explosion_check: Optional[Dict[str, Optional[float]]] = None
    noise: Optional[Dict[str, Tuple[float, float]]] = None
    noise_adam: Optional[Dict[str, Tuple[float, float]]] = None


def second_moment_state(optimizer: torch.optim.Optimizer) -> Optional[str]:
    """The ``optimizer.state[p]`` key of Adam's second moment v when the optimizer has one, else None.

    The official AGVM code measures Phi on Adam-normalised gradients for Adam-family optimizers. Optimizers
    declare it: largebatch's LAMB / PMD-LAMB by a ``second_moment_state`` class attribute; torch's Adam and
    AdamW (and detectron2's gradient-clipping subclasses of them) are known here. Their groups carry
    ``betas`` and ``eps``."""
    declared = getattr(optimizer, "second_moment_state", None)
    if declared is not None:
        return declared
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "exp_avg_sq"
    return None


class ModuleLayout:
    """The trainable parameters ordered by detector part, so that each part is one slice of a flat bucket
    (the per-module gradient vectors G_t^(i) of AGVM eq. 3 are the slices of that bucket).

    ``param_groups`` is an optimizer (preferred) or a list of its groups. Given the optimizer, ``groups``
    always names the optimizer's current group dicts: ``Optimizer.load_state_dict`` (a resume) replaces them
    with new dicts, and the LR scheduler then updates those, not the ones seen at construction.
    """

    def __init__(self, param_groups):
        self._owner = param_groups if hasattr(param_groups, "param_groups") else None
        source = list(self._owner.param_groups if self._owner is not None else param_groups)
        by_module: "OrderedDict[str, List[Tuple[torch.nn.Parameter, int]]]" = OrderedDict()
        for index, group in enumerate(source):
            for p in group["params"]:
                by_module.setdefault(group["module"], []).append((p, index))
        self.params: List[torch.nn.Parameter] = []
        self._group_index: List[int] = []
        self.slices: "OrderedDict[str, slice]" = OrderedDict()
        start = 0
        for module, entries in by_module.items():
            size = sum(p.numel() for p, _ in entries)
            self.slices[module] = slice(start, start + size)
            start += size
            for p, index in entries:
                self.params.append(p)
                self._group_index.append(index)
        self.numel = start
        self.sizes: List[int] = [p.numel() for p in self.params]
        self._source = source if self._owner is None else None
        self._groups: Optional[List[dict]] = None
        self._groups_of = None  # the param_groups list ``_groups`` was resolved from
        self._betas_key = None  # what _per_element_betas built its cached tensors from
        self._betas = None

    @property
    def groups(self) -> List[dict]:
        """The param group of every parameter of ``params`` (same order)."""
        current = self._owner.param_groups if self._owner is not None else self._source
        if self._groups is None or self._groups_of is not current:
            self._groups = [current[i] for i in self._group_index]
            self._groups_of = current
        return self._groups

    @property
    def modules(self) -> List[str]:
        return list(self.slices)

    def flat_grads(self, dtype=torch.float32, extra: int = 0) -> torch.Tensor:
        """All gradients in one new float32 (or wider) vector; a parameter without gradient counts as zeros.
        ``extra``: that many more (uninitialised) entries at the end, for values that travel in the same
        all-reduce."""
        device = self.params[0].device
        dtype = torch.promote_types(dtype, self.params[0].dtype)
        out = torch.empty(self.numel + extra, device=device, dtype=dtype)
        pieces = [
            p.grad.reshape(-1) if p.grad is not None else torch.zeros(n, device=device, dtype=dtype)
            for p, n in zip(self.params, self.sizes)
        ]
        torch.cat(pieces, out=out[:self.numel])  # one kernel instead of a copy per tensor
        return out

    def part_sq_norms(self, flat: torch.Tensor) -> torch.Tensor:
        """|flat_i|^2 of every part's slice, one tensor (order of ``slices``) in ``flat``'s dtype, on its device:
        torch's cascade summation per part, no host sync."""
        return torch.stack([(flat[sl] * flat[sl]).sum() for sl in self.slices.values()])

    def write_grads(self, flat: torch.Tensor) -> None:
        """Copy ``flat`` back into the parameters' gradients (creating them where missing)."""
        views = [v.view_as(p) for v, p in zip(flat.split(self.sizes), self.params)]
        have = [(p.grad, v) for p, v in zip(self.params, views) if p.grad is not None]
        if have:
            torch._foreach_copy_([g for g, _ in have], [v for _, v in have])
        for p, v in zip(self.params, views):
            if p.grad is None:
                p.grad = v.to(p.dtype, copy=True)

    def adam_normalize(self, flat: torch.Tensor, optimizer: torch.optim.Optimizer, state_key: str) -> torch.Tensor:
        """g / (sqrt(beta2 * v + (1 - beta2) * g^2) + eps) per element, v = the optimizer's second moment
        ``optimizer.state[p][state_key]`` before this step (0 before the first): the Adam-normalised gradient on
        which the official AGVM code measures Phi (eq. 3) for Adam-family optimizers (AdamW, LAMB, PMD-LAMB)."""
        v = self._second_moments(flat, optimizer, state_key)
        beta2, eps = self._per_element_betas(flat)
        return flat / ((beta2 * v + (1 - beta2) * flat * flat).sqrt() + eps)

    def adam_preconditioner(self, like: torch.Tensor, optimizer: torch.optim.Optimizer, state_key: str) -> torch.Tensor:
        """1 / (sqrt(v) + eps) per element, v = the optimizer's second moment before this step (0 before the first:
        a constant, i.e. the raw gradient): the fixed, linear preconditioner under which the gradient noise scale of
        an Adam-family optimizer is measured (its scale cancels in B_simple; v's bias correction too)."""
        v = self._second_moments(like, optimizer, state_key)
        _, eps = self._per_element_betas(like)
        return 1.0 / (v.sqrt() + eps)

    def _second_moments(self, like: torch.Tensor, optimizer: torch.optim.Optimizer, state_key: str) -> torch.Tensor:
        state = optimizer.state
        return torch.cat([
            sq.reshape(-1).to(like.dtype) if sq is not None else torch.zeros(n, device=like.device, dtype=like.dtype)
            for sq, n in ((state.get(p, {}).get(state_key), n) for p, n in zip(self.params, self.sizes))
        ])

    def _per_element_betas(self, flat: torch.Tensor):
        """beta2 and eps of every element's param group, built on the host once (and again only when a group's
        values change): no host-device copy or sync on a measurement iteration."""
        groups = self.groups
        key = (tuple(g["betas"][1] for g in groups), tuple(g["eps"] for g in groups), flat.device, flat.dtype)
        if self._betas_key != key:
            sizes = torch.tensor(self.sizes)
            per_element = [torch.tensor(values, dtype=flat.dtype).repeat_interleave(sizes, output_size=self.numel)
                           for values in key[:2]]
            self._betas = [t.to(flat.device) for t in per_element]
            self._betas_key = key
        return self._betas


def cosine_variance(g1: torch.Tensor, g2: torch.Tensor, slices: Dict[str, slice]) -> torch.Tensor:
    """AGVM eq. 3 without eta^2: Phi_i = 1 - cos(g1_i, g2_i) for every part's slice, as one float64 tensor
    (order of ``slices``).

    A part whose gradient is zero in either half carries no direction: its Phi is 1 (cos taken as 0).
    The three sums <g1, g2>, |g1|^2, |g2|^2 are taken in the gradients' dtype with torch's cascade summation
    (not BLAS dot, whose float32 accumulator is ~1e-5 off on a million entries) and combined in float64: Phi is
    within ~1e-7 of a float64 computation, far below the 1e-6 that eq. 4 adds, without a float64 copy of the
    gradients (which cost more than the rest of a measurement).
    """
    def three_sums(a, b):
        return torch.stack([(x * y).sum().double() for x, y in ((a, b), (a, a), (b, b))])

    sums = torch.stack([three_sums(g1[sl], g2[sl]) for sl in slices.values()])  # (parts, 3): <a,b>, |a|^2, |b|^2
    if not bool(torch.isfinite(sums).all()):  # float32 overflow of the squares (one host sync): those in float64
        for i, sl in enumerate(slices.values()):
            if not bool(torch.isfinite(sums[i]).all()):
                sums[i] = three_sums(g1[sl].double(), g2[sl].double())
    dot, aa, bb = sums.unbind(1)
    denom = (aa * bb).sqrt()
    cos = torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return 1.0 - cos.clamp(-1.0, 1.0)


class HalfGroupReducer:
    """Replaces DDP's gradient all-reduce on measurement iterations and measures Phi on the way.

    Needs W >= 2 workers; every worker must create the two half groups in the same order, which
    ``__init__`` does (so construct it on every worker).
    """

    def __init__(self, world_size: Optional[int] = None):
        self.world_size = world_size or dist.get_world_size()
        if self.world_size < 2:
            raise ValueError("HalfGroupReducer needs at least 2 workers; on one worker split the batch instead")
        self.split = self.world_size // 2  # ranks [0, split) and [split, W)
        self.halves = [dist.new_group(list(range(0, self.split))),
                       dist.new_group(list(range(self.split, self.world_size)))]

    def half_sizes(self, rank: int) -> Tuple[int, int]:
        """(size of rank's own half, size of the other half)."""
        first, second = self.split, self.world_size - self.split
        return (first, second) if rank < self.split else (second, first)

    def reduce(self, layout: ModuleLayout, local_norms: bool = True,
               preconditioner: Optional[torch.Tensor] = None) -> "ReducedGradients":
        """All-reduce the local gradients: p.grad becomes the global mean; returns (G1, G2) flat vectors,
        the mean gradients of ranks [0, W/2) and [W/2, W) (the two groups of AGVM eq. 3), and the mean over the
        workers of each part's squared local-gradient norm (the small-batch term of the noise scale).

        Called after a backward without DDP's all-reduce. One flat bucket: the sum over the worker's own half
        (the one extra all-reduce, within the half group; none when that half is this worker alone) runs
        concurrently with the global sum (what DDP would have done), whose bucket carries the parts' squared
        local norms at its end (a few floats more, no extra collective). The other half's sum is the global sum
        minus the own half's. ``local_norms`` False: no squared norms (``local_sq`` is None). ``preconditioner``
        (flat, layout order): also the squared norms of the preconditioned local gradients (``local_sq_pre``).
        """
        rank = dist.get_rank()
        in_first = rank < self.split
        n_own, n_other = self.half_sizes(rank)
        parts = len(layout.slices) if local_norms else 0
        pre = parts if local_norms and preconditioner is not None else 0
        bucket = layout.flat_grads(extra=parts + pre)
        local = bucket[:layout.numel]
        if local_norms:
            bucket[layout.numel:layout.numel + parts] = layout.part_sq_norms(local)
        if pre:
            bucket[layout.numel + parts:] = layout.part_sq_norms(local * preconditioner)
        own = local.clone()
        work = None
        if n_own > 1:  # the one extra all-reduce
            work = dist.all_reduce(own, group=self.halves[0 if in_first else 1], async_op=True)
        dist.all_reduce(bucket)  # what DDP would have done: the global sum (and the squared norms' sum)
        if work is not None:
            work.wait()
        other = (local - own).div_(n_other)  # the other half's sum, then its mean
        layout.write_grads(local.div_(self.world_size))  # the exact global mean is what the step uses
        own.div_(n_own)
        sums = bucket[layout.numel:].double() / self.world_size
        local_sq = sums[:parts] if local_norms else None
        local_sq_pre = sums[parts:] if pre else None
        g1, g2 = (own, other) if in_first else (other, own)
        return ReducedGradients(g1, g2, local_sq, local, local_sq_pre)


class ReducedGradients(NamedTuple):
    """What ``HalfGroupReducer.reduce`` (or one worker's two half-batches) leaves for the measurements.

    g1, g2: the two halves' mean gradients (flat, layout order). local_sq: per part, the mean over the S small
    gradients (the W workers' own, or the two halves) of their squared norms, float64. mean: the gradient the step
    uses (flat), the global mean. local_sq_pre: as local_sq, of the preconditioned small gradients (Adam-family
    optimizers), else None."""

    g1: torch.Tensor
    g2: torch.Tensor
    local_sq: Optional[torch.Tensor]
    mean: torch.Tensor
    local_sq_pre: Optional[torch.Tensor] = None


def broadcast_from_main(values: torch.Tensor) -> torch.Tensor:
    """Every worker gets rank 0's values, so all apply bit-identical AGVM multipliers."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.broadcast(values, src=0)
    return values

