"""detectron2's own LSJ new baseline (new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py: Mask R-CNN R50-FPN, SyncBN
everywhere, from scratch, large-scale jitter) taken to the embedded shapes data and CPU size, trained with LAMB +
AGVM by largebatch: what the LazyConfig recipes next to this file do at COCO scale, here small enough for 2 CPU
workers (the tests train it end to end, resume it and evaluate it).

    python train_net.py --num-gpus 2 --config-file configs/lazy/shapes_mask_rcnn_LSJ_lamb_agvm.py
    python train_net.py --num-gpus 2 --config-file configs/lazy/shapes_mask_rcnn_LSJ_lamb_agvm.py train.max_iter=20

What changes from the LSJ file: the data (shapes_train / shapes_val, 3 classes, 128 px: the jitter's target size and
crop are 128), the anchors (16-256 px for 16-64 px shapes), fewer proposals and RoIs and 64-channel heads (CPU
time), batch 8, no AMP (CPU: float32; detectron2's ``train.amp`` turns on bfloat16 autocast on CPU, which is slow
there), the optimizer (LAMB + AGVM instead of SGD) and the schedule (cosine with a warm-up of 10 iterations). Its
``SyncBN`` layers (torch.nn.SyncBatchNorm, GPU-only) become largebatch's GroupSyncBatchNorm over all workers
(``largebatch.sync_bn``).
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.model_zoo import get_config
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler

from largebatch.lazy import get_part_params, largebatch_node
from largebatch.optim import AGVM, LAMB

_lsj = get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
model, dataloader, train = _lsj.model, _lsj.dataloader, _lsj.train

image_size = 128
model.roi_heads.num_classes = 3
model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
# CPU-sized: fewer proposals and sampled RoIs, narrower heads (the same 4conv1fc box head and 4conv mask head at 64
# channels instead of 256; on 512 RoIs per image they would take most of a CPU step)
model.proposal_generator.pre_nms_topk = (600, 300)
model.proposal_generator.post_nms_topk = (200, 100)
model.roi_heads.batch_size_per_image = 64
model.roi_heads.box_head.conv_dims = [64, 64, 64, 64]
model.roi_heads.box_head.fc_dims = [256]
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=256)
model.roi_heads.box_predictor.test_topk_per_image = 20
model.roi_heads.mask_head.conv_dims = [64, 64, 64, 64, 64]

dataloader.train.dataset.names = "shapes_train"
dataloader.train.mapper.augmentations = [
    L(T.ResizeScale)(min_scale=0.5, max_scale=2.0, target_height=image_size, target_width=image_size),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size)),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 0  # the CPU workers are busy training; 128 px images load fast
dataloader.test.dataset.names = "shapes_val"
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size)]
dataloader.test.num_workers = 0

train.device = "cpu"
train.amp.enabled = False
train.ddp.fp16_compression = False
train.max_iter = 128  # 1 epoch of the 1024 images
train.checkpointer.period = 32
train.eval_period = 0  # at the end
train.output_dir = "output/lazy_shapes_lsj"
train.seed = 1

# LAMB (You et al. 2020) over the detector's parts, wrapped in AGVM (Xue et al. 2022): every layer moves by about
# 0.004 of its weight norm per step at batch 8 (LAMB's LR is that fraction); AGVM from the end of the warm-up
optimizer = L(AGVM)(
    optimizer=L(LAMB)(params=L(get_part_params)(weight_decay_norm=0.0), lr=0.004, weight_decay=1e-4),
    momentum=0.97, interval=10, start_iter=-1,
)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
    warmup_length=10 / train.max_iter,
    warmup_factor=0.1,
)

largebatch = largebatch_node()
largebatch.sync_bn.enabled = True  # GroupSyncBatchNorm over all workers (MegDet's BN size = the batch)
largebatch.monitor.period = 10
