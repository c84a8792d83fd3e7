"""AGVM: Adaptive Gradient Variance Modulator (Xue et al., NeurIPS 2022), as a wrapper over any optimizer.

The paper's per-module learning-rate multiplier (eq. 4 and 5):

    Phi_i  = 1 - cos(G1_i, G2_i)                     gradient variance of detector part i (eq. 3, eta^2
                                                     cancels since all parts share one global LR)
    new_i  = sqrt(clamp((Phi_a + 1e-6) / (Phi_i + 1e-6), low, high))      a = the anchor (backbone)   (eq. 4)
    mu_i  <- alpha * mu_i + (1 - alpha) * new_i,     mu_i = 1 at the start                           (eq. 5)

and the step uses lr_i = mu_i * lr. Measuring Phi needs the gradients of two halves of the workers and
lives in ``largebatch.monitor``; this class keeps mu, applies it, and checkpoints it (the official code
forgets mu on resume).

Plain PyTorch: no detectron2 import here.
"""
import logging
import math
from collections import OrderedDict
from typing import Dict, Tuple

import torch

logger = logging.getLogger("largebatch")


class AGVM(torch.optim.Optimizer):
    """Wraps ``optimizer`` (whose param groups carry ``"module"``) and scales each group's LR by mu[module].

    It is a real ``torch.optim.Optimizer`` that shares ``param_groups`` and ``state`` with the wrapped
    optimizer, so LR schedulers, GradScaler and gradient clipping see the groups they expect.

    Args:
        optimizer: the optimizer that does the update (SGD, AdamW, LARS, LAMB, PMD-LAMB, ...).
        anchor: the part whose LR is left unchanged (mu = 1).
        momentum: alpha of eq. 5.
        interval: tau, iterations between two measurements of Phi.
        start_iter: from this iteration on, mu is measured and applied; before it, plain steps.
        clamp: (low, high) bounds of Phi_anchor / Phi_i in eq. 4.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        anchor: str = "backbone",
        momentum: float = 0.97,
        interval: int = 10,
        start_iter: int = 0,
        clamp: Tuple[float, float] = (0.5, 10.0),
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        modules = [g.get("module") for g in optimizer.param_groups]
        if None in modules:
            raise ValueError("optimizer: every param group needs a 'module' key (see largebatch.optim.groups)")
        if anchor not in modules:
            raise ValueError(f"anchor: {anchor!r} is not a module of the optimizer's groups {sorted(set(modules))}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum: expected 0 <= momentum < 1, got {momentum}")
        if int(interval) != interval or interval < 1:
            raise ValueError(f"interval: expected an integer >= 1, got {interval}")
        if int(start_iter) != start_iter or start_iter < 0:
            raise ValueError(f"start_iter: expected an integer >= 0, got {start_iter}")
        if len(clamp) != 2 or not 0 < clamp[0] <= clamp[1]:
            raise ValueError(f"clamp: expected (low, high) with 0 < low <= high, got {clamp}")
        self.optimizer = optimizer
        self.anchor = anchor
        self.momentum = float(momentum)
        self.interval = int(interval)
        self.start_iter = int(start_iter)
        self.clamp = (float(clamp[0]), float(clamp[1]))
        self.mu: Dict[str, float] = OrderedDict((m, 1.0) for m in OrderedDict.fromkeys(modules))
        self.iteration = 0  # optimizer steps taken so far
        self._warned_non_finite = set()  # parts whose non-finite Phi was logged
        self._applied_lrs = None  # the LR of each group in the last step
        self.defaults = optimizer.defaults
        # what torch.optim.Optimizer.__init__ would set up; the groups themselves stay the wrapped optimizer's
        for hooks in (
            "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks",
        ):
            setattr(self, hooks, OrderedDict())
        self._patch_step_function()

    # the wrapped optimizer may rebind these (load_state_dict does), so always read them through it
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    def __repr__(self):
        return f"AGVM(anchor={self.anchor}, momentum={self.momentum}, interval={self.interval}, " \
               f"start_iter={self.start_iter}, clamp={self.clamp}) over {self.optimizer!r}"

    def set_iteration(self, iteration: int) -> None:
        """The trainer's iteration of the next step. AGVM applies mu from ``start_iter`` on by its step count;
        the trainer keeps that count on its own iteration (a resume from a checkpoint without AGVM, a step that
        GradScaler skipped)."""
        self.iteration = int(iteration)

    def applied_lrs(self):
        """The LR each param group stepped with in the last step: the scheduler's LR times mu[module] where
        mu was applied (from ``start_iter`` on), as a list in param-group order; None before the first step."""
        return None if self._applied_lrs is None else list(self._applied_lrs)

    def is_measurement_iter(self, iteration: int) -> bool:
        """Whether Phi (eq. 3) is measured and mu updated (eq. 4-5) at this iteration: every tau = ``interval``
        iterations from ``start_iter`` on (iteration % tau == 0, as the official code)."""
        return iteration >= self.start_iter and iteration % self.interval == 0

    def target_mu(self, phi: Dict[str, float]) -> Dict[str, float]:
        """Eq. 4: the unsmoothed multiplier of every part present in ``phi`` (which must hold the anchor)."""
        if self.anchor not in phi:
            raise KeyError(f"phi has no value for the anchor {self.anchor!r}")
        low, high = self.clamp
        ref = float(phi[self.anchor]) + 1e-6
        return {m: 1.0 if m == self.anchor else math.sqrt(min(max(ref / (float(p) + 1e-6), low), high))
                for m, p in phi.items()}

    def update(self, phi: Dict[str, float]) -> Dict[str, float]:
        """Eq. 5: move mu towards eq. 4's target; parts missing from ``phi`` keep their mu. Returns a copy.

        A non-finite Phi (a float16 overflow that reached the measurement, a part without gradient in one
        half) says nothing about the variance: that part keeps its mu, and so does every part when the
        anchor's Phi is not finite (eq. 4 divides by nothing). Said once per part in the log."""
        bad = [m for m, p in phi.items() if not math.isfinite(float(p))]
        for m in bad:
            if m not in self._warned_non_finite:
                self._warned_non_finite.add(m)
                logger.warning("AGVM: non-finite gradient variance of %s (%s): its mu is left unchanged (said once)",
                               m, phi[m])
        if self.anchor in bad:
            return dict(self.mu)
        for m, target in self.target_mu({m: p for m, p in phi.items() if m not in bad}).items():
            if m in self.mu:
                self.mu[m] = self.momentum * self.mu[m] + (1.0 - self.momentum) * target
        self.mu[self.anchor] = 1.0
        return dict(self.mu)

    @torch.no_grad()
    def step(self, closure=None):
        """The wrapped optimizer's step with eq. 4's module LR eta_i = mu_i * eta: from ``start_iter`` on, each
        group's LR is multiplied by mu[group["module"]] for this step and then restored (the scheduler owns
        eta); before it, a plain step."""
        if self.iteration < self.start_iter:
            self._applied_lrs = [g["lr"] for g in self.param_groups]
            loss = self.optimizer.step(closure)
        else:
            base_lrs = [g["lr"] for g in self.param_groups]
            for g in self.param_groups:
                g["lr"] = g["lr"] * self.mu[g["module"]]
            self._applied_lrs = [g["lr"] for g in self.param_groups]
            try:
                loss = self.optimizer.step(closure)
            finally:  # the scheduler owns the base LR: give it back untouched
                for g, lr in zip(self.param_groups, base_lrs):
                    g["lr"] = lr
        self.iteration += 1
        return loss

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group):
        if "module" not in param_group:
            raise ValueError("param_group: needs a 'module' key")
        self.optimizer.add_param_group(param_group)
        self.mu.setdefault(param_group["module"], 1.0)

    def last_trust_ratios(self):
        """The wrapped optimizer's trust ratios of its last step, if it records them."""
        getter = getattr(self.optimizer, "last_trust_ratios", None)
        return getter() if getter is not None else None

    # pickle / copy.deepcopy: the whole wrapper (torch.optim.Optimizer's own would keep only defaults, state and
    # param_groups, which here live in the wrapped optimizer)
    def __getstate__(self):
        return dict(self.__dict__)

    def __setstate__(self, state):
        self.__dict__.update(state)

    def state_dict(self):
        """The wrapped optimizer's state dict and mu; torch's state-dict pre / post hooks run as for any optimizer."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = {
            "optimizer": self.optimizer.state_dict(),
            "agvm": {"mu": dict(self.mu), "iteration": self.iteration},
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict):
        """Restore what ``state_dict()`` saved. A plain optimizer state (a checkpoint of a run without AGVM,
        resumed with AGVM switched on) goes to the wrapped optimizer, and mu starts at 1 (eq. 5's start). torch's
        load-state-dict pre / post hooks run as for any optimizer."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load_state_dict(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load_state_dict(self, state_dict):
        if "agvm" not in state_dict:
            if "state" in state_dict and "param_groups" in state_dict:
                logger.warning("AGVM: loading the state of an optimizer without AGVM; mu starts at 1.0")
                self.optimizer.load_state_dict(state_dict)
                return
            raise KeyError("state_dict has no 'agvm' entry: it was not saved by an AGVM optimizer")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.mu.update({m: float(v) for m, v in state_dict["agvm"]["mu"].items()})
        self.mu[self.anchor] = 1.0
        self.iteration = int(state_dict["agvm"]["iteration"])
