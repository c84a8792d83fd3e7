"""AGVM (Xue et al., NeurIPS 2022) on detectron2's LSJ new baseline: batch 1024, SGD wrapped in AGVM (per-part LR
from the gradient variance, eq. 3-5: the backbone as anchor, alpha 0.97, tau 10), SyncBN over all GPUs: 128 GPUs x 8.

LR: AGVM's rule ("linear learning rate scaling when batch size is less than 128 [...] greater than 128, the square
root", Sec. 4) from the LSJ file's 0.1 at batch 64: 0.1 x 128 / 64 x sqrt(1024 / 128) = 0.566; warm-up 2 epochs
from 0.001x (the official AGVM code's 2 epochs); AGVM from the end of the warm-up; 100 epochs (11523 iterations),
LR x0.1 at the LSJ file's fractions; the LSJ file's weight decay 4e-5 and momentum 0.9.
"""
from detectron2.config import LazyCall as L

from largebatch.optim import AGVM

from .lsj_100ep_base import dataloader, iterations, largebatch, model, optimizer, step_schedule, train  # noqa: F401

batch = 1024
dataloader.train.total_batch_size = batch
train.max_iter = iterations(batch)
train.output_dir = "output/lazy/agvm_sgd_LSJ_100ep_b1024"
optimizer = L(AGVM)(optimizer=optimizer, momentum=0.97, interval=10, start_iter=-1)  # -1: the end of the warm-up
largebatch.solver.lr_scaling.rule = "linear_then_sqrt"
largebatch.solver.lr_scaling.reference_batch = 64
largebatch.solver.lr_scaling.sqrt_above = 128
lr_multiplier = step_schedule(batch, warmup_epochs=2)
