"""What large-batch training is watched by: gradient variance per detector part and trust ratios per layer.

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
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

ADAM_STATE_KEY = "exp_avg_sq"  # the second moment, as torch's AdamW and largebatch's LAMB / PMD-LAMB name it


class ModuleLayout:
    """The trainable parameters ordered by detector part, so that each part is one slice of a flat bucket."""

    def __init__(self, param_groups: Sequence[dict]):
        by_module: "OrderedDict[str, List[Tuple[torch.nn.Parameter, dict]]]" = OrderedDict()
        for group in param_groups:
            for p in group["params"]:
                by_module.setdefault(group["module"], []).append((p, group))
        self.params: List[torch.nn.Parameter] = []
        self.groups: List[dict] = []
        self.slices: "OrderedDict[str, slice]" = OrderedDict()
        start = 0
        for module, entries in by_module.items():
            size = sum(p.numel() for p, _ in entries)
            self.slices[module] = slice(start, start + size)
            start += size
            for p, g in entries:
                self.params.append(p)
                self.groups.append(g)
        self.numel = start

    @property
    def modules(self) -> List[str]:
        return list(self.slices)

    def flat_grads(self, dtype=torch.float32) -> torch.Tensor:
        """All gradients in one new float32 (or wider) vector; a parameter without gradient counts as zeros."""
        device = self.params[0].device
        dtype = torch.promote_types(dtype, self.params[0].dtype)
        out = torch.empty(self.numel, device=device, dtype=dtype)
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                out[offset : offset + n].zero_()
            else:
                out[offset : offset + n].copy_(p.grad.reshape(-1))
            offset += n
        return out

    def write_grads(self, flat: torch.Tensor) -> None:
        """Copy ``flat`` back into the parameters' gradients (creating them where missing)."""
        offset = 0
        for p in self.params:
            n = p.numel()
            view = flat[offset : offset + n].view_as(p)
            if p.grad is None:
                p.grad = view.to(p.dtype).clone()
            else:
                p.grad.copy_(view)
            offset += n

    def adam_normalize(self, flat: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """g / (sqrt(beta2 * v + (1 - beta2) * g^2) + eps) per element, v = the optimizer's second moment
        before this step (0 before the first): the Adam-normalised gradient on which the official AGVM code
        measures Phi for Adam-family optimizers."""
        state = optimizer.state
        v = torch.zeros_like(flat)
        beta2 = torch.empty_like(flat)
        eps = torch.empty_like(flat)
        offset = 0
        for p, g in zip(self.params, self.groups):
            n = p.numel()
            sq = state.get(p, {}).get(ADAM_STATE_KEY)
            if sq is not None:
                v[offset : offset + n].copy_(sq.reshape(-1))
            beta2[offset : offset + n] = g["betas"][1]
            eps[offset : offset + n] = g["eps"]
            offset += n
        return flat / ((beta2 * v + (1 - beta2) * flat * flat).sqrt() + eps)


def cosine_variance(g1: torch.Tensor, g2: torch.Tensor, slices: Dict[str, slice]) -> torch.Tensor:
    """Phi_i = 1 - cos(g1_i, g2_i) for every part's slice, as one float64 tensor (order of ``slices``).

    A part whose gradient is zero in either half carries no direction: its Phi is 1 (cos taken as 0).
    """
    phis = []
    for sl in slices.values():
        a, b = g1[sl].double(), g2[sl].double()
        denom = a.norm() * b.norm()
        cos = torch.where(denom > 0, torch.dot(a, b) / denom.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        phis.append(1.0 - cos)
    return torch.stack(phis)


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
        self.halves = [dist.new_group(list(range(0, self.split))), dist.new_group(list(range(self.split, self.world_size)))]

    def half_sizes(self, rank: int) -> Tuple[int, int]:
        """(size of rank's own half, size of the other half)."""
        first, second = self.split, self.world_size - self.split
        return (first, second) if rank < self.split else (second, first)

    def reduce(self, layout: ModuleLayout) -> Tuple[torch.Tensor, torch.Tensor]:
        """All-reduce the local gradients: p.grad becomes the global mean; returns (G1, G2) flat vectors."""
        rank = dist.get_rank()
        local = layout.flat_grads()
        own = local.clone()
        dist.all_reduce(own, group=self.halves[0 if rank < self.split else 1])  # the one extra all-reduce
        dist.all_reduce(local)  # what DDP would have done
        n_own, n_other = self.half_sizes(rank)
        global_mean = local.div_(self.world_size)
        layout.write_grads(global_mean)
        own.div_(n_own)
        # sum over the other half = global sum - own half's sum
        other = (global_mean * self.world_size - own * n_own).div_(n_other)
        return (own, other) if rank < self.split else (other, own)


def broadcast_from_main(values: torch.Tensor) -> torch.Tensor:
    """Every worker gets rank 0's values, so all apply bit-identical AGVM multipliers."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.broadcast(values, src=0)
    return values


def weight_grad_ratios(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """||w|| / ||g|| per tensor (LargeDet Fig. 3); 1.0 where either norm is 0, NaN where there is no grad."""
    with_grad = [p for p in params if p.grad is not None]
    out = torch.full((len(params),), float("nan"), dtype=torch.float32, device=params[0].device if params else "cpu")
    if not with_grad:
        return out
    w = torch.stack(torch._foreach_norm([p.detach() for p in with_grad])).float()
    g = torch.stack(torch._foreach_norm([p.grad for p in with_grad])).float()
    ratio = torch.where((w > 0) & (g > 0), w / g.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(w))
    index = torch.tensor([i for i, p in enumerate(params) if p.grad is not None], device=out.device)
    return out.index_copy(0, index, ratio)
