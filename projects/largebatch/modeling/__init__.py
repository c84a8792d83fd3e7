from .backbone import build_small_resnet_fpn_backbone

__all__ = ["build_small_resnet_fpn_backbone"]
