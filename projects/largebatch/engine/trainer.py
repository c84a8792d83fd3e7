"""``LargeBatchTrainer``: detectron2's DefaultTrainer with large-batch optimizers, schedules and SyncBN.

Built once from the config: ``prepare_solver`` resolves the solver keys for the world size, the model gets
SyncBN (``norm.py``), the optimizer is ``build_optimizer``'s (``optim/``), the inner loop is
``LargeBatchStepper`` (``stepper.py``), checkpoints are atomic (``checkpoint.py``) and the monitor hook
(``monitor.py``) is added to detectron2's hooks.
"""
import importlib.util
import inspect
import logging
import multiprocessing
import os
import weakref

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, TrainerBase, hooks
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators, SemSegEvaluator
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ..collect_env import detectron2_compiled_ops
from ..data.catalog import train_set_size
from ..data.resumable import ResumableTrainLoader
from ..noise_scale import critical_batch_statement
from ..norm import build_sync_bn_from_cfg
from ..optim import build_optimizer
from ..optim.groups import ModulePartition
from ..schedule import build_lr_scheduler
from ..solver import describe_batch, describe_step_size, prepare_solver
from .checkpoint import AtomicCheckpointer, PeriodicCheckpointer, set_rng_state, set_training_attributes
from .divergence import ExplosionGuard
from .monitor import MonitorHook
from .preemption import PreemptionHook
from .stepper import LargeBatchStepper

__all__ = ["LargeBatchTrainer", "LargeBatchStepper"]

logger = logging.getLogger("largebatch")


def apply_sync_bn(cfg, model, for_training=True):
    """MODEL.SYNC_BN on a built model, over the parts MODEL.SYNC_BN.PARTS names (all when empty);
    ``for_training=False`` for evaluation, on any number of workers (see ``build_sync_bn_from_cfg``)."""
    partition = ModulePartition(cfg.MODEL.MODULE_PARTITION)
    parts = set(cfg.MODEL.SYNC_BN.PARTS)
    include = (lambda name: partition(name + ".weight") in parts) if parts else None
    return build_sync_bn_from_cfg(cfg, model, include=include, for_training=for_training)


def broadcast_main_buffers(model):
    """Every worker takes the main process's buffers (BN statistics) before an evaluation: they are what the
    checkpoint holds (DDP does not broadcast buffers, and plain or group-synced BN differs between workers)."""
    if comm.get_world_size() > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


class PanopticEvaluator(COCOPanopticEvaluator):
    """detectron2's COCOPanopticEvaluator, whose PQ computation (panopticapi's pq_compute, a multiprocessing.Pool of
    one worker per core) starts its workers with "spawn" instead of Linux's default "fork": a fork of this process,
    which runs torch's and the data loaders' threads, can leave a child waiting forever on a lock one of them held
    (seen: a test hung in pq_compute). Only the main process computes PQ; nothing else starts processes then."""

    def evaluate(self):
        previous = multiprocessing.get_start_method(allow_none=True)
        multiprocessing.set_start_method("spawn", force=True)
        try:
            return super().evaluate()
        finally:
            multiprocessing.set_start_method(previous, force=True)


class LargeBatchTrainer(DefaultTrainer):
    """DefaultTrainer with the optimizers, schedules, SyncBN and monitoring of the four large-batch papers.

    The config is completed once at construction (``prepare_solver``: LR scaling rule, epoch units,
    schedule multiplier, REFERENCE_WORLD_SIZE) and the result is ``self.cfg``.
    """

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        # the training set is only counted for epoch units (for COCO, reading its json takes a while)
        images = train_set_size(cfg) if cfg.SOLVER.SCHEDULE_UNIT == "epoch" else None
        cfg = prepare_solver(cfg, comm.get_world_size(), images)
        batch, too_many = describe_batch(cfg, comm.get_world_size())
        step, too_large = describe_step_size(cfg)
        for line, log in ((batch, logger.info), (too_many, logger.warning), (step, logger.info),
                          (too_large, logger.warning)):
            if line:
                log(line)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        self.train_loader = data_loader
        model = self.wrap_model(cfg, model)
        monitor = cfg.MONITOR
        self._trainer = LargeBatchStepper(
            model, data_loader, optimizer,
            accumulate_steps=cfg.SOLVER.ACCUMULATE_STEPS,
            variance_period=monitor.PERIOD if monitor.ENABLED and monitor.GRAD_VARIANCE else 0,
            amp=cfg.SOLVER.AMP.ENABLED,
            device_type="cuda" if cfg.MODEL.DEVICE.startswith("cuda") else "cpu",
            explosion_guard=ExplosionGuard(monitor.EXPLOSION_FACTOR, monitor.EXPLOSION_WINDOW),
            noise_decay=monitor.NOISE_SCALE_DECAY if monitor.NOISE_SCALE else None,
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # a checkpoint written while the explosion guard sees trouble is not what --resume should pick
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trouble=self._trainer.explosion_guard.trouble,
                                               trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @property
    def stepper(self) -> LargeBatchStepper:
        """The inner loop (detectron2 keeps it as ``_trainer``): its ``measurement``, ``layout`` and ``optimizer``
        are what the hooks read."""
        return self._trainer

    @classmethod
    def build_model(cls, cfg, for_training=True):
        """detectron2's model with MODEL.SYNC_BN applied; ``for_training=False`` for evaluation, which works on
        any number of workers (see ``build_sync_bn_from_cfg``)."""
        return apply_sync_bn(cfg, super().build_model(cfg), for_training)

    @staticmethod
    def wrap_model(cfg, model):
        """DDP over all workers. On CUDA the worker's own GPU, the one the launcher made current (not the local
        rank: with one visible GPU per task, that GPU is device 0); on CPU no device_ids (detectron2 0.6
        passes them, which DDP rejects for a CPU module)."""
        if comm.get_world_size() == 1:
            return model
        device_ids = [torch.cuda.current_device()] if cfg.MODEL.DEVICE.startswith("cuda") else None
        # no buffer broadcast in forward: BN statistics are per worker (or per SyncBN group) by design
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:  # torch >= 2.14
            return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    @classmethod
    def build_optimizer(cls, cfg, model):
        # gradient clipping wraps the optimizer that steps, inside AGVM, so it sees unscaled gradients
        return build_optimizer(cfg, model, wrap=lambda opt: maybe_add_gradient_clipping(cfg, opt))

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate with the main process's BN statistics on every worker: they are what the checkpoint
        holds (DDP does not broadcast buffers, and plain or group-synced BN differs between workers), so
        --eval-only of a checkpoint reproduces the AP reported during training."""
        broadcast_main_buffers(model)
        return super().test(cfg, model, evaluators)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """detectron2's evaluators for the dataset's task (its ``evaluator_type``, as detectron2's tools/train_net.py
        picks them): COCO box / mask AP; mIoU (SemSegEvaluator) for semantic segmentation; for panoptic
        segmentation PQ (COCOPanopticEvaluator, where ``panopticapi`` is installed), the things' box / mask AP and
        the stuff's mIoU."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        kind = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
        evaluators = []
        if kind in ("sem_seg", "coco_panoptic_seg"):
            evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
        if kind in ("coco", "coco_panoptic_seg"):
            evaluators.append(COCOEvaluator(dataset_name, output_dir=output_folder,
                                            use_fast_impl=detectron2_compiled_ops()))
        if kind == "coco_panoptic_seg":
            if importlib.util.find_spec("panopticapi") is None:
                logger.warning("%s: no PQ (COCOPanopticEvaluator needs panopticapi: pip install --no-deps "
                               "panopticapi-lite==0.2.0, as tools/setup_env.sh does); evaluated with box / mask AP "
                               "and the stuff's mIoU only", dataset_name)
            else:
                evaluators.append(PanopticEvaluator(dataset_name, output_folder))
        if not evaluators:
            raise NotImplementedError(f"{dataset_name}: no evaluator for its evaluator_type {kind!r} (largebatch "
                                      "evaluates coco, sem_seg and coco_panoptic_seg datasets)")
        return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)

    def build_hooks(self):
        ret = super().build_hooks()
        period = self.cfg.SOLVER.CHECKPOINT_PERIOD
        # detectron2's checkpointing hook -> ours: the last SOLVER.CHECKPOINTS_TO_KEEP kept (0: all), none written
        # while the explosion guard sees trouble; only the main process deletes
        ret = [PeriodicCheckpointer(self.checkpointer, period, max_to_keep=self.cfg.SOLVER.CHECKPOINTS_TO_KEEP or None)
               if isinstance(h, hooks.PeriodicCheckpointer) else h for h in ret]
        if not comm.is_main_process():
            # detectron2 checkpoints on the main process only; a checkpoint here gathers every worker's
            # random-generator states, so every worker runs the hook (the others write nothing), where the
            # main process runs it: before the evaluation
            evals = [i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)]
            ret.insert(evals[0] if evals else len(ret), PeriodicCheckpointer(self.checkpointer, period))
        ret.append(PreemptionHook())  # last: SIGTERM / SIGUSR1 -> checkpoint and exit, after the others' after_step
        if self.cfg.MONITOR.ENABLED:
            # right after the timer: sees the LR the step used (before LRScheduler moves it on) and checks
            # for jumps before PeriodicCheckpointer could save a diverged model
            ret.insert(1, MonitorHook(self.cfg))
        return ret

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's training loader, made resumable: a resumed run continues its data stream exactly."""
        return ResumableTrainLoader(cfg)

    def train(self):
        result = super().train()
        noise = self.stepper.noise_scale
        statement = noise and critical_batch_statement(noise, self.cfg.SOLVER.IMS_PER_BATCH *
                                                       self.cfg.SOLVER.ACCUMULATE_STEPS)
        if statement and comm.is_main_process():
            logger.info(statement)
        return result

    def resume_or_load(self, resume=True):
        """detectron2's resume_or_load, and, when it resumes from a checkpoint, the data stream placed after the
        batches already consumed and each worker's random generators and model attributes (RetinaNet's loss
        normaliser) as they were when the checkpoint was written: the resumed run computes what the uninterrupted
        one would have."""
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.stepper.optimizer.param_groups]
        checkpoint = self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if not (resume and self.checkpointer.has_checkpoint()):
            return
        self._apply_configured_hyperparameters(configured)
        self.start_iter = checkpoint.get("iteration", -1) + 1
        if isinstance(self.train_loader, ResumableTrainLoader):
            self.train_loader.skip_to(self.start_iter * self.cfg.SOLVER.ACCUMULATE_STEPS)
        states = checkpoint.get("rng_states")
        attributes = checkpoint.get("model_attributes")
        if attributes is not None and len(attributes) == comm.get_world_size():
            set_training_attributes(self.stepper.model, attributes[comm.get_rank()])
        if states is not None and len(states) == comm.get_world_size():
            set_rng_state(states[comm.get_rank()])
        else:
            logger.warning("The checkpoint holds no random-generator states for %d workers: the resumed run draws "
                           "other random numbers than the interrupted one would have", comm.get_world_size())

    def _apply_configured_hyperparameters(self, configured):
        """A resumed optimizer takes its param groups' hyper-parameters from the checkpoint; the config's win here
        (a lowered SOLVER.BASE_LR to recover from a divergence, another WEIGHT_DECAY, ...), said in one log line.
        The LR follows the config's base LR from the iteration reached on (the scheduler's base LRs too);
        counters (a group's ``step``) stay the checkpoint's."""
        changes = {}
        for index, (group, wanted) in enumerate(zip(self.stepper.optimizer.param_groups, configured)):
            for key, value in wanted.items():
                have = group.get(key)
                same = (tuple(have) == tuple(value)) if isinstance(value, (list, tuple)) else have == value
                if key in ("lr", "step") or key not in group or same:
                    continue
                changes.setdefault((key, str(have), str(value)), []).append(index)
                if key == "initial_lr":  # the scheduler's base LR: the current LR moves by the same factor
                    group["lr"] = group["lr"] * value / have if have else value
                    self.scheduler.base_lrs[index] = value
                group[key] = value
        if changes:
            logger.warning("Resuming with the config's values where they differ from the checkpoint's: %s", "; ".join(
                f"{key} {old} -> {new} (param groups {', '.join(map(str, groups))})"
                for (key, old, new), groups in changes.items()))

    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()  # detectron2 0.6 leaves out the optimizer
        if isinstance(self.train_loader, ResumableTrainLoader):
            ret["train_loader"] = self.train_loader.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        if "train_loader" in state_dict and isinstance(self.train_loader, ResumableTrainLoader):
            self.train_loader.load_state_dict(state_dict["train_loader"])
