"""ViTDet (Li et al., ECCV 2022: Mask R-CNN with a plain ViT-B backbone and its SimpleFeaturePyramid, detectron2
main's model zoo ``common/models/mask_rcnn_vitdet.py``) at batch 1024 with AdamW wrapped in AGVM (Xue et al.,
NeurIPS 2022: AGVM works with AdamW, its Table 3) and ViTDet's layer-wise LR decay: 128 GPUs x 8 images.
detectron2 main only: v0.6 has neither ViT / SimpleFeaturePyramid nor get_default_optimizer_params' lr_factor_func.

ViTDet's own recipe (detectron2 main's projects/ViTDet, ViT-B, 100 epochs): LSJ at 1024 px, batch 64, AdamW LR 1e-4,
betas (0.9, 0.999), weight decay 0.1 (none on the position embedding), layer-wise decay 0.7 over the 12 blocks,
MAE-pretrained weights (set ``train.init_checkpoint``: nothing is downloaded at run time), LR x0.1 at 163889 and
177546 of 184375 iterations, warm-up 250 iterations from 0.001x. Here: the same at batch 1024, 100 epochs (11523
iterations, the steps at the same fractions); LR by AGVM's rule ("linear learning rate scaling when batch size is
less than 128 [...] greater than 128, the square root", Sec. 4) from 1e-4 at 64: 1e-4 x 128 / 64 x sqrt(1024 / 128)
= 5.66e-4; warm-up 2 epochs (the official AGVM code's); AGVM's parts backbone (the ViT, the anchor) / fpn (the
SimpleFeaturePyramid) / rpn / box_head / mask_head, alpha 0.97, tau 10, from the end of the warm-up. The data and
the layer norms as ViTDet's: RGB input, LayerNorm heads (no BatchNorm: no SyncBN to set).
"""
from functools import partial

import torch
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T
from detectron2.model_zoo import get_config

from largebatch.lazy import get_part_params
from largebatch.optim import AGVM

from .lsj_100ep_base import dataloader, iterations, largebatch, step_schedule, train  # noqa: F401

try:
    from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
except ImportError:
    raise ImportError("this recipe needs detectron2 main (ViT, SimpleFeaturePyramid, layer-wise LR decay); this "
                      "detectron2 (v0.6) has none of them") from None

model = get_config("common/models/mask_rcnn_vitdet.py").model

batch = 1024
dataloader.train.total_batch_size = batch
dataloader.train.mapper.image_format = "RGB"  # ViTDet's input (its pixel mean / std are RGB); the test mapper follows
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=1024, max_size=1024)]
train.max_iter = iterations(batch)
train.output_dir = "output/lazy/agvm_adamw_vitdet_b_100ep_b1024"
largebatch.sync_bn.enabled = False  # LayerNorm everywhere
largebatch.solver.lr_scaling.rule = "linear_then_sqrt"
largebatch.solver.lr_scaling.reference_batch = 64
largebatch.solver.lr_scaling.sqrt_above = 128

optimizer = L(AGVM)(
    optimizer=L(torch.optim.AdamW)(
        params=L(get_part_params)(
            base_lr="${..lr}",  # the layer-wise decay multiplies it
            weight_decay_norm=0.0,
            lr_factor_func=partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7),
            overrides={"pos_embed": {"weight_decay": 0.0}},
        ),
        lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1,
    ),
    momentum=0.97, interval=10, start_iter=-1,  # -1: the end of the warm-up
)
lr_multiplier = step_schedule(batch, warmup_epochs=2)
