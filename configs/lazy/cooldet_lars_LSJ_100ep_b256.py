"""CoolDet (Syamsudin & Kistijantoro) on detectron2's LSJ new baseline: batch 256, LARS (eq. 1-2) with CoolDet's
trust coefficient eta 1 and LR 0.0008 (its best, Table 2), a linear warm-up of 1 epoch from 0.001x, then cosine
annealing to 0 (eq. 3), SyncBN over all GPUs (Table 5): 32 GPUs x 8 images.

CoolDet keeps its LR from batch 64 to 128 (no scaling rule); batch 256 is beyond its tables (an extrapolation,
stated); 100 epochs (46094 iterations); momentum 0.9, weight decay 1e-4 (CoolDet's); trust ratio 1 for norm layers
and biases (adapt False).
"""
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler

from largebatch.lazy import get_part_params
from largebatch.optim import LARS

from .lsj_100ep_base import EPOCH_IMAGES, dataloader, iterations, largebatch, model, train  # noqa: F401

batch = 256
dataloader.train.total_batch_size = batch
train.max_iter = iterations(batch)
train.output_dir = "output/lazy/cooldet_lars_LSJ_100ep_b256"
optimizer = L(LARS)(params=L(get_part_params)(weight_decay_norm=0.0), lr=0.0008, momentum=0.9, weight_decay=1e-4,
                    trust_coefficient=1.0)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
    warmup_length=EPOCH_IMAGES / batch / train.max_iter,
    warmup_factor=0.001,
)
