"""MegDet (Peng et al., CVPR 2018) on detectron2's LSJ new baseline: batch 512, SGD at the linear scaling rule, a
linear warm-up from the batch-64 LR, cross-GPU BatchNorm with MegDet's BN size 32 (Table 3: "the best BN size ...
is 32"): 64 GPUs x 8 images, SyncBN over groups of 4 GPUs.

LR 0.1 x 512 / 64 = 0.8 (the LSJ file's 0.1 at batch 64, linear rule: largebatch.solver.lr_scaling applies it once
at set-up); warm-up 1 epoch (MegDet gives no length; as configs/COCO-Detection/Base-MegDet.yaml) from 64 / 512 of
the LR, i.e. from the LSJ file's own 0.1; 100 epochs (23047 iterations), LR x0.1 at the LSJ file's fractions.
"""
from .lsj_100ep_base import dataloader, iterations, largebatch, model, optimizer, step_schedule, train  # noqa: F401

batch = 512
dataloader.train.total_batch_size = batch
train.max_iter = iterations(batch)
train.output_dir = "output/lazy/megdet_sgd_LSJ_100ep_b512"
largebatch.solver.lr_scaling.rule = "linear"
largebatch.solver.lr_scaling.reference_batch = 64
largebatch.sync_bn.group_size = 4  # BN size 32
lr_multiplier = step_schedule(batch, warmup_epochs=1, warmup_factor=64 / batch)
