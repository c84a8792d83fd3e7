#!/usr/bin/env python
"""Train or evaluate a detector with largebatch's recipes.

    python train_net.py --num-gpus 8 --config-file configs/COCO-Detection/agvm_faster_rcnn_R_50_FPN_b1024_sgd.yaml
    python train_net.py --num-gpus 2 --config-file configs/shapes/demo.yaml SOLVER.MAX_ITER 100
    python train_net.py --eval-only --config-file configs/shapes/demo.yaml MODEL.WEIGHTS output/demo/model_final.pth

MODEL.DEVICE decides the workers: cuda -> one process per GPU over NCCL; cpu -> --num-gpus N starts N CPU
worker processes over gloo, with the GPUs hidden from them.
"""
import os
import re
import sys
import warnings
from datetime import timedelta

import torch

# detectron2 0.6 calls torch.jit.script and Image.LINEAR at import: noise for every user, not their concern
warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message="LINEAR is deprecated", category=DeprecationWarning)

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results
from detectron2.layers import FrozenBatchNorm2d
from detectron2.utils import comm

from largebatch import LargeBatchTrainer, launch
from largebatch.config import ConfigError, describe_error, load_config, validate_training
from largebatch.data import check_images, register_datasets
from largebatch.engine.checkpoint import check_weights_fit
from largebatch.engine.heartbeat import DEFAULT_HEARTBEAT_TIMEOUT
from largebatch.engine.launch import DEFAULT_JOIN_TIMEOUT, device_type, hide_gpus, launched_by_torchrun
from largebatch.engine.setup import setup, setup_lazy
from largebatch.lazy.config import is_lazy_config, load_lazy_config, validate_lazy_training
from largebatch.lazy.trainer import LazyLargeBatchTrainer, build_lazy_model, build_lazy_optimizer, lazy_test
from largebatch.optim.groups import ModulePartition


def main(args):
    if is_lazy_config(args.config_file):
        return main_lazy(args)
    cfg = setup(args)
    if args.eval_only:
        model = LargeBatchTrainer.build_model(cfg, for_training=False)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = LargeBatchTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = LargeBatchTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def main_lazy(args):
    """``main`` for a LazyConfig (a .py config): its model, optimizer, data and schedule, largebatch's trainer."""
    lazy, cfg = setup_lazy(args)
    if args.eval_only:
        model = build_lazy_model(lazy, cfg, for_training=False)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return lazy_test(lazy, model)
    trainer = LazyLargeBatchTrainer(lazy, cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def argument_parser():
    """detectron2's arguments, and how long the workers of all machines wait for each other."""
    parser = default_argument_parser()

    def one_line_error(message):  # argparse's usage block + error: one line, as for every other bad input
        parser.exit(2, f"error: {message} (train_net.py -h lists the arguments)\n")

    parser.error = one_line_error
    parser.add_argument("--dist-timeout", type=float, default=DEFAULT_JOIN_TIMEOUT.total_seconds() / 60,
                        help="minutes the workers wait for every machine to join before they give up, naming the "
                             "missing ones (the collectives' own timeout stays 30 min)")
    parser.add_argument("--heartbeat-timeout", type=float, default=DEFAULT_HEARTBEAT_TIMEOUT,
                        help="seconds without a heartbeat after which a worker (or its machine) counts as dead: "
                             "every other worker then stops, naming it")
    return parser


def check_arguments(args):
    """The launch arguments argparse cannot check: one ConfigError line each."""
    for name, value, ok, allowed in (("--num-gpus", args.num_gpus, args.num_gpus >= 1, "a number >= 1"),
                                     ("--num-machines", args.num_machines, args.num_machines >= 1, "a number >= 1"),
                                     ("--dist-timeout", args.dist_timeout, args.dist_timeout > 0, "minutes > 0"),
                                     ("--heartbeat-timeout", args.heartbeat_timeout, args.heartbeat_timeout >= 1,
                                      "seconds >= 1")):
        if not ok:
            raise ConfigError(f"{name} {value} is not allowed: expected {allowed}")
    if not 0 <= args.machine_rank < args.num_machines:
        raise ConfigError(f"--machine-rank {args.machine_rank} is not allowed with --num-machines "
                          f"{args.num_machines}: expected 0 to {args.num_machines - 1}")
    url = args.dist_url
    tcp = re.fullmatch(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^:/\[\]]+):(\d{1,5})", url)
    if url == "auto" and args.num_machines > 1:
        raise ConfigError(f"--dist-url auto is not allowed with --num-machines {args.num_machines}: expected "
                          "tcp://HOST:PORT of machine 0, the same on every machine")
    if not (url in ("auto", "env://") or url.startswith("file://") or (tcp and 0 < int(tcp.group(2)) < 65536)):
        raise ConfigError(f"--dist-url {url} is not allowed: expected tcp://HOST:PORT (port 1-65535), auto (one "
                          "machine: a free port), file://PATH or env://")


def make_output_dir(path):
    """OUTPUT_DIR exists and takes files: made here, once, so that a path that cannot be is one line now, not an
    error in every worker after start-up."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"OUTPUT_DIR = {path!r} is not allowed: it cannot be created ({describe_error(e)})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"OUTPUT_DIR = {path!r} is not allowed: this user cannot write into it")


def build_model_on_cpu(cfg, lazy=None):
    """The detector, built once here on the CPU: a config it cannot be built from (a META_ARCHITECTURE or
    BACKBONE.NAME nobody registered, a ResNet depth that does not exist, ...) is one line now, not an error in
    every worker after start-up. For a LazyConfig its optimizer too (a bad argument of it: one line)."""
    on_cpu = cfg.clone()
    on_cpu.MODEL.DEVICE = "cpu"
    try:
        model = (LargeBatchTrainer.build_model(on_cpu, for_training=False) if lazy is None else
                 build_lazy_model(lazy, on_cpu, for_training=False))
    except Exception as e:  # noqa: BLE001 - whatever detectron2's builders raise, the user gets one line
        key = "MODEL" if lazy is None else "model"
        raise ConfigError(f"{key}: the detector cannot be built from this config ({describe_error(e, 200)})") from None
    if lazy is not None:
        try:
            build_lazy_optimizer(lazy, on_cpu, model)
        except Exception as e:  # noqa: BLE001 - the optimizer's own argument checks
            raise ConfigError(f"optimizer: cannot be built ({describe_error(e, 200)})") from None
        if any(type(m) is torch.nn.SyncBatchNorm for m in model.modules()) and on_cpu.MODEL.DEVICE == "cpu" and \
                device_type(cfg.MODEL.DEVICE) == "cpu":
            raise ConfigError("model: torch.nn.SyncBatchNorm layers (norm 'SyncBN') run on GPUs only: on CPU workers "
                              "set largebatch.sync_bn.enabled=True (largebatch's SyncBN over the workers)")
    return model


def warn_frozen_bn_from_scratch(model):
    """A model-zoo YAML's FrozenBatchNorm2d layers hold ImageNet statistics that only MODEL.WEIGHTS brings: from
    scratch they are frozen identities, nothing normalises, and the losses blow up within a few iterations. Said
    before the start, with the two ways out."""
    frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    if frozen:
        print(f"warning: MODEL.WEIGHTS is empty and the model has {frozen} FrozenBatchNorm2d layers (e.g. "
              "MODEL.RESNETS.NORM FrozenBN): from scratch they are frozen identities and nothing normalises; make them "
              "trainable with MODEL.SYNC_BN.ENABLED True MODEL.SYNC_BN.CONVERT_FROZEN True (or MODEL.RESNETS.NORM BN), "
              "or give pre-trained MODEL.WEIGHTS", file=sys.stderr)


def check_weights_file(cfg, model, path, whole=False, key="MODEL.WEIGHTS"):
    """The checkpoint at ``path`` can be read (a truncated or foreign file fails here, not in every worker after
    start-up), and fits ``model`` (``check_weights_fit``: weights of another architecture are refused; a
    backbone-only checkpoint or other class-count layers are accepted, and said)."""
    note = check_weights_fit(model, path, ModulePartition(cfg.MODEL.MODULE_PARTITION), whole, key)
    if note:
        print(f"{key} = {path!r}: {note}")


def resumed_checkpoint(cfg):
    """The checkpoint --resume continues from (OUTPUT_DIR/last_checkpoint names it), or None when there is none."""
    tag = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
    if not os.path.isfile(tag):
        return None
    with open(tag) as f:
        name = f.read().strip()
    path = os.path.join(cfg.OUTPUT_DIR, name)
    if not os.path.isfile(path):
        raise ConfigError(f"--resume: {tag} names {name!r}, which is not a file: write the name of one of the "
                          "checkpoints in OUTPUT_DIR into it (or start in a new OUTPUT_DIR)")
    return path


def cli(argv=None):
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.num_machines == 1 and args.dist_url == parser.get_default("dist_url"):
        # detectron2's default port is derived from the user id: two runs of one user would collide on it
        args.dist_url = "auto"
    try:  # fail before any worker starts: one line, no traceback
        check_arguments(args)
        workers = args.num_gpus * args.num_machines
        lazy = None
        if is_lazy_config(args.config_file):
            lazy, cfg = load_lazy_config(args.config_file, args.opts, workers)
            if not args.eval_only:
                validate_lazy_training(cfg, workers)
        else:
            cfg = load_config(args.config_file, args.opts, workers)
            if not args.eval_only:
                validate_training(cfg, workers)
        if args.eval_only and not args.resume and not os.path.isfile(cfg.MODEL.WEIGHTS):
            raise ConfigError(f"--eval-only: MODEL.WEIGHTS = {cfg.MODEL.WEIGHTS!r} is not a file")
        register_datasets(cfg)  # unknown names, a shapes folder that is not ours: said here, before any worker
        if not launched_by_torchrun() or os.environ["LOCAL_RANK"] == "0":  # once per machine
            check_images(cfg, ("TEST",) if args.eval_only else ("TRAIN", "TEST"))  # missing, unreadable, truncated
        resumed = resumed_checkpoint(cfg) if args.resume else None
        earlier = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
        if not args.resume and not args.eval_only and os.path.isfile(earlier):
            # detectron2's behaviour, kept (re-running a config is common), but never without a word
            print(f"warning: OUTPUT_DIR {cfg.OUTPUT_DIR!r} holds an earlier run's checkpoints ({earlier}): this run "
                  "starts afresh and overwrites the files of the same names; --resume continues that run instead",
                  file=sys.stderr)
        model = build_model_on_cpu(cfg, lazy)
        if not args.eval_only and resumed is None and not cfg.MODEL.WEIGHTS:
            warn_frozen_bn_from_scratch(model)
        if resumed is not None:  # the run's own checkpoint: all of it must fit (another config's OUTPUT_DIR?)
            check_weights_file(cfg, model, resumed, whole=True, key="--resume: the last checkpoint")
        elif cfg.MODEL.WEIGHTS and "://" not in cfg.MODEL.WEIGHTS:
            check_weights_file(cfg, model, cfg.MODEL.WEIGHTS, whole=args.eval_only)
        del model  # the workers build their own
        make_output_dir(cfg.OUTPUT_DIR)  # last: a run refused above leaves nothing behind
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("Command Line Args:", args)
    if device_type(cfg.MODEL.DEVICE) == "cpu":
        hide_gpus()  # a CPU run makes no CUDA call, in this process and in its workers
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=cfg.MODEL.DEVICE,
        join_timeout=timedelta(minutes=args.dist_timeout),
        heartbeat_timeout=args.heartbeat_timeout,
    )


if __name__ == "__main__":
    cli()
