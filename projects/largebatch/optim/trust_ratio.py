"""The base class of the trust-ratio optimizers (LARS, LAMB, PMD-LAMB) and the tensor helpers their steps share.

Plain PyTorch, no detectron2. What lives here:

* :class:`TrustRatioOptimizer`, the private base: the bookkeeping of torch.optim's optimizers (param groups,
  state created in ``_init_group``, the trust ratios each step used: :meth:`~TrustRatioOptimizer.last_trust_ratios`,
  validated hyper-parameters). The math is in each algorithm's functions (``lars()``, ``lamb()``), which take
  tensor lists and a typed tuple of hyper-parameters, with a multi-tensor (``torch._foreach_*``) and a
  per-tensor path, as torch.optim's ``_multi_tensor_*`` / ``_single_tensor_*``;
* small helpers both paths share: per-tensor norms (float32 for half/bfloat16), the "1.0 where a norm
  is 0" rule, device/dtype bucketing, step counters. The constructors' argument checks are in ``checks.py``.

Nothing in a ``step()`` reads a device tensor back to the host: norms and ratios stay tensors, and a per-tensor
ratio reaches the elementwise update as a 0-dim tensor that the kernel broadcasts. The one value read is the
step counter, a CPU tensor as in torch.optim (no device sync), and only eagerly: under ``torch.compile`` the
coefficients that depend on it are tensor ops in the graph, so a compiled step is one graph for the whole run.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "Scalar",
    "TrustRatioOptimizer",
    "norm_dtype",
    "tensor_norm",
    "foreach_norms",
    "safe_ratio",
    "scaled_lists",
    "group_by_device_and_dtype",
    "default_foreach",
    "step_dtype",
    "scalar_arg",
    "axpy_",
    "sub_scaled_",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

#: a hyper-parameter or coefficient as the step functions take it: a number, or a tensor (a tensor LR that a
#: scheduler fills; per-tensor coefficients under torch.compile)
Scalar = Union[float, Tensor]


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms of float16/bfloat16 tensors are accumulated and returned in float32 (a float16 norm of a
    large layer overflows at 65504); other dtypes keep their own, complex ones their real counterpart."""
    return torch.float32 if dtype in _LOW_PRECISION else _REAL_OF_COMPLEX.get(dtype, dtype)


# (dtype.to_real() would do, but dynamo cannot trace it)
_REAL_OF_COMPLEX = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}


def tensor_norm(t: Tensor) -> Tensor:
    """L2 norm of one tensor as a 0-dim tensor (float32 for half/bfloat16)."""
    if t.dtype in _LOW_PRECISION:
        return torch.linalg.vector_norm(t, 2, dtype=torch.float32)
    return torch.linalg.vector_norm(t, 2)  # complex: a real norm


def foreach_norms(tensors: List[Tensor]) -> Tensor:
    """L2 norms of same-device, same-dtype tensors as one 1-D tensor (one fused multi-tensor reduction)."""
    dtype = tensors[0].dtype
    if torch.compiler.is_compiling():
        # one reduction per tensor, which inductor fuses with the ops that produce the tensor (it runs
        # _foreach_norm as an opaque kernel: the tensor would be written out and read back)
        return torch.stack([tensor_norm(t) for t in tensors])
    if dtype in _LOW_PRECISION:
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    else:
        norms = torch._foreach_norm(tensors, 2)
    return torch.stack(norms)


def safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, and exactly 1.0 where either is 0 (a zero-initialised bias, an all-zero gradient):
    no NaN from 0/0 and no infinite step. A NaN norm still gives NaN, so a broken gradient stays visible."""
    return torch.where((num == 0) | (den == 0), 1.0, num / den)


def scaled_lists(vec: Tensor, dtype: torch.dtype) -> List[Tensor]:
    """Split a 1-D tensor of per-tensor scalars into 0-dim tensors for the ``_foreach`` ops (views, no
    copies); cast once to the params' dtype so the elementwise kernels see one dtype."""
    if vec.dtype != dtype:
        vec = vec.to(dtype)
    return list(vec.unbind(0))


def group_by_device_and_dtype(
    tensorlists: List[List[Optional[Tensor]]],
) -> List[Tuple[List[List[Optional[Tensor]]], List[int]]]:
    """Buckets of tensors sharing device and dtype (``_foreach`` kernels need both to be uniform), each with
    the indices of its tensors in the input lists. Eager: one C++ call (torch's own grouping). Compiling: the
    same buckets from the first list's devices and dtypes, which dynamo reads as constants (torch's own
    grouping returns one mixed bucket then, and our norms and casts are per dtype)."""
    if not torch.compiler.is_compiling():
        grouped = Optimizer._group_tensors_by_device_and_dtype(tensorlists, with_indices=True)
        return list(grouped.values())
    buckets: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
    for i, t in enumerate(tensorlists[0]):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    return [([[lst[i] for i in idx] for lst in tensorlists], idx) for idx in buckets.values()]


def step_dtype() -> torch.dtype:
    """The dtype of a step counter, as torch.optim keeps ``state["step"]``: float32 (exact up to 2**24 steps),
    float64 when that is the default dtype."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def default_foreach(params: Iterable[Tensor]) -> bool:
    """``foreach=None``: the multi-tensor path when every tensor is a plain tensor on CPU or CUDA."""
    if torch.jit.is_scripting():
        return False
    return all(type(p) in (Tensor, torch.nn.Parameter) and p.device.type in ("cpu", "cuda") for p in params)


class TrustRatioOptimizer(Optimizer):
    """Private base of LARS, LAMB and PMD-LAMB: the bookkeeping, as torch.optim's own optimizers do it.

    The class gathers, per param group, the params that have a gradient and their state (``_init_group``,
    which ``torch.compile`` runs eagerly instead of tracing it), and hands tensor lists and a typed tuple of
    hyper-parameters to the algorithm's functions (``lars()``, ``lamb()``), which do the math. Subclasses set
    ``_state_keys(group)`` (the per-param state tensors, in the order the function takes them),
    ``_init_state(p, state, group)`` and ``_update(group, params, grads, states)``; the latter returns the ratios
    it used as ``(positions, ratios)`` pairs, one per device/dtype bucket (``positions`` index ``params``,
    ``ratios`` is 1-D).

    Trust ratios are kept out of ``param_groups`` (``state_dict()`` copies group keys, and tensors of
    diagnostics have no place in a checkpoint): ``self._trust_ratios``, one entry per group, a new list each step
    (a compiled step writes the attribute and never reads it, so it adds no guard).
    """

    # Multi-tensor path: work in persistent param-shaped buffers (True) or in fresh temporaries (False).
    # None: buffers on CPU only, where a fresh large temporary page-faults on every step (glibc returns big
    # blocks to the OS) and costs more than a pass over memory; on CUDA the caching allocator makes
    # temporaries free and they allow fewer passes. Under torch.compile, never: inductor plans the memory.
    # Changes speed and memory, never results.
    _reuse_buffers: Optional[bool] = None

    def __init__(self, params, defaults: dict) -> None:
        self._trust_ratios: List[Optional[Tensor]] = []
        super().__init__(params, defaults)

    def _use_work_buffers(self, device: torch.device) -> bool:
        if torch.compiler.is_compiling():
            return False
        return device.type == "cpu" if self._reuse_buffers is None else self._reuse_buffers

    def _scratch(self, params: List[Tensor]) -> Optional[List[Tensor]]:
        """Persistent param-shaped work buffers, one per param, where ``_use_work_buffers`` says so (else None).
        Not optimizer state: not in ``state_dict()``, not pickled."""
        if not params or not self._use_work_buffers(params[0].device):
            return None
        cache = self.__dict__.setdefault("_scratch_buffers", {})
        out = []
        for p in params:
            buf = cache.get(p)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                buf = cache[p] = torch.empty_like(p, memory_format=torch.preserve_format)
            out.append(buf)
        return out

    # -- hooks for subclasses ------------------------------------------------------------------------------
    def _validate(self, group: dict) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _state_keys(self, group: dict) -> Tuple[str, ...]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _init_state(self, p: Tensor, state: dict, group: dict) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _update(
        self, group: dict, params: List[Tensor], grads: List[Tensor], states: List[List[Tensor]]
    ) -> List[Tuple[Sequence[int], Tensor]]:  # pragma: no cover - overridden
        raise NotImplementedError

    # -- torch.optim.Optimizer plumbing ---------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        # per-group overrides are checked with the same rules as the constructor's arguments, before the group
        # joins param_groups (a refused group leaves the optimizer as it was)
        self._validate({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_trust_ratios", [])

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._trust_ratios = []

    def last_trust_ratios(self) -> List[Optional[Tensor]]:
        """Per param group, the ratios the last ``step()`` used (LARS: local LR; LAMB: trust ratio; PMD-LAMB:
        ``||w|| / ||u||``), a 1-D tensor in ``group["params"]`` order, in the params' dtype (float32 for
        half/bfloat16 or mixed dtypes), on the device of the group's first param. NaN marks a param that
        had no gradient in that step (it was skipped). ``None`` for a group never stepped."""
        ratios = getattr(self, "_trust_ratios", [])
        return [ratios[i] if i < len(ratios) else None for i in range(len(self.param_groups))]

    def _init_group(self, group: dict, params: list, grads: list, positions: list, *states: list) -> None:
        """Fill the empty lists with the params of ``group`` that have a gradient, their gradients, their
        positions in the group and their state tensors (one list per ``_state_keys``), creating the state of
        a param on its first step. torch.compile runs this eagerly (as for torch.optim's optimizers), so the
        compiled step sees only tensor lists."""
        keys = self._state_keys(group)
        for j, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
            positions.append(j)
            state = self.state[p]
            if not state:
                self._init_state(p, state, group)
            for key, values in zip(keys, states):
                values.append(state[key])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Performs one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        trust_ratios: List[Optional[Tensor]] = []
        for group in self.param_groups:
            params, grads, positions = [], [], []
            states = [[] for _ in self._state_keys(group)]
            self._init_group(group, params, grads, positions, *states)
            n = len(group["params"])
            if not params:
                p0 = group["params"][0] if n else None
                trust_ratios.append(
                    torch.full((n,), float("nan"), dtype=norm_dtype(p0.dtype), device=p0.device) if n else None
                )
                continue
            pieces = self._update(group, params, grads, states)
            trust_ratios.append(self._assemble(group["params"], positions, pieces))
        self._trust_ratios = trust_ratios
        return loss

    def _use_foreach(self, group: dict, params: List[Tensor]) -> bool:
        foreach = group.get("foreach")
        return default_foreach(params) if foreach is None else bool(foreach)

    @staticmethod
    def _assemble(
        group_params: List[Tensor], positions: List[int], pieces: List[Tuple[Sequence[int], Tensor]]
    ) -> Tensor:
        """One 1-D tensor of ratios in group order from per-bucket pieces; NaN for params skipped."""
        n = len(group_params)
        device = group_params[0].device
        dtypes = {norm_dtype(p.dtype) for p in group_params}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        if len(pieces) == 1 and len(positions) == n:
            pos, vec = pieces[0]
            if list(pos) == list(range(n)):  # the common case: one bucket, every param stepped
                return vec.detach().to(device=device, dtype=dtype)
        entries: List[Optional[Tensor]] = [None] * n
        for pos, vec in pieces:
            vals = vec.detach().to(device=device, dtype=dtype).unbind(0)
            for k, v in zip(pos, vals):
                entries[positions[k]] = v
        if any(e is None for e in entries):
            nan = torch.full((), float("nan"), dtype=dtype, device=device)
            entries = [nan if e is None else e for e in entries]
        return torch.stack(entries)  # type: ignore[arg-type]


def scalar_arg(value: Scalar, n: int):
    """A scalar for a ``_foreach`` op over n tensors: a number as it is, a 0-dim tensor (a coefficient traced by
    torch.compile) as n references to it, so that the list overload takes it (dynamo reads a tensor given to the
    scalar overload back to the host: a graph break)."""
    return [value] * n if isinstance(value, Tensor) else value


def axpy_(xs: List[Tensor], ys: List[Tensor], a) -> None:
    """``xs[i] += a_i * ys[i]`` in place. ``a``: a Python number (one fused add), a 0-dim tensor (e.g. a
    tensor LR), or a list of 0-dim tensors, one per tensor (a per-tensor trust ratio, never read back)."""
    if isinstance(a, list):
        torch._foreach_addcmul_(xs, ys, a)
    elif isinstance(a, Tensor):
        torch._foreach_addcmul_(xs, ys, [a] * len(xs))
    else:
        torch._foreach_add_(xs, ys, alpha=a)


def sub_scaled_(x: Tensor, y: Tensor, lr) -> None:
    """``x -= lr * y`` for a number or a tensor ``lr`` (per-tensor path)."""
    if isinstance(lr, Tensor):
        x.sub_(y * lr)
    else:
        x.add_(y, alpha=-lr)
