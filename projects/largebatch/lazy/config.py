"""A detectron2 LazyConfig (a Python config: ``model``, ``dataloader``, ``optimizer``, ``lr_multiplier``, ``train``)
run by largebatch, and the ``largebatch`` node that holds what detectron2's nodes have no place for.

``largebatch_node()`` is that node: SyncBN groups (``sync_bn``), the monitor and the explosion guard (``monitor``),
gradient accumulation and the LR scaling rule (``solver``), the detector parts (``module_partition``) and the data
checks (``datasets``), with the defaults, meaning and checks of the YAML keys they mirror (``LAZY_KEYS``:
``largebatch.sync_bn.group_size`` is MODEL.SYNC_BN.GROUP_SIZE, documented in largebatch/config.py).

``load_lazy_config(path, overrides, num_workers)`` loads the file (``model_zoo://`` names a file of detectron2's
model zoo), applies ``key=value`` overrides (an unknown key is refused, not added), applies the LR scaling rule
once (to the optimizer's ``lr``), and builds the *run config*: largebatch's YAML config filled from the LazyConfig
(batch, iterations, output folder, device, checkpoint period, AMP, the optimizer's LR and kind, the warm-up's
length, the datasets' names) and the ``largebatch`` node, validated by the same validator as a YAML config. The
trainer, the checkpointer, the monitor, the launcher and the set-up checks read that run config; the model, the
data, the optimizer and the schedule are the LazyConfig's own objects.
"""
import copy
import logging
import os
from typing import Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..config import (
    ConfigError,
    LargeBatchCfgNode,
    add_largebatch_config,
    device_kind,
    resolve_model_zoo_base,
    validate,
)
from ..norm import groups_divide
from ..solver import lr_scale_factor

__all__ = ["LAZY_KEYS", "base_optimizer_node", "is_lazy_config", "largebatch_node", "load_lazy_config",
           "lazy_key"]

logger = logging.getLogger("largebatch")

#: sections of the ``largebatch`` node -> the YAML node they mirror and its keys that a LazyConfig run reads (None:
#: all of them)
_SECTIONS = {
    "solver": ("SOLVER", ("ACCUMULATE_STEPS", "LR_SCALING", "RECIPE_IMS_PER_WORKER")),
    "sync_bn": ("MODEL.SYNC_BN", None),
    "monitor": ("MONITOR", None),
    "datasets": ("DATASETS", ("SHAPES_ROOT", "CHECK_IMAGES")),
}

#: what the run config takes from detectron2's own LazyConfig nodes: YAML key -> LazyConfig key
_FROM_LAZY = {
    "SOLVER.IMS_PER_BATCH": "dataloader.train.total_batch_size",
    "SOLVER.MAX_ITER": "train.max_iter",
    "SOLVER.CHECKPOINT_PERIOD": "train.checkpointer.period",
    "SOLVER.CHECKPOINTS_TO_KEEP": "train.checkpointer.max_to_keep",
    "TEST.EVAL_PERIOD": "train.eval_period",
    "OUTPUT_DIR": "train.output_dir",
    "MODEL.DEVICE": "train.device",
    "MODEL.WEIGHTS": "train.init_checkpoint",
    "SOLVER.AMP.ENABLED": "train.amp.enabled",
    "SEED": "train.seed",
    "DATALOADER.NUM_WORKERS": "dataloader.train.num_workers",
}

#: the optimizer classes largebatch knows by SOLVER.OPTIMIZER's names (the rest run as they are)
_OPTIMIZER_NAMES = {"torch.optim.SGD": "SGD", "torch.optim.sgd.SGD": "SGD", "torch.optim.AdamW": "ADAMW",
                    "torch.optim.adamw.AdamW": "ADAMW"}
_AGVM = "largebatch.optim.agvm.AGVM"


def is_lazy_config(path: str) -> bool:
    """A Python config file (detectron2's LazyConfig), as opposed to a YAML one."""
    return str(path).endswith(".py")


def _yacs_defaults():
    from detectron2.config import get_cfg

    return LargeBatchCfgNode(add_largebatch_config(get_cfg()))


def _lazy_keys() -> Dict[str, str]:
    """``largebatch.<section>.<key>`` -> the YAML key, for every key of the node."""
    cfg = _yacs_defaults()
    keys = {"largebatch.module_partition": "MODEL.MODULE_PARTITION"}

    def walk(node, yacs_prefix, lazy_prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{yacs_prefix}.{k}", f"{lazy_prefix}.{k.lower()}")
            else:
                keys[f"{lazy_prefix}.{k.lower()}"] = f"{yacs_prefix}.{k}"

    for section, (yacs_path, wanted) in _SECTIONS.items():
        node = cfg
        for name in yacs_path.split("."):
            node = node[name]
        for k in wanted or list(node):
            v = node[k]
            if isinstance(v, dict):
                walk(v, f"{yacs_path}.{k}", f"largebatch.{section}.{k.lower()}")
            else:
                keys[f"largebatch.{section}.{k.lower()}"] = f"{yacs_path}.{k}"
    return keys


LAZY_KEYS: Dict[str, str] = {}  # filled on first use (it needs detectron2's default config)


def _keys() -> Dict[str, str]:
    if not LAZY_KEYS:
        LAZY_KEYS.update(_lazy_keys())
    return LAZY_KEYS


def lazy_key(yacs_key: str) -> str:
    """The LazyConfig key that sets a YAML key (for messages), or the YAML key itself."""
    for lazy, yacs in {**{v: k for k, v in _FROM_LAZY.items()}, **_keys()}.items():
        if yacs == yacs_key:
            return lazy
    return yacs_key


def largebatch_node() -> DictConfig:
    """The ``largebatch`` node of a LazyConfig with every key at its default (the YAML keys' defaults):
    ``largebatch = largebatch_node(); largebatch.sync_bn.enabled = True``."""
    cfg = _yacs_defaults()
    tree: dict = {}
    for lazy, yacs in _keys().items():
        value = cfg
        for name in yacs.split("."):
            value = value[name]
        node = tree
        *parents, last = lazy.split(".")[1:]
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = list(value) if isinstance(value, tuple) else copy.deepcopy(value)
    return OmegaConf.create(tree)


def base_optimizer_node(node):
    """The node of the optimizer that steps: ``optimizer``, or the one an AGVM node wraps (``optimizer.optimizer``)."""
    while _target(node) == _AGVM:
        node = node.optimizer
    return node


def _target(node) -> str:
    """The dotted name of a LazyCall node's ``_target_`` (a class / function or its name)."""
    target = node.get("_target_") if isinstance(node, (dict, DictConfig)) else None
    if target is None or isinstance(target, str):
        return target or ""
    return f"{target.__module__}.{target.__qualname__}"


def _apply_overrides(cfg, overrides: List[str]):
    """detectron2's ``LazyConfig.apply_overrides``, but a key the config does not have is refused (OmegaConf would
    add it: a typo would silently do nothing), except a new argument of a LazyCall node (its call refuses what it
    does not take, at set-up) and a key written ``+key=value``."""
    from detectron2.config import LazyConfig

    for override in overrides:
        key, sep, _ = str(override).partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not key=value (a LazyConfig's overrides: "
                              "train.max_iter=100 largebatch.monitor.period=10)")
        parent = OmegaConf.select(cfg, key.rsplit(".", 1)[0], default=None) if "." in key else None
        argument = OmegaConf.is_config(parent) and "_target_" in parent  # a LazyCall's argument: its call checks it
        if OmegaConf.select(cfg, key.lstrip("+~"), default=_MISSING) is _MISSING and not (argument or
                                                                                          key.startswith("+")):
            raise ConfigError(f"unknown config key {key!r} in override {override!r} (add a new key with +{key}=...)")
    try:
        return LazyConfig.apply_overrides(cfg, [o[1:] if o.startswith("+") else o for o in overrides])
    except Exception as e:  # noqa: BLE001 - hydra's parser or OmegaConf: one line either way
        raise ConfigError(f"overrides {' '.join(overrides)}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None


_MISSING = object()


def _dataset_names(node) -> Tuple[str, ...]:
    """The dataset names of a loader node built on get_detection_dataset_dicts (``dataset.names``), else ()."""
    names = OmegaConf.select(node, "dataset.names", default=None) if node is not None else None
    if names is None:
        return ()
    return (names,) if isinstance(names, str) else tuple(names)


def _run_config(lazy, num_workers: int):
    """largebatch's YAML config for this LazyConfig (see the module doc), validated; the LR scaling already applied
    to the LazyConfig (the run config's rule is then none)."""
    cfg = _yacs_defaults()
    pairs = []
    for yacs, path in _FROM_LAZY.items():
        value = OmegaConf.select(lazy, path, default=_MISSING)
        if value is not _MISSING and value is not None:
            pairs += [yacs, _plain(value)]
    node = lazy.get("largebatch") if isinstance(lazy, DictConfig) else None
    if node is not None:
        flat = _flatten(OmegaConf.to_container(node, resolve=True), "largebatch")
        keys = _keys()
        for key, value in flat.items():
            if key not in keys:
                raise ConfigError(f"unknown config key {key!r} (the largebatch node's keys: largebatch_node(); e.g. "
                                  f"{', '.join(sorted(keys)[:3])})")
            pairs += [keys[key], value]
    optimizer = lazy.get("optimizer")
    if optimizer is None:
        raise ConfigError("the LazyConfig has no 'optimizer' node")
    base = base_optimizer_node(optimizer)
    name = _OPTIMIZER_NAMES.get(_target(base)) or _target(base).rsplit(".", 1)[-1].upper()
    pairs += ["SOLVER.OPTIMIZER", name if name in ("SGD", "ADAMW", "LARS", "LAMB", "PMDLAMB") else "SGD"]
    if base.get("lr") is not None:
        pairs += ["SOLVER.BASE_LR", float(base.lr)]
    for option, key in (("trust_coefficient", "SOLVER.LARS.TRUST_COEFFICIENT"), ("scale", "SOLVER.PMDLAMB.SCALE")):
        if base.get(option) is not None and name in ("LARS", "PMDLAMB"):
            pairs += [key, float(base[option])]
    pairs += ["SOLVER.AGVM.ENABLED", _target(optimizer) == _AGVM, "SOLVER.STEPS", ()]
    warmup = OmegaConf.select(lazy, "lr_multiplier.warmup_length", default=None)
    max_iter = OmegaConf.select(lazy, "train.max_iter", default=None)
    if warmup is not None and max_iter:
        pairs += ["SOLVER.WARMUP_ITERS", int(round(float(warmup) * int(max_iter)))]
    pairs += ["DATASETS.TRAIN", _dataset_names(OmegaConf.select(lazy, "dataloader.train", default=None)),
              "DATASETS.TEST", _dataset_names(OmegaConf.select(lazy, "dataloader.test", default=None))]
    try:
        cfg.merge_from_list(pairs)
    except (KeyError, AssertionError, ValueError, TypeError) as e:
        message = str(e.args[0] if e.args else e).splitlines()[0]
        raise ConfigError(f"the LazyConfig: {message}") from None
    if device_kind(cfg.MODEL.DEVICE) == "cuda" and not torch.cuda.is_available():
        # as for a YAML config: said in the log and shown in the saved config
        logger.warning("train.device=%s but no GPU is available: training on CPU, %d gloo worker(s)",
                       cfg.MODEL.DEVICE, num_workers)
        cfg.MODEL.DEVICE = "cpu"
    try:
        validate(cfg, num_workers)
    except ConfigError as e:
        lr_path = "optimizer" + ".optimizer" * _agvm_depth(optimizer) + ".lr"
        raise ConfigError(_lazy_message(str(e), {"SOLVER.BASE_LR": lr_path})) from None
    return cfg


def _agvm_depth(node) -> int:
    """How many AGVM nodes wrap the stepping optimizer's node."""
    depth = 0
    while _target(node) == _AGVM:
        node, depth = node.optimizer, depth + 1
    return depth


def _plain(value):
    """An OmegaConf value as plain Python (lists as tuples, as yacs keeps them)."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return tuple(value) if isinstance(value, list) else value


def _flatten(tree: dict, prefix: str) -> Dict[str, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def _lazy_message(message: str, extra: Dict[str, str]) -> str:
    """A validator's one line, with the YAML key it names said as the LazyConfig key that sets it (``extra``: more
    YAML -> LazyConfig keys)."""
    key = message.split(" ", 1)[0]
    return extra.get(key, lazy_key(key)) + message[len(key):]


def _apply_lr_scaling(lazy, cfg) -> Optional[str]:
    """The LR scaling rule of ``largebatch.solver.lr_scaling``, applied once, to the stepping optimizer's ``lr`` and
    to its params node's ``base_lr`` where set; the run config's rule becomes none. Returns the log line."""
    sc = cfg.SOLVER.LR_SCALING
    if sc.RULE == "none":
        return None
    total = cfg.SOLVER.IMS_PER_BATCH * cfg.SOLVER.ACCUMULATE_STEPS
    factor = lr_scale_factor(sc.RULE, total, sc.REFERENCE_BATCH, sc.SQRT_ABOVE)
    base = base_optimizer_node(lazy.optimizer)
    old = float(base.lr)
    base.lr = old * factor
    params = base.get("params")
    if isinstance(params, DictConfig) and params.get("base_lr") is not None and \
            not OmegaConf.is_interpolation(params, "base_lr"):  # "${..lr}" follows the LR scaled above
        params.base_lr = float(params.base_lr) * factor
    cfg.SOLVER.BASE_LR = base.lr
    cfg.SOLVER.LR_SCALING.RULE = "none"
    return (f"optimizer.lr {old:g} -> {base.lr:g} (largebatch.solver.lr_scaling: rule {sc.RULE}, total batch {total}, "
            f"reference {sc.REFERENCE_BATCH}, factor {factor:g})")


def load_lazy_config(config_file: str, overrides=(), num_workers: int = 1):
    """(LazyConfig, run config) of a Python config file: see the module doc. Raises ConfigError with one line for a
    missing file, a file that does not load, a bad or unknown override and any value the validator refuses."""
    from detectron2.config import LazyConfig

    path = resolve_model_zoo_base(config_file)
    if not os.path.isfile(path):
        raise ConfigError(f"--config-file {config_file!r}: no such file")
    flags = [o for o in overrides if str(o).startswith("--")]
    if flags:
        raise ConfigError(f"{flags[0]!r} is an argument, not a config key: put arguments before the key=value "
                          "overrides")
    try:
        lazy = LazyConfig.load(path)
    except Exception as e:  # noqa: BLE001 - whatever the config file raises when it runs
        raise ConfigError(f"{config_file}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    lazy = _apply_overrides(lazy, list(overrides))
    for node in ("model", "dataloader", "optimizer", "train"):
        if node not in lazy:
            raise ConfigError(f"{config_file}: no {node!r} node (a LazyConfig for train_net.py has model, dataloader, "
                              "optimizer, lr_multiplier and train, as for detectron2's lazyconfig_train_net.py)")
    cfg = _run_config(lazy, num_workers)
    scaled = _apply_lr_scaling(lazy, cfg)
    if scaled:
        logger.info(scaled)
    if base_optimizer_node(lazy.optimizer).get("lr") is None:
        raise ConfigError("optimizer.lr is not set")
    return lazy, cfg


def validate_lazy_training(cfg, num_workers: int) -> None:
    """What training needs beyond ``validate``: SyncBN groups that split the workers evenly."""
    group = cfg.MODEL.SYNC_BN.GROUP_SIZE
    if cfg.MODEL.SYNC_BN.ENABLED and not groups_divide(group, num_workers):
        raise ConfigError(f"largebatch.sync_bn.group_size = {group!r} is not allowed: expected a divisor of the "
                          f"{num_workers} workers (equal BN groups), or 0 for all of them")
