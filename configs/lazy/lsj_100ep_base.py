"""What the LazyConfig recipes next to this file share: detectron2's LSJ new baseline
(new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py: Mask R-CNN R50-FPN from scratch, SyncBN everywhere, large-scale
jitter at 1024 px, AMP, batch 64, 184375 iterations = 100 epochs, LR x0.1 at 163889 and 177546), and the arithmetic
that moves it to another batch at the same 100 epochs (the same images seen, the milestones at the same fractions).

The LSJ file's SyncBN layers become largebatch's SyncBN over groups of GPUs (``largebatch.sync_bn``: all GPUs here,
as torch's SyncBatchNorm in the LSJ file; a recipe may set MegDet's BN size). Its optimizer is SGD, LR 0.1 at batch
64, weight decay 4e-5, over detectron2's get_default_optimizer_params (weight decay 0 for norm layers), which
largebatch splits by detector part. COCO train2017 as registered by detectron2 (``DETECTRON2_DATASETS``); nothing is
downloaded at run time (``train.init_checkpoint`` stays empty: the LSJ baselines train from scratch).
"""
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from largebatch.lazy import largebatch_node

LSJ_BATCH, LSJ_ITERATIONS, LSJ_LR = 64, 184375, 0.1
LSJ_MILESTONES = (163889, 177546)
EPOCH_IMAGES = 118000  # the LSJ file's own count: "100 ep = 184375 iters * 64 images/iter / 118000 images/ep"

_lsj = get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
model, dataloader, train, optimizer = _lsj.model, _lsj.dataloader, _lsj.train, _lsj.optimizer

largebatch = largebatch_node()
largebatch.sync_bn.enabled = True  # over all GPUs, as the LSJ file's SyncBN
largebatch.solver.recipe_ims_per_worker = 8  # 8 images per GPU (the LSJ file's 64 on 8 GPUs)


def iterations(batch: int) -> int:
    """The LSJ baseline's 100 epochs at ``batch``."""
    return round(LSJ_ITERATIONS * LSJ_BATCH / batch)


def step_schedule(batch: int, warmup_epochs: float, warmup_factor: float = 0.001):
    """The LSJ file's step schedule (x0.1 twice) at ``batch``: its milestones at the same fractions of the run,
    after a linear warm-up of ``warmup_epochs`` epochs from ``warmup_factor`` x the LR."""
    total = iterations(batch)
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[1.0, 0.1, 0.01], milestones=[round(m * LSJ_BATCH / batch) for m in LSJ_MILESTONES],
            num_updates=total,
        ),
        warmup_length=warmup_epochs * EPOCH_IMAGES / batch / total,
        warmup_factor=warmup_factor,
    )
