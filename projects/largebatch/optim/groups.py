"""Parameter groups that know which detector part they belong to.

Every group carries ``"module"`` (the detector part, one of ``DETECTOR_PARTS``; AGVM and the monitor
aggregate per part) and ``"adapt"`` (whether layer-wise
optimizers apply their trust ratio), on top of detectron2's weight-decay and bias-LR rules. Parameters
with equal settings share one group, so an R50-FPN has a handful of groups instead of one per tensor.

Plain PyTorch: no detectron2 import here.
"""
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch

#: The detector parts, in the order metrics and plots list them: the one list (config validation, AGVM, the
#: monitor and the plots all take it from here). "other" is whatever no rule matches.
DETECTOR_PARTS: Tuple[str, ...] = ("backbone", "fpn", "rpn", "box_head", "mask_head", "head", "sem_seg_head", "other")

# Parameter-name rules for detectron2's meta-architectures (GeneralizedRCNN, RetinaNet, SemanticSegmentor,
# PanopticFPN; ResNet-FPN and ViTDet backbones),
# tried in order, the first match wins. Names are those of the bare model ("module." of DDP is stripped).
DEFAULT_PARTITION: Tuple[Tuple[str, str], ...] = (
    ("backbone", r"^backbone\.bottom_up\."),  # the ResNet inside an FPN backbone
    ("fpn", r"^backbone\.(fpn_|top_block\.)"),  # lateral/output convs and P6/P7
    ("fpn", r"^backbone\.simfp_"),  # ViTDet's SimpleFeaturePyramid (detectron2 main): its pyramid over the ViT
    ("backbone", r"^backbone\."),  # a backbone without FPN (e.g. C4)
    ("rpn", r"^proposal_generator\."),
    ("box_head", r"^roi_heads\.(box_head|box_predictor|res5)"),  # incl. cascade stages and C4's res5
    ("mask_head", r"^roi_heads\.mask_head\."),
    ("head", r"^head\."),  # RetinaNet / single-stage heads
    ("sem_seg_head", r"^sem_seg_head\."),
)

NORM_TYPES = (
    torch.nn.modules.batchnorm._BatchNorm,  # BatchNorm*d, SyncBatchNorm, detectron2's NaiveSyncBatchNorm
    torch.nn.GroupNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
)


def _is_norm(module: torch.nn.Module) -> bool:
    # detectron2's own LayerNorm / FrozenBatchNorm2d are not torch subclasses: go by the name as well
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith(("Norm", "Norm2d"))


class ModulePartition:
    """Maps a parameter (or module) name to a detector part with ordered regex rules."""

    def __init__(self, extra_rules: Sequence[Sequence[str]] = ()):
        rules = [tuple(r) for r in extra_rules] + list(DEFAULT_PARTITION)
        self.rules = [(part, re.compile(pattern)) for part, pattern in rules]

    def __call__(self, name: str) -> str:
        if name.startswith("module."):
            name = name[len("module.") :]
        for part, pattern in self.rules:
            if pattern.search(name):
                return part
        return "other"


def build_param_groups(
    model: torch.nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: Optional[float] = None,
    weight_decay_bias: Optional[float] = None,
    bias_lr_factor: float = 1.0,
    adapt_norm: bool = False,
    adapt_bias: bool = False,
    partition: Optional[ModulePartition] = None,
) -> List[Dict]:
    """Param groups keyed by (module, lr, weight_decay, adapt), each with the names of its parameters.

    Norm-layer parameters get ``weight_decay_norm`` and ``adapt=adapt_norm``; other biases get
    ``weight_decay_bias``, ``lr * bias_lr_factor`` and ``adapt=adapt_bias`` (detectron2's rules, plus
    adapt). ``None`` for a decay means "as weight_decay". Frozen parameters are left out.
    """
    partition = partition or ModulePartition()
    groups: "OrderedDict[tuple, Dict]" = OrderedDict()
    seen = set()
    for module_name, module in model.named_modules():
        is_norm = _is_norm(module)
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            name = f"{module_name}.{param_name}" if module_name else param_name
            lr, decay, adapt = base_lr, weight_decay, True
            if is_norm:
                decay = weight_decay if weight_decay_norm is None else weight_decay_norm
                adapt = adapt_norm
            elif param_name == "bias":
                decay = weight_decay if weight_decay_bias is None else weight_decay_bias
                lr = base_lr * bias_lr_factor
                adapt = adapt_bias
            part = partition(name)
            key = (part, lr, decay, adapt)
            if key not in groups:
                groups[key] = {
                    "params": [], "param_names": [], "module": part, "lr": lr, "weight_decay": decay,
                    "adapt": adapt,
                }
            groups[key]["params"].append(param)
            groups[key]["param_names"].append(name)
    return list(groups.values())



def split_param_groups_by_part(
    model: torch.nn.Module,
    param_groups: Sequence[Dict],
    adapt_norm: bool = False,
    adapt_bias: bool = False,
    partition: Optional[ModulePartition] = None,
) -> List[Dict]:
    """Param groups made elsewhere (detectron2's ``get_default_optimizer_params``: its LR / weight-decay rules,
    overrides, layer-wise LR decay), each split by detector part and tagged as ``build_param_groups`` tags its own:
    ``"module"``, ``"adapt"`` (``adapt_norm`` for norm-layer parameters, ``adapt_bias`` for other biases, True for
    the rest) and ``"param_names"``; every other key of a group is kept as it is. Parameters of ``model`` only."""
    partition = partition or ModulePartition()
    info = {}  # parameter -> (name, adapt)
    for module_name, module in model.named_modules():
        is_norm = _is_norm(module)
        for param_name, param in module.named_parameters(recurse=False):
            if param not in info:
                name = f"{module_name}.{param_name}" if module_name else param_name
                info[param] = (name, adapt_norm if is_norm else adapt_bias if param_name == "bias" else True)
    out: "OrderedDict[tuple, Dict]" = OrderedDict()
    for index, group in enumerate(param_groups):
        hyper = {k: v for k, v in group.items() if k != "params"}
        for param in group["params"]:
            if param not in info:
                raise ValueError(f"param group {index} holds a parameter that is not the model's")
            name, adapt = info[param]
            part = partition(name)
            key = (index, part, adapt)
            if key not in out:
                out[key] = {**hyper, "params": [], "param_names": [], "module": part, "adapt": adapt}
            out[key]["params"].append(param)
            out[key]["param_names"].append(name)
    return list(out.values())
