"""Large-batch optimizers: plain ``torch.optim.Optimizer`` subclasses, usable without detectron2."""
from .agvm import AGVM
from .build import OPTIMIZERS, build_optimizer
from .compile import compile_step
from .groups import ModulePartition, build_param_groups
from .lamb import LAMB, PMDLAMB
from .lars import LARS

__all__ = [
    "LARS", "LAMB", "PMDLAMB", "AGVM", "build_optimizer", "build_param_groups", "ModulePartition", "OPTIMIZERS",
    "compile_step",
]
