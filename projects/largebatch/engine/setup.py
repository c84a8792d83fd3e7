"""Config set-up shared by train_net.py, the tools and the tests."""
import difflib
import logging
import os

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .. import modeling  # noqa: F401  (registers build_small_resnet_fpn_backbone)
from ..config import ConfigError, add_largebatch_config, validate

logger = logging.getLogger("largebatch")


def load_config(config_file: str, opts=(), num_workers: int = 1):
    """get_cfg() + largebatch keys + the YAML file + KEY VALUE overrides, validated.

    Raises ConfigError with one line for a missing file, an unknown key or a bad value.
    """
    if not config_file:
        raise ConfigError("--config-file is required: e.g. --config-file configs/shapes/demo.yaml")
    if not os.path.isfile(config_file):
        raise ConfigError(f"--config-file {config_file!r}: no such file")
    flags = [o for o in opts if str(o).startswith("--")]
    if flags:  # argparse hands everything after the first KEY VALUE pair to the overrides
        raise ConfigError(f"{flags[0]!r} is an argument, not a config key: put arguments before the KEY VALUE overrides")
    if len(opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs, got an odd list: {' '.join(map(str, opts))}")
    cfg = add_largebatch_config(get_cfg())
    for source, merge in ((config_file, lambda: cfg.merge_from_file(config_file)),
                          ("command line", lambda: cfg.merge_from_list(list(opts)))):
        try:
            merge()
        except (KeyError, AssertionError, ValueError, TypeError) as e:
            message = str(e.args[0] if e.args else e).splitlines()[0]
            if "Non-existent" in message:  # yacs, for files (KeyError) and for KEY VALUE lists (AssertionError)
                raise ConfigError(_unknown_key_message(cfg, source, message.split(":")[-1].strip())) from None
            raise ConfigError(f"{source}: {message}") from None
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        # not silent: said in the log and shown in the saved config
        logger.warning("MODEL.DEVICE=%s but no GPU is available: training on CPU, %d gloo worker(s)",
                       cfg.MODEL.DEVICE, num_workers)
        cfg.MODEL.DEVICE = "cpu"
    validate(cfg)
    if cfg.SOLVER.REFERENCE_WORLD_SIZE == 0 and cfg.SOLVER.IMS_PER_BATCH % num_workers:  # else auto-scaled
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH = {cfg.SOLVER.IMS_PER_BATCH} is not allowed on {num_workers} workers: expected a "
            "multiple of the number of workers (--num-gpus x --num-machines), every worker takes the same share"
        )
    measures_variance = cfg.SOLVER.AGVM.ENABLED or (cfg.MONITOR.ENABLED and cfg.MONITOR.GRAD_VARIANCE)
    if num_workers == 1 and measures_variance and cfg.SOLVER.IMS_PER_BATCH < 2:
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH = {cfg.SOLVER.IMS_PER_BATCH} is not allowed on one worker with gradient variance "
            "(AGVM or MONITOR.GRAD_VARIANCE): expected >= 2 images, split in two halves"
        )
    return cfg


def _all_keys(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _all_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _unknown_key_message(cfg, source, key):
    close = difflib.get_close_matches(key, list(_all_keys(cfg)), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else " (see largebatch/config.py and detectron2's defaults)"
    return f"{source}: unknown config key {key!r}{hint}"


def register_datasets(cfg):
    """Register the embedded shapes dataset when the config uses it (generated on first use)."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if any(name.startswith("shapes_") for name in names):
        from ..data import register_shapes

        register_shapes(cfg.DATASETS.SHAPES_ROOT or None)


def setup(args):
    """The config of a train_net.py run, frozen, with detectron2's default_setup (logs, output dir, seed)."""
    cfg = load_config(args.config_file, args.opts, args.num_gpus * args.num_machines)
    cfg.freeze()
    default_setup(cfg, args)
    # largebatch's own log lines (LR scaling, epoch conversion, BN size, optimizer groups) into log.txt too
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="largebatch", abbrev_name="lb")
    register_datasets(cfg)
    return cfg
