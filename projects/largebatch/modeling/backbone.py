"""A narrow ResNet-FPN for CPU-sized experiments (the embedded shapes dataset).

detectron2's ResNet builder fixes the stage depths (18/34/50/...) and, for 18/34, the width (64..512);
a from-scratch demo on 2 CPU cores needs a far smaller network. This builds detectron2's own ResNet,
BasicBlock and FPN with MODEL.RESNETS.SMALL_BLOCKS_PER_STAGE blocks and RES2_OUT_CHANNELS doubling per stage:
``build_small_resnet_fpn_backbone`` as detectron2's ``build_resnet_fpn_backbone`` (P2-P6, the R-CNNs, Semantic and
Panoptic FPN), ``build_small_retinanet_resnet_fpn_backbone`` as its ``build_retinanet_resnet_fpn_backbone`` (P3-P7
from res5, RetinaNet).
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet


def _small_resnet(cfg, input_shape: ShapeSpec) -> ResNet:
    r = cfg.MODEL.RESNETS
    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=r.NORM)
    stages = []
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    for i, num_blocks in enumerate(r.SMALL_BLOCKS_PER_STAGE):
        first_stride = 1 if i == 0 else 2  # res2 keeps the stem's stride 4
        stages.append(ResNet.make_stage(
            BasicBlock, num_blocks, in_channels=in_channels, out_channels=out_channels, norm=r.NORM,
            stride_per_block=[first_stride] + [1] * (num_blocks - 1),
        ))
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


def _fpn(cfg, bottom_up: ResNet, top_block) -> FPN:
    return FPN(
        bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES, out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM, top_block=top_block, fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_small_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    return _fpn(cfg, _small_resnet(cfg, input_shape), LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_small_retinanet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    bottom_up = _small_resnet(cfg, input_shape)
    res5 = bottom_up.output_shape()["res5"].channels
    return _fpn(cfg, bottom_up, LastLevelP6P7(res5, cfg.MODEL.FPN.OUT_CHANNELS))
