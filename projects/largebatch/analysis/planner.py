"""The batch planner: from a short run's gradient noise scale and step time, what adding GPUs buys.

A model, not a measurement (McCandlish et al. 2018, eq. 2.11 and 2.12). With B_noise the run's gradient noise scale
(``noise_scale/all``, images), training to the same loss takes

    S(B) = S_min (1 + B_noise / B) steps  and  E(B) = E_min (1 + B / B_noise) images,

so up to about B_noise a larger batch cuts the steps nearly in proportion, and beyond it mostly costs images. The
time of a step on G GPUs with b images each is taken as the measured step time at b images per worker (the work
per GPU does not change) plus a communication term that grows with the GPUs (``comm_ms`` x log2(G), a ring
all-reduce's latency term; 0 for one GPU) — an adjustable assumption, stated in the table. Assumed as well: the
noise scale measured now holds for the rest of training (it grows as the loss falls, McCandlish Fig. 4: the
prediction is conservative), the learning rate is retuned for each batch (the model compares each batch at its
best LR), and the data loader keeps up.
"""
import math
from dataclasses import dataclass
from typing import List, Sequence

__all__ = ["BatchPlan", "plan_batches"]


@dataclass(frozen=True)
class BatchPlan:
    gpus: int
    batch: int
    steps_per_min: float  # S / S_min
    images_per_min: float  # E / E_min
    step_time_s: float
    speedup: float  # wall-clock to the same loss, against the first row


def plan_batches(noise_scale: float, step_time_s: float, images_per_gpu: int, gpus: Sequence[int],
                 comm_ms: float = 0.0) -> List[BatchPlan]:
    """One row per GPU count: the batch, the steps and images to the same loss relative to their minima, the
    step time, and the wall-clock speed-up against the first GPU count of ``gpus``."""
    if not noise_scale > 0 or not step_time_s > 0 or images_per_gpu < 1 or not gpus:
        raise ValueError("need a noise scale > 0, a step time > 0, images per GPU >= 1 and GPU counts")
    rows = []
    for g in gpus:
        batch = g * images_per_gpu
        steps = 1 + noise_scale / batch
        step_time = step_time_s + comm_ms / 1000 * (math.log2(g) if g > 1 else 0.0)
        rows.append((g, batch, steps, 1 + batch / noise_scale, step_time))
    base = rows[0][2] * rows[0][4]
    return [BatchPlan(g, b, s, e, t, base / (s * t)) for g, b, s, e, t in rows]
