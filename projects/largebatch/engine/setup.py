"""The set-up of a train_net.py run in each worker: config, output folder, logs and datasets."""
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import load_config
from ..data.catalog import register_datasets

__all__ = ["setup", "setup_lazy"]


def setup(args):
    """The config of a train_net.py run, frozen, with detectron2's default_setup (logs, output dir, seed)."""
    cfg = load_config(args.config_file, args.opts, args.num_gpus * args.num_machines)
    cfg.freeze()
    default_setup(cfg, args)
    # largebatch's own log lines (LR scaling, epoch conversion, BN size, optimizer groups) into log.txt too
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="largebatch", abbrev_name="lb")
    register_datasets(cfg)
    return cfg


def setup_lazy(args):
    """(LazyConfig, run config) of a train_net.py run of a Python config (``largebatch.lazy``), set up as ``setup``
    does; the LazyConfig is also saved to OUTPUT_DIR/config_lazy.yaml (detectron2's LazyConfig.save)."""
    import os

    from detectron2.config import LazyConfig

    from ..lazy.config import load_lazy_config

    lazy, cfg = load_lazy_config(args.config_file, args.opts, args.num_gpus * args.num_machines)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="largebatch", abbrev_name="lb")
    if comm.is_main_process():
        LazyConfig.save(lazy, os.path.join(cfg.OUTPUT_DIR, "config_lazy.yaml"))
    register_datasets(cfg)
    return lazy, cfg
