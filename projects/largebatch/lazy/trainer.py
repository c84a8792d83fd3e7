"""``LazyLargeBatchTrainer``: LargeBatchTrainer over a LazyConfig's own model, optimizer, data and schedule.

Everything else is LargeBatchTrainer's, read from the run config (``load_lazy_config``): the stepper (accumulation,
AMP, the explosion guard, the gradient measurement for AGVM and the monitor), SyncBN groups, the monitor, atomic
checkpoints with the data position and every worker's random state (exact resume), preemption, evaluation with
the main process's BN statistics.
"""
import copy
import logging

import torch
from detectron2.config import instantiate
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.solver import LRMultiplier
from detectron2.utils import comm
from omegaconf import OmegaConf

from ..collect_env import detectron2_compiled_ops
from ..data.resumable import ResumableTrainLoader
from ..engine.trainer import LargeBatchTrainer, apply_sync_bn, broadcast_main_buffers
from ..optim.build import describe_param_groups
from .config import _AGVM, _target, base_optimizer_node

__all__ = ["LazyLargeBatchTrainer", "build_lazy_model", "build_lazy_optimizer", "lazy_test"]

logger = logging.getLogger("largebatch")

_DETECTRON2_PARAMS = "detectron2.solver.build.get_default_optimizer_params"


def build_lazy_model(lazy, cfg, for_training: bool = True) -> torch.nn.Module:
    """``instantiate(lazy.model)`` on the run's device, with largebatch.sync_bn applied (``for_training=False``: for
    evaluation, on any number of workers)."""
    model = instantiate(lazy.model)
    model.to(torch.device(cfg.MODEL.DEVICE))
    return apply_sync_bn(cfg, model, for_training)


def build_lazy_optimizer(lazy, cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``instantiate(lazy.optimizer)`` over ``model``'s parameters, as detectron2's lazyconfig_train_net.py does
    (the params node's ``model`` set first). detectron2's ``get_default_optimizer_params`` is replaced by
    ``largebatch.lazy.get_part_params`` (the same arguments, its groups split by detector part), so any detectron2
    optimizer config works with AGVM and the monitor; an AGVM node whose ``start_iter`` is -1 starts at the end of
    the warm-up."""
    node = copy.deepcopy(lazy.optimizer)
    base = base_optimizer_node(node)
    params = base.get("params")
    if params is not None and OmegaConf.is_config(params) and "_target_" in params:
        if _target(params) == _DETECTRON2_PARAMS:
            from .params import get_part_params

            params._target_ = get_part_params
            logger.info("optimizer.params: detectron2's get_default_optimizer_params -> largebatch.lazy."
                        "get_part_params (the same groups, split by detector part)")
        params.model = model
    outer = node
    while _target(outer) == _AGVM:
        if outer.get("start_iter", 0) < 0:
            outer.start_iter = cfg.SOLVER.WARMUP_ITERS
        outer = outer.optimizer
    optimizer = instantiate(node)
    groups = optimizer.param_groups
    if any("module" not in g for g in groups):
        raise ValueError("optimizer.params: the param groups carry no detector part ('module'): build them with "
                         "largebatch.lazy.get_part_params (or detectron2's get_default_optimizer_params, which it "
                         "replaces)")
    logger.info(describe_param_groups(optimizer))
    return optimizer


def lazy_test(lazy, model):
    """detectron2's evaluation of a LazyConfig (``dataloader.test`` with ``dataloader.evaluator``), with the main
    process's BN statistics on every worker (what the checkpoint holds, see LargeBatchTrainer.test); {} when the
    config has no test loader. A COCOEvaluator that does not say otherwise uses the fast evaluation only where
    detectron2's compiled ops are installed (as LargeBatchTrainer.build_evaluator)."""
    if "test" not in lazy.dataloader or "evaluator" not in lazy.dataloader:
        return {}
    broadcast_main_buffers(model)
    evaluator = copy.deepcopy(lazy.dataloader.evaluator)
    if _target(evaluator).endswith("COCOEvaluator") and evaluator.get("use_fast_impl") is None:
        # detectron2's fast COCO evaluation is a compiled op; without it (Python-only detectron2) pycocotools'
        evaluator.use_fast_impl = detectron2_compiled_ops()
    results = inference_on_dataset(model, instantiate(lazy.dataloader.test), instantiate(evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


class LazyLargeBatchTrainer(LargeBatchTrainer):
    """LargeBatchTrainer whose model, optimizer, training data, LR schedule and evaluation come from a LazyConfig
    (``lazy``), the rest from its run config (``cfg``, from ``load_lazy_config``)."""

    def __init__(self, lazy, cfg):
        self.lazy = lazy
        super().__init__(cfg)

    def build_model(self, cfg, for_training=True):
        return build_lazy_model(self.lazy, cfg, for_training)

    def build_optimizer(self, cfg, model):
        return build_lazy_optimizer(self.lazy, cfg, model)

    def build_train_loader(self, cfg):
        """The LazyConfig's ``dataloader.train`` (build_detection_train_loader's arguments, each instantiated), made
        resumable as for a YAML config."""
        node = self.lazy.dataloader.train
        args = {k: instantiate(v) if OmegaConf.is_config(v) else v for k, v in node.items() if k != "_target_"}
        return ResumableTrainLoader.from_arguments(args, cfg.SEED if cfg.SEED >= 0 else None)

    def build_lr_scheduler(self, cfg, optimizer):
        """detectron2's LRMultiplier over the LazyConfig's ``lr_multiplier`` (an fvcore ParamScheduler node:
        detectron2's WarmupParamScheduler over MultiStep / Cosine, or largebatch.schedule's GammaSteps /
        CosineRestarts / Poly); none: a constant LR."""
        from fvcore.common.param_scheduler import ConstantParamScheduler

        node = self.lazy.get("lr_multiplier")
        multiplier = instantiate(node) if node is not None else ConstantParamScheduler(1.0)
        return LRMultiplier(optimizer, multiplier=multiplier, max_iter=cfg.SOLVER.MAX_ITER)

    def test(self, cfg, model, evaluators=None):
        return lazy_test(self.lazy, model)
