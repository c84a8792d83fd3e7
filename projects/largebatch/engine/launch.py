"""``launch``: detectron2's launcher, extended to CPU workers over gloo and to torchrun.

- GPUs: one process per GPU over NCCL, as detectron2's ``launch``.
- No GPU: ``num_gpus_per_machine`` CPU worker processes over gloo, so DDP, NaiveSyncBatchNorm and every
  all-reduce run for real (detectron2 0.6's launcher asserts CUDA).
- Started by torchrun / a scheduler that sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT):
  the process joins that process group instead of spawning.
"""
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

__all__ = ["DEFAULT_TIMEOUT", "launch", "launched_by_torchrun"]

DEFAULT_TIMEOUT = timedelta(minutes=30)
logger = logging.getLogger("largebatch")


def _find_free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def launch(
    main_func,
    num_gpus_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
):
    """Run ``main_func(*args)`` on every worker of a (possibly multi-machine) job.

    Same signature as ``detectron2.engine.launch``. ``num_gpus_per_machine`` is the number of worker
    processes per machine: one per GPU where there are GPUs, CPU processes over gloo otherwise.
    """
    if launched_by_torchrun():
        _join_torchrun_group(main_func, args, timeout)
        return
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        main_func(*args)
        return
    if dist_url is None or dist_url == "auto":
        if num_machines > 1:
            raise ValueError("--dist-url: a multi-machine job needs tcp://HOST:PORT of machine 0, not 'auto'")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if num_machines > 1 and dist_url.startswith("file://"):
        logger.warning("file:// is not a reliable init_method in multi-machine jobs. Prefer tcp://")
    use_cuda = torch.cuda.is_available()
    if use_cuda and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(
            f"--num-gpus {num_gpus_per_machine} is more than the {torch.cuda.device_count()} GPUs of this machine"
        )
    mp.spawn(
        _distributed_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout, use_cuda),
        daemon=False,
    )


def _distributed_worker(
    local_rank, main_func, world_size, num_workers_per_machine, machine_rank, dist_url, args, timeout, use_cuda
):
    global_rank = machine_rank * num_workers_per_machine + local_rank
    try:
        dist.init_process_group(
            backend="NCCL" if use_cuda else "GLOO",
            init_method=dist_url,
            world_size=world_size,
            rank=global_rank,
            timeout=timeout,
        )
    except Exception:
        logger.error(f"Process group URL: {dist_url}")
        raise
    _setup_worker(local_rank, num_workers_per_machine, use_cuda)
    main_func(*args)


def _join_torchrun_group(main_func, args, timeout):
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="NCCL" if use_cuda else "GLOO", init_method="env://", timeout=timeout)
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    _setup_worker(int(os.environ["LOCAL_RANK"]), local_size, use_cuda)
    main_func(*args)


def _setup_worker(local_rank, num_workers_per_machine, use_cuda):
    """Local process group as detectron2's ``comm`` expects it, the worker's device, and its CPU threads."""
    create = getattr(comm, "create_local_process_group", None)  # detectron2 main
    if create is not None:
        create(num_workers_per_machine)
    else:  # detectron2 0.6 builds it inline in its launcher
        assert comm._LOCAL_PROCESS_GROUP is None
        num_machines = dist.get_world_size() // num_workers_per_machine
        machine_rank = dist.get_rank() // num_workers_per_machine
        for i in range(num_machines):
            ranks = list(range(i * num_workers_per_machine, (i + 1) * num_workers_per_machine))
            group = dist.new_group(ranks)  # every process must create every group
            if i == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
    if use_cuda:
        torch.cuda.set_device(local_rank)
    else:
        # share the machine's cores between its workers instead of oversubscribing them
        torch.set_num_threads(max(1, _available_cpus() // num_workers_per_machine))
    comm.synchronize()
