"""LargeDet (Wang et al., ECCV 2020) on detectron2's LSJ new baseline: batch 1024, PMD-LAMB (Algorithm 1: LAMB whose
moments decay periodically, alpha 0.012, T 200, weight decay 5e-4), SyncBN over all GPUs (guideline G2): 128 GPUs x
8 images.

LR: LargeDet's linear scaling of the global LR eta (Sec. 4: "we use the linear scaling rule"; its 0.02 at batch 16
for Faster R-CNN) applied to the LSJ file's 0.1 at batch 64: 0.1 x 1024 / 64 = 1.6, times alpha inside the optimizer
(each layer moves by about 1.9% of its weight norm per step); warm-up 2 epochs from 0.001x (LargeDet gives no length
for this schedule: the AGVM code's 2 epochs); 100 epochs (11523 iterations), LR x0.1 at the LSJ file's fractions.
Norm layers and biases: trust ratio 1 (adapt False), no weight decay on norm layers (as the LSJ file).
"""
from detectron2.config import LazyCall as L

from largebatch.lazy import get_part_params
from largebatch.optim import PMDLAMB

from .lsj_100ep_base import LSJ_LR, dataloader, iterations, largebatch, model, step_schedule, train  # noqa: F401

batch = 1024
dataloader.train.total_batch_size = batch
train.max_iter = iterations(batch)
train.output_dir = "output/lazy/largedet_pmdlamb_LSJ_100ep_b1024"
optimizer = L(PMDLAMB)(params=L(get_part_params)(weight_decay_norm=0.0), lr=LSJ_LR, weight_decay=5e-4,
                       cycle=200, scale=0.012)
largebatch.solver.lr_scaling.rule = "linear"
largebatch.solver.lr_scaling.reference_batch = 64
lr_multiplier = step_schedule(batch, warmup_epochs=2)
