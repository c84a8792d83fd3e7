#!/usr/bin/env python
"""Plot the learning rate of a largebatch config over its whole run, as the trainer will see it.

    python tools/plot_schedule.py --config-file configs/X.yaml [--num-gpus N] [--num-machines M]
        [--num-train-images K] [--output lr.png] [KEY VALUE ...]

The config is loaded as train_net.py loads it (``largebatch.config.load_config``, validated for N x M
workers), goes through ``largebatch.solver.prepare_solver`` (REFERENCE_WORLD_SIZE auto-scaling, the LR scaling
rule, epoch units, SCHEDULE_MULT) and the curve comes from the trainer's own LRMultiplier
(``largebatch.schedule.lr_curve``). The training set size (needed with SOLVER.SCHEDULE_UNIT "epoch") is
--num-train-images when given, else the size of DATASETS.TRAIN (``largebatch.data.register_datasets``
registers the embedded shapes dataset, generating it on first use; COCO needs its files, or the flag).
"""
import argparse
import logging
import os
import sys

from largebatch.analysis.plots import plot_lr_schedule
from largebatch.config import ConfigError, load_config, validate, validate_training
from largebatch.data import register_datasets, train_set_size
from largebatch.schedule import lr_curve, schedule_marks
from largebatch.solver import prepare_solver


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Plot the LR schedule of a largebatch config.")
    p.add_argument("--config-file", required=True, metavar="FILE", help="path to the YAML config")
    p.add_argument("--num-gpus", type=int, default=1, help="workers per machine (default 1)")
    p.add_argument("--num-machines", type=int, default=1, help="machines (default 1)")
    p.add_argument("--num-train-images", type=int, default=None,
                   help="training set size (for epoch units; default: counted from DATASETS.TRAIN)")
    p.add_argument("--output", default="lr.png", help="PNG to write (default lr.png)")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    return p.parse_args(argv)


def count_train_images(cfg):
    """The size of DATASETS.TRAIN, for a config in epochs; a ConfigError naming --num-train-images when it
    cannot be counted (not registered, or its files are missing, e.g. COCO on this machine)."""
    train = tuple(cfg.DATASETS.TRAIN)
    try:
        register_datasets(cfg)
        images = train_set_size(cfg)
    except Exception as e:  # a registered dataset whose files are missing, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"cannot count the images of DATASETS.TRAIN {train} ({first}): pass --num-train-images")
    if images is None:
        raise ConfigError(f"SOLVER.SCHEDULE_UNIT is 'epoch' and DATASETS.TRAIN {train} is not registered: "
                          "pass --num-train-images")
    return images


def training_refusal(cfg, world_size):
    """Why training on ``world_size`` workers would refuse ``cfg`` (a batch the workers cannot split evenly, BN
    groups that do not divide them), or None."""
    try:
        validate(cfg, world_size)
        validate_training(cfg, world_size)
    except ConfigError as e:
        return str(e)
    return None


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(args.config_file):
        print(f"error: config file not found: {args.config_file}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    world_size = args.num_gpus * args.num_machines
    try:
        cfg = load_config(args.config_file, args.opts)
        refusal = training_refusal(cfg, world_size)
        if refusal:  # the LR curve does not depend on how the batch splits: drawn, and the refusal said
            print(f"note: train_net.py would refuse this config on {world_size} workers ({refusal}); the schedule "
                  "is drawn anyway", file=sys.stderr)
        images = args.num_train_images
        if images is None and cfg.SOLVER.SCHEDULE_UNIT == "epoch":
            images = count_train_images(cfg)
        cfg = prepare_solver(cfg, world_size, images)
        lrs = lr_curve(cfg)
        marks = schedule_marks(cfg)
    except (ConfigError, KeyError, ValueError, AssertionError) as e:
        msg = str(e).strip().splitlines()
        print(f"error: {msg[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2
    print(plot_lr_schedule(cfg, lrs, marks, args.output, images))
    return 0


if __name__ == "__main__":
    sys.exit(main())
