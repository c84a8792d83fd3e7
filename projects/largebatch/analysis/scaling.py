"""The measured critical batch: steps to a target loss at several batch sizes, and McCandlish's fit through them.

McCandlish et al. (2018), eq. 2.11: training to a given loss, the steps S and the examples E = B S of a run at batch
B trade off as (S / S_min - 1)(E / E_min - 1) = 1, which is S(B) = S_min + E_min / B: a straight line in 1 / B
whose intercept is the fewest steps any batch needs and whose slope the fewest examples. The critical batch is
B_crit = E_min / S_min (their eq. 2.12): there, a run needs 2 S_min steps and 2 E_min examples. ``fit_tradeoff``
fits that line by least squares; ``steps_to_target`` reads where a run's training loss first reaches the target.

A run's training loss is the mean over one batch, so its noise falls with the batch: it is smoothed over a window
of about the same number of images at every batch (``window_images``), and the step at which the window's mean
first reaches the target is the window's centre (the mean lags the loss by half a window).
"""
import math
from typing import List, Optional, Sequence, Tuple

__all__ = ["fit_tradeoff", "predicted_steps", "smoothing_window", "steps_to_target", "window_mean"]


def smoothing_window(batch: int, window_images: int) -> int:
    """Iterations in a window of about ``window_images`` images at ``batch`` (at least 1)."""
    return max(1, round(window_images / batch))


def steps_to_target(losses: Sequence[Tuple[int, float]], target: float, window: int) -> Optional[float]:
    """The step at which the mean loss over ``window`` consecutive iterations first falls to ``target`` or below,
    taken as the window's centre (counted in steps: iteration i is the (i + 1)-th step); None if it never does.
    ``losses``: (iteration, total loss) in order, every iteration present."""
    values = [v for _, v in losses]
    for start in range(0, len(values) - window + 1):
        if window_mean(values[start:start + window]) <= target:
            return losses[start][0] + 1 + (window - 1) / 2
    return None


def window_mean(values: Sequence[float]) -> float:
    """The mean of one window (summed afresh, so that the same window always gives the same value)."""
    return sum(values) / len(values)


def fit_tradeoff(batches: Sequence[float], steps: Sequence[float]) -> Tuple[float, float, float]:
    """Least-squares fit of S = S_min + E_min / B (McCandlish eq. 2.11); returns (S_min, E_min, B_crit =
    E_min / S_min). Needs two batch sizes or more; a fit whose S_min or E_min is not positive (the runs do not
    follow the trade-off) raises ValueError."""
    if len(batches) != len(steps) or len(batches) < 2:
        raise ValueError("need the steps of at least two batch sizes")
    xs = [1.0 / b for b in batches]
    n = len(xs)
    mx, my = sum(xs) / n, sum(steps) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("need at least two different batch sizes")
    e_min = sum((x - mx) * (y - my) for x, y in zip(xs, steps)) / sxx
    s_min = my - e_min * mx
    if not (s_min > 0 and e_min > 0 and math.isfinite(s_min) and math.isfinite(e_min)):
        raise ValueError(f"the steps do not follow S = S_min + E_min / B (fit: S_min {s_min:.3g}, E_min {e_min:.3g})")
    return s_min, e_min, e_min / s_min


def predicted_steps(s_min: float, e_min: float, batches: Sequence[float]) -> List[float]:
    """S(B) = S_min + E_min / B at each batch."""
    return [s_min + e_min / b for b in batches]
