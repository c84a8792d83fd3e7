"""``AtomicCheckpointer``: detectron2's checkpointer whose files never exist half-written, and that holds every
worker's random-generator states, so that ``--resume`` continues a run exactly; ``PeriodicCheckpointer``:
detectron2's hook, which keeps the last ``max_to_keep`` checkpoints and writes none while the run is in trouble;
``check_weights_fit``: MODEL.WEIGHTS of another architecture refused before training."""
import logging
import os
import random
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import hooks
from detectron2.utils import comm

from ..config import ConfigError, describe_error
from ..files import atomic_write
from ..optim.groups import ModulePartition

__all__ = ["AtomicCheckpointer", "PeriodicCheckpointer", "check_weights_fit", "load_weights", "rng_state",
           "set_rng_state", "set_training_attributes", "training_attributes"]
logger = logging.getLogger("largebatch")


def rng_state() -> dict:
    """This process's random generators: python, numpy, torch (CPU) and the current CUDA device's, if in use. Only
    tensors, numbers, strings and tuples, so that ``torch.load(weights_only=True)`` reads a checkpoint holding it."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)),
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


#: attributes of a model, outside its state_dict, that training changes: detectron2's dense detectors (RetinaNet,
#: FCOS) normalise their losses by a moving average of the foreground count, a plain float per worker
TRAINING_ATTRIBUTES = ("loss_normalizer",)


def training_attributes(model) -> dict:
    """The ``TRAINING_ATTRIBUTES`` the (DDP-unwrapped) model has now: a resumed run continues them, as the random
    generators (RetinaNet starts its normaliser at 100 when the attribute is missing: the losses of a resumed run
    would be scaled otherwise)."""
    model = getattr(model, "module", model)
    return {name: float(getattr(model, name)) for name in TRAINING_ATTRIBUTES if hasattr(model, name)}


def set_training_attributes(model, attributes: dict) -> None:
    """Restore what ``training_attributes`` returned."""
    model = getattr(model, "module", model)
    for name, value in attributes.items():
        setattr(model, name, value)


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


class AtomicCheckpointer(DetectionCheckpointer):
    """A DetectionCheckpointer whose files are written under a temporary name and then renamed, so a crash or a
    stop never leaves a truncated checkpoint (or a `last_checkpoint` naming one).

    The checkpoint also holds ``rng_states``: the random-generator states of every worker (rank order) at the
    moment it is written, and ``model_attributes``: each worker's ``training_attributes``, gathered from all
    workers. ``save`` is therefore collective when training is
    distributed: every worker calls it (LargeBatchTrainer runs its checkpointing hook on every worker; only the
    main process writes).

    ``trouble``: called before a checkpoint is tagged as ``last_checkpoint``; when it returns a reason (the explosion
    guard's ``trouble``: the loss or gradient norm is rising towards the guard's limit), the checkpoint is written
    but not tagged, so that ``--resume`` picks the last one written before the trouble."""

    def __init__(self, model, save_dir="", trouble: Optional[Callable[[], Optional[str]]] = None, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.trouble = trouble or (lambda: None)
        if self.save_to_disk and save_dir and os.path.isdir(save_dir):
            self._remove_interrupted_writes()

    def _remove_interrupted_writes(self) -> None:
        """Temporary files of writes that a kill interrupted (atomic_write's ``.<name>.<random>.tmp`` beside a
        checkpoint or last_checkpoint): removed when a run on this folder starts, before it writes anything."""
        for name in os.listdir(self.save_dir):
            if name.startswith((".model_", ".last_checkpoint.")) and name.endswith(".tmp"):
                path = os.path.join(self.save_dir, name)
                self.logger.info(f"Removing {path}: an interrupted checkpoint write")
                os.remove(path)

    def save(self, name: str, **kwargs) -> None:
        mine = (rng_state(), training_attributes(self.model))
        states = [None] * comm.get_world_size()
        if comm.get_world_size() > 1:
            dist.all_gather_object(states, mine)
        else:
            states = [mine]
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        data["rng_states"] = [rng for rng, _ in states]
        data["model_attributes"] = [attributes for _, attributes in states]
        basename = f"{name}.pth"
        self.logger.info(f"Saving checkpoint to {os.path.join(self.save_dir, basename)}")
        atomic_write(os.path.join(self.save_dir, basename), lambda f: torch.save(data, f), "wb")
        trouble = self.trouble()
        if trouble is None:
            self.tag_last_checkpoint(basename)
        else:
            last = os.path.basename(self.get_checkpoint_file()) if self.has_checkpoint() else None
            self.logger.warning(f"{basename} is not tagged as last_checkpoint: {trouble}; --resume keeps {last}")

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write(os.path.join(self.save_dir, "last_checkpoint"), lambda f: f.write(last_filename_basename), "w")


class PeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """detectron2's PeriodicCheckpointer hook, which writes no periodic checkpoint while the checkpointer's
    ``trouble`` says the run is in trouble (the final one is written anyway, untagged then).

    Keeping them out also keeps detectron2's rotation right: with ``max_to_keep``, it learns the file it just wrote
    from ``last_checkpoint``, and deletes the oldest beyond that number. It only ever deletes checkpoints this run
    wrote, never ``model_final``, and never the one ``last_checkpoint`` names (always the newest it wrote)."""

    def after_step(self):
        trouble = self.checkpointer.trouble()
        if trouble is None:
            super().after_step()
            return
        iteration = self.trainer.iter
        if iteration >= self.trainer.max_iter - 1:
            self.checkpointer.save(f"{self.file_prefix}_final", iteration=iteration)
        elif (iteration + 1) % self.period == 0:
            logger.warning("No checkpoint after iteration %d: %s", iteration, trouble)


#: detectron2's layers whose shapes follow the number of classes (or keypoints): the ones fine-tuning replaces
CLASS_COUNT_LAYERS = ("roi_heads.box_predictor.", "roi_heads.mask_head.predictor.",
                      "roi_heads.keypoint_head.score_lowres.", "sem_seg_head.predictor.", "head.cls_score.")


class _WeightsLoader(DetectionCheckpointer):
    """detectron2's checkpointer, loading through its public ``load`` (the same file formats and name matching as
    MODEL.WEIGHTS in training, on detectron2 0.6 and main alike), which keeps what the load did not match:
    ``_load_model`` is the hook fvcore's Checkpointer gives subclasses for loading the model, and it returns
    the incompatible keys that ``load`` only logs."""

    incompatible = None

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def load_weights(model, path: str):
    """Load the checkpoint at ``path`` into ``model`` as detectron2 loads MODEL.WEIGHTS (.pth, .pkl, .pyth) and
    return what did not fit (fvcore's ``_IncompatibleKeys``: missing, unexpected, incorrect shapes). Raises what
    detectron2's loader raises for a file it cannot read."""
    loader = _WeightsLoader(model)
    loader.load(path, checkpointables=[])
    return loader.incompatible


def check_weights_fit(model, path: str, partition: ModulePartition, whole: bool = False, key: str = "MODEL.WEIGHTS"):
    """Load the checkpoint at ``path`` into ``model`` the way detectron2 does (``load_weights``: its name matching
    for .pkl files included), and refuse weights of another architecture with a ConfigError (one line) where
    detectron2 would only warn:

    - a file detectron2 cannot read (truncated, not a checkpoint);
    - a tensor whose shape differs from the model's, except in the class-count layers (``CLASS_COUNT_LAYERS``):
      fine-tuning to another number of classes, where detectron2 leaves them to their initialisation on purpose;
    - a backbone the file holds none of (almost nothing in common), or only part of (another depth or variant).

    Accepted, with the returned note saying why: the whole model; the backbone alone (an ImageNet checkpoint: FPN,
    RPN and heads start from their initialisation); other class-count layers. Only parameters count as missing:
    ImageNet .pkl files hold no BatchNorm statistics. ``whole`` (--eval-only, --resume): every tensor must load.
    Weights with NaN / inf (a diverged run's checkpoint) are refused too.
    ``key`` names the file's origin in the message."""
    def refuse(why):
        raise ConfigError(f"{key} = {path!r} is not allowed: {why}")

    try:
        incompatible = load_weights(model, path)
    except Exception as e:  # noqa: BLE001 - whatever the loader raises, the user gets one line
        refuse(f"it cannot be read as a checkpoint ({describe_error(e)})")
    params = dict(model.named_parameters())
    shapes = [(k, tuple(a), tuple(b)) for k, a, b in incompatible.incorrect_shapes]
    missing = [k for k in incompatible.missing_keys if k in params] + [k for k, _, _ in shapes if k in params]
    backbone = [k for k in params if partition(k) == "backbone"]
    lacking = [k for k in backbone if k in missing]
    foreign = [s for s in shapes if not s[0].startswith(CLASS_COUNT_LAYERS)]
    if foreign:
        k, theirs, ours = foreign[0]
        refuse(f"{len(foreign)} of its tensors have other shapes than this model's (first: {k} {theirs} in the file, "
               f"{ours} in the model): weights of another architecture")
    if len(missing) == len(params) or (backbone and len(lacking) == len(backbone)):
        refuse(f"it holds none of this model's backbone tensors ({len(params) - len(missing)} of its {len(params)} "
               f"tensors in all; first missing: {(lacking or missing)[0]}): weights of another architecture")
    if lacking:
        refuse(f"it lacks {len(lacking)} of the backbone's {len(backbone)} tensors (first: {lacking[0]}): weights of "
               "another architecture (another depth or variant)")
    if whole and (missing or shapes):
        refuse(f"every weight of the model is needed; {len(missing)} are not in it (first: {missing[0]})")
    broken = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        parts = ", ".join(dict.fromkeys(partition(k) for k in broken))
        refuse(f"it holds non-finite values ({len(broken)} tensors of the {parts}; first: {broken[0]}): the weights of "
               "a diverged run; start from an earlier checkpoint (for --resume: name it in OUTPUT_DIR/last_checkpoint)")
    notes = []
    if shapes:
        k, theirs, ours = shapes[0]
        notes.append(f"fine-tuning: {len(shapes)} class-count tensors have other shapes ({k} {theirs} in the file, "
                     f"{ours} here: another number of classes) and start from their initialisation, as in detectron2")
    others = [k for k in missing if k not in {s[0] for s in shapes}]
    if others:
        parts = ", ".join(dict.fromkeys(partition(k) for k in others))
        notes.append(f"{len(others)} tensors of the {parts} are not in it and start from their initialisation (a "
                     "backbone-only checkpoint, e.g. ImageNet pre-training)")
    return "; ".join(notes) or None
