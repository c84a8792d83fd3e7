"""``launch``: detectron2's launcher, extended to CPU workers over gloo and to torchrun / SLURM.

The device of the run (the config's ``MODEL.DEVICE``), not the machine, decides how workers start:

- ``cuda``: one process per GPU over NCCL, as detectron2's ``launch``; each worker binds its GPU
  (``torch.cuda.set_device``) before it joins the process group, so no collective runs on the wrong device.
- ``cpu``: ``num_gpus_per_machine`` CPU worker processes over gloo, so DDP, NaiveSyncBatchNorm and every
  all-reduce run for real (detectron2 0.6's launcher asserts CUDA). The workers are started with
  ``CUDA_VISIBLE_DEVICES=""``: a CPU run makes no CUDA call at all, even on a machine with GPUs (detectron2
  itself would otherwise query them, and ``torch.cuda.synchronize()`` in its evaluator would create a
  CUDA context on GPU 0 in every worker).
- Started by torchrun / a scheduler that sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT): the
  process joins that process group instead of spawning. Its GPU is LOCAL_RANK among the visible ones, or the
  only visible one (one GPU per task, e.g. SLURM ``--gpus-per-task 1``); the number of workers on its machine
  is LOCAL_WORLD_SIZE, or counted from the host names of all ranks where the scheduler does not set it.
"""
import ctypes
import ctypes.util
import logging
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

from ..config import describe_error, device_kind
from .heartbeat import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    PEER_LOST_EXIT_CODE,
    Heartbeat,
    describe_rank,
    is_communication_error,
    post_verdict,
)
from .preemption import PREEMPTED_EXIT_CODE, STOP_SIGNALS, Preempted

__all__ = ["DEFAULT_TIMEOUT", "launch", "launched_by_torchrun", "device_type", "hide_gpus", "local_cuda_device"]

DEFAULT_TIMEOUT = timedelta(minutes=30)  # of a collective (NCCL's watchdog)
DEFAULT_JOIN_TIMEOUT = timedelta(minutes=10)  # for every worker of every machine to join (train_net --dist-timeout)
#: a worker that could not join (another machine missing or unreachable): it said why in one line
JOIN_FAILED_EXIT_CODE = 2
logger = logging.getLogger("largebatch")


def _find_free_port() -> int:
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


def device_type(device) -> str:
    """"cuda" or "cpu" for a MODEL.DEVICE value ("cuda", "cuda:1", "cpu"); None: "cuda" where torch sees a GPU
    (detectron2's own rule, for callers that do not say which device they train on)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device_kind(device)


def hide_gpus() -> None:
    """Make the GPUs invisible to this process and the processes it starts (``CUDA_VISIBLE_DEVICES=""``).

    For CPU runs only, and only before anything in the process has initialized CUDA (CUDA reads the variable
    once, at initialization); a process that already uses CUDA is left as it is."""
    if torch.cuda.is_initialized():
        logger.warning("CUDA is already initialized in this process: its GPUs stay visible to the CPU run")
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def local_cuda_device(local_rank: int) -> int:
    """The GPU of the worker with ``local_rank`` among the GPUs this process sees.

    One visible GPU is that worker's own (schedulers that give each task one GPU, whatever its LOCAL_RANK);
    several visible GPUs are indexed by LOCAL_RANK."""
    visible = torch.cuda.device_count()
    if visible == 0:
        raise RuntimeError(
            "MODEL.DEVICE is cuda but this process sees no GPU "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})"
        )
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise RuntimeError(
        f"LOCAL_RANK {local_rank} has no GPU: this process sees {visible} GPUs (start at most {visible} workers "
        "per machine, or give each worker one GPU through CUDA_VISIBLE_DEVICES)"
    )


def launch(
    main_func,
    num_gpus_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
    device=None,
    join_timeout=DEFAULT_JOIN_TIMEOUT,
    heartbeat_timeout=DEFAULT_HEARTBEAT_TIMEOUT,
):
    """Run ``main_func(*args)`` on every worker of a (possibly multi-machine) job.

    Same signature as ``detectron2.engine.launch``, plus ``device``: the config's MODEL.DEVICE, which decides
    the backend (cuda: NCCL, one process per GPU; cpu: gloo CPU workers, GPUs hidden); None keeps detectron2's
    rule (cuda where torch sees a GPU). ``num_gpus_per_machine`` is the number of worker processes per machine.
    ``join_timeout``: how long the workers wait for each other at a tcp:// ``dist_url`` (the missing ranks and
    machines are named while waiting and when giving up); ``timeout`` is the collectives' own.
    ``heartbeat_timeout``: seconds after which a silent worker counts as dead and every worker stops, naming it
    (tcp:// only; see ``heartbeat.py``).
    """
    kind = device_type(device)
    if launched_by_torchrun():
        _join_torchrun_group(main_func, args, timeout, kind)
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
    if kind == "cuda" and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(
            f"--num-gpus {num_gpus_per_machine} is more than the {torch.cuda.device_count()} GPUs of this machine "
            "(MODEL.DEVICE cuda: one worker per GPU)"
        )
    spawn_args = (main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout, kind, os.getpid(),
                  join_timeout, heartbeat_timeout)
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if kind == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # inherited by the workers only; restored below
    try:
        _spawn_and_forward_signals(num_gpus_per_machine, spawn_args,
                                   lambda local_rank, message: _tell_every_worker(
                                       dist_url, machine_rank * num_gpus_per_machine + local_rank,
                                       num_gpus_per_machine, message))
    finally:
        if kind == "cpu":
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _tell_every_worker(dist_url, rank, workers_per_machine, how):
    """A worker of this machine died (``how``): say so, and tell every worker of the run through the rendezvous
    store, so that they stop at once instead of after the heartbeat timeout (not possible if it was rank 0, whose
    process hosts the store: the others then stop after the timeout, naming rank 0)."""
    message = f"{describe_rank(rank, workers_per_machine)} died: {how}: stopping every worker"
    print(f"error: {message}", file=sys.stderr, flush=True)
    if dist_url.startswith("tcp://"):
        parsed = urllib.parse.urlparse(dist_url)
        post_verdict(parsed.hostname, parsed.port, message)


def _spawn_and_forward_signals(nprocs, spawn_args, on_death=None):
    """``mp.spawn``, with SIGTERM / SIGUSR1 sent to this process forwarded to the workers (a scheduler may signal
    the launcher only), and a worker's preemption exit passed on as this process's exit code. A worker killed by a
    signal is reported to ``on_death(local_rank, how)`` before torch stops its siblings."""
    context = mp.start_processes(_distributed_worker, args=spawn_args, nprocs=nprocs, join=False, daemon=False,
                                 start_method="spawn")

    def forward(signum, frame):
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS} if in_main_thread else {}
    killed = None
    try:
        while True:
            ended = multiprocessing.connection.wait(list(context.sentinels))  # until a worker ends
            for sentinel in ended:
                local_rank = context.sentinels[sentinel]
                process = context.processes[local_rank]
                process.join(5)  # its exit code (the sentinel is ready a moment before it)
                if killed is None and process.exitcode is not None and process.exitcode < 0:
                    killed = local_rank
                    if on_death is not None:
                        on_death(local_rank, f"killed by {signal.Signals(-process.exitcode).name}")
            if context.join(timeout=0):
                break
    except mp.ProcessExitedException as e:
        if e.exit_code in (JOIN_FAILED_EXIT_CODE, PEER_LOST_EXIT_CODE) or killed is not None:  # said why
            raise SystemExit(e.exit_code if killed is None else PEER_LOST_EXIT_CODE) from None
        if e.exit_code == PREEMPTED_EXIT_CODE:
            print("Training was stopped by a stop signal after writing a checkpoint (OUTPUT_DIR/last_checkpoint): "
                  "run the same command with --resume to continue", file=sys.stderr)
            raise Preempted() from None
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _backend(kind: str) -> str:
    return "nccl" if kind == "cuda" else "gloo"


def _die_with_the_launcher(launcher_pid: int) -> None:
    """Linux: the worker gets SIGKILL when the launcher dies (kill -9 included) instead of training on as an
    orphan that holds its GPU and port."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: nothing to ask the kernel
        return
    if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
        os._exit(1)


def _distributed_worker(
    local_rank, main_func, world_size, num_workers_per_machine, machine_rank, dist_url, args, timeout, kind,
    launcher_pid, join_timeout, heartbeat_timeout,
):
    _die_with_the_launcher(launcher_pid)
    global_rank = machine_rank * num_workers_per_machine + local_rank
    if kind == "cuda":
        torch.cuda.set_device(local_rank)  # before the process group: NCCL binds to the current device
    if not dist_url.startswith("tcp://"):
        dist.init_process_group(
            backend=_backend(kind), init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout
        )
        _setup_worker(num_workers_per_machine, kind)
        main_func(*args)
        return
    try:
        store = _rendezvous(dist_url, world_size, global_rank, num_workers_per_machine, join_timeout)
    except JoinError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(JOIN_FAILED_EXIT_CODE)
    parsed = urllib.parse.urlparse(dist_url)
    heartbeat = Heartbeat(store, global_rank, world_size, num_workers_per_machine, heartbeat_timeout,
                          where=f"the rendezvous store at {parsed.hostname}:{parsed.port}").start()
    try:
        dist.init_process_group(backend=_backend(kind), store=store, world_size=world_size, rank=global_rank,
                                timeout=timeout)
        _setup_worker(num_workers_per_machine, kind)
        main_func(*args)
    except SystemExit:  # preempted (every worker stops alike)
        heartbeat.finish()
        raise
    except BaseException as e:
        # a collective failing here is usually the echo of a peer's death: the heartbeat names it (and ends
        # this process) within its timeout; an error of this worker's own stops the others at once
        if is_communication_error(e) and heartbeat.await_verdict() is not None:
            raise
        heartbeat.finish(describe_error(e, 1000))
        raise
    heartbeat.finish()


class JoinError(RuntimeError):
    """The workers did not all join: the message names who is missing and what to do."""


def _rendezvous(dist_url, world_size, rank, workers_per_machine, join_timeout):
    """The TCPStore at ``tcp://HOST:PORT`` (hosted by rank 0) with every rank checked in: while ranks are missing,
    rank 0 says which (and their machines) every 30 s; after ``join_timeout`` every waiting rank gives up with a
    JoinError naming them, and a rank that cannot reach the store says so."""
    parsed = urllib.parse.urlparse(dist_url)
    minutes = f"{join_timeout.total_seconds() / 60:g} min"
    try:
        store = dist.TCPStore(parsed.hostname, parsed.port, world_size, is_master=(rank == 0), timeout=join_timeout,
                              wait_for_workers=False)
    except (RuntimeError, OSError) as e:  # torch's DistStoreError is a RuntimeError
        where = "open" if rank == 0 else "reach machine 0 at"
        raise JoinError(
            f"rank {rank} could not {where} {parsed.hostname}:{parsed.port} within {minutes} ({str(e).splitlines()[0]}"
            "): start machine 0 (--machine-rank 0) with the same --dist-url, use a free port, or raise --dist-timeout"
        ) from None
    store.set(f"largebatch/joined/{rank}", socket.gethostname())
    store.add("largebatch/joined", 1)
    start = last_said = time.monotonic()
    while store.add("largebatch/joined", 0) < world_size:  # one request a second per rank, whatever the world size
        waited = time.monotonic() - start
        late = waited > join_timeout.total_seconds()
        if late or (rank == 0 and time.monotonic() - last_said >= 30):
            # who is missing: one request per rank, only to say it (rank 0 every 30 s, everyone when giving up)
            missing = [r for r in range(world_size) if not store.check([f"largebatch/joined/{r}"])]
            if not missing:  # the last one arrived meanwhile
                continue
            machines = sorted({r // workers_per_machine for r in missing})
            who = f"rank(s) {missing} (machine(s) {machines} of --num-machines {world_size // workers_per_machine})"
            if late:
                raise JoinError(f"{who} did not join {dist_url} within {minutes}: start them with their "
                                "--machine-rank and the same --dist-url, or raise --dist-timeout")
            print(f"waiting for {who} to join {dist_url}: {waited:.0f} s of {minutes}", file=sys.stderr, flush=True)
            last_said = time.monotonic()
        time.sleep(1.0)
    return store


def _join_torchrun_group(main_func, args, timeout, kind):
    local_rank = int(os.environ["LOCAL_RANK"])
    if kind == "cuda":
        torch.cuda.set_device(local_cuda_device(local_rank))
    if not dist.is_initialized():
        dist.init_process_group(backend=_backend(kind), init_method="env://", timeout=timeout)
    _setup_worker(_torchrun_local_size(local_rank), kind)
    main_func(*args)


def _torchrun_local_size(local_rank: int) -> int:
    """Workers on this machine: LOCAL_WORLD_SIZE (torchrun sets it), else the ranks that share this host name.

    detectron2's ``comm`` takes machine m to hold ranks [m * L, (m + 1) * L): a launch that numbers ranks
    otherwise is refused here with what to fix, instead of pairing GPUs of different machines."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if "LOCAL_WORLD_SIZE" in os.environ:
        local_size = int(os.environ["LOCAL_WORLD_SIZE"])
        same_host = None
    else:
        hosts = [None] * world_size
        dist.all_gather_object(hosts, socket.gethostname())
        same_host = [r for r, h in enumerate(hosts) if h == hosts[rank]]
        local_size = len(same_host)
    first = rank - local_rank
    expected = list(range(first, first + local_size))
    if world_size % local_size or rank % local_size != local_rank or (same_host is not None and same_host != expected):
        raise RuntimeError(
            f"rank {rank} of {world_size} with LOCAL_RANK {local_rank} and {local_size} workers on its machine: "
            "expected the same number of workers on every machine and RANK = machine rank x workers per machine "
            "+ LOCAL_RANK (set LOCAL_WORLD_SIZE, or start the workers with torchrun)"
        )
    return local_size


def _setup_worker(num_workers_per_machine, kind):
    """Local process group as detectron2's ``comm`` expects it, and the CPU threads of a CPU worker."""
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
    if kind == "cpu":
        # share the machine's cores between its workers instead of oversubscribing them
        torch.set_num_threads(max(1, _available_cpus() // num_workers_per_machine))
    comm.synchronize()
