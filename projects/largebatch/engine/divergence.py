"""``ExplosionGuard``: stops training while a divergence is still finite, before the weights blow up.

Every iteration the stepper hands it the total loss (mean over the workers) and the global gradient norm
(identical on every worker), so every worker takes the same decision. When either exceeds ``factor`` times its
median over the previous ``window`` iterations, training stops before the optimizer step, so nothing of the
exploding iteration is applied or checkpointed and the last checkpoint is one written before the trouble.

Measured by bench/explosion_guard.py (bench/results/explosion_guard.md, 2 workers): healthy runs reach ratios of
2.0-2.1 on the shapes recipes and up to 3.0 in the large-batch study's batch-64 arms; configs/shapes/sgd.yaml at
BASE_LR 0.3 (6 seeds) crosses 10 two to three iterations before its values turn non-finite. With a checkpoint
every iteration, the one ``--resume`` then picks (the last whose iteration stayed below half the factor, see
``trouble``) was written 4-6 iterations before the non-finite one, at a loss of 1.2-4.5 (2.3 at the start).
Hence the default factor of 10: a stop that healthy runs stay 3x below, and a resumable checkpoint from before.
"""
import statistics
from collections import deque
from typing import Deque, Optional, Tuple

__all__ = ["ExplosionGuard"]


class ExplosionGuard:
    """``factor`` > 0: stop when a value passes factor x its median over the last ``window`` iterations (checked
    from ``min_history`` iterations of history on); 0 disables the guard."""

    def __init__(self, factor: float = 10.0, window: int = 20, min_history: int = 5):
        self.factor = float(factor)
        self.window = int(window)
        self.min_history = min(int(min_history), self.window)
        self.history: Deque[Tuple[float, float]] = deque(maxlen=self.window)  # (total loss, gradient norm)
        #: the last check's highest ratio to the median, and what it was of ("" before min_history iterations)
        self.ratio, self.ratio_of = 0.0, ""
        #: the highest ratio of the run so far and its iteration (-1: none yet): how close it came to the factor
        self.highest: Tuple[float, int] = (0.0, -1)

    def check(self, iteration: int, loss: float, grad_norm: float) -> None:
        """Raise FloatingPointError if ``loss`` or ``grad_norm`` exploded; otherwise remember them. The ratios
        are measured with the guard off too (factor 0): they are what the trainer logs as ``explosion_ratio``."""
        self.ratio, self.ratio_of = 0.0, ""
        if len(self.history) >= self.min_history:
            for name, value, past in (("the total loss", loss, [h[0] for h in self.history]),
                                      ("the gradient norm", grad_norm, [h[1] for h in self.history])):
                median = statistics.median(past)
                if median > 0 and value / median > self.ratio:
                    self.ratio, self.ratio_of, stopped_value, stopped_median = value / median, name, value, median
            if self.ratio > self.highest[0]:
                self.highest = (self.ratio, iteration)
            if 0 < self.factor < self.ratio:
                raise FloatingPointError(
                    f"Training diverged at iteration {iteration}: {self.ratio_of} {stopped_value:.4g} is "
                    f"{self.ratio:.3g}x its median {stopped_median:.4g} over the last {len(self.history)} iterations "
                    f"(MONITOR.EXPLOSION_FACTOR = {self.factor:g}). Stopped on every worker before the optimizer "
                    "step: nothing of this iteration was applied or checkpointed; --resume continues from the last "
                    "good checkpoint (OUTPUT_DIR/last_checkpoint), e.g. with a lower SOLVER.BASE_LR, which a resume "
                    "applies."
                )
        self.history.append((float(loss), float(grad_norm)))

    def trouble(self) -> Optional[str]:
        """Why the weights the last step produced may already be going bad, or None: the last iteration's loss or
        gradient norm was above half the factor times its median. A checkpoint written then is not tagged as
        ``last_checkpoint`` (see ``AtomicCheckpointer``), so ``--resume`` picks one from before the trouble."""
        if self.factor <= 0 or self.ratio <= self.factor / 2:
            return None
        return (f"{self.ratio_of} was {self.ratio:.3g}x its median at the last iteration, above half "
                f"MONITOR.EXPLOSION_FACTOR ({self.factor:g})")

    def state_dict(self) -> dict:
        return {"history": list(self.history), "highest": list(self.highest)}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(tuple(h) for h in state.get("history", []))
        ratio, iteration = state.get("highest", (0.0, -1))
        self.highest = (float(ratio), int(iteration))
