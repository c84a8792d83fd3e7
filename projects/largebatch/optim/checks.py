"""Argument checks of the optimizers' constructors: one ValueError line naming the argument, its value and the rule."""
import numbers

from torch import Tensor

__all__ = ["check", "check_lr", "check_nonneg", "check_positive", "check_trust_clip", "check_betas"]


def check(name: str, ok: bool, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} (must be {rule})")


def _is_real(x) -> bool:
    return (isinstance(x, numbers.Real) and not isinstance(x, bool)) or (isinstance(x, Tensor) and x.numel() == 1)


def check_lr(lr) -> None:
    check("lr", _is_real(lr) and lr >= 0, lr, ">= 0")


def check_nonneg(name: str, value) -> None:
    check(name, _is_real(value) and value >= 0, value, ">= 0")


def check_positive(name: str, value) -> None:
    check(name, _is_real(value) and value > 0, value, "> 0")


def check_trust_clip(value) -> None:
    check("trust_clip", value is None or (_is_real(value) and value > 0), value, "None or > 0")


def check_betas(betas) -> None:
    ok = isinstance(betas, (tuple, list)) and len(betas) == 2
    check("betas", ok, betas, "a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        check(f"betas[{i}]", _is_real(b) and 0 <= b < 1, b, "in [0, 1)")
