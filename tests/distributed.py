"""Run a function in N gloo CPU worker processes on 127.0.0.1: the tests' stand-in for a multi-GPU launch.

    from distributed import run_workers

    def _worker(rank, world_size, scale):          # module level: "spawn" has to pickle it
        t = torch.full((1,), float(rank)) * scale
        dist.all_reduce(t)
        return t.item()                              # any picklable value (tensors included)

    assert run_workers(_worker, 4, 2.0) == [12.0] * 4

``fn(rank, world_size, *args)`` runs after ``dist.init_process_group("gloo", ...)`` in every worker (and, when
detectron2 is importable, after ``detectron2.utils.comm._LOCAL_PROCESS_GROUP`` is set up the way detectron2's
``launch`` leaves it: all workers are on one machine), with ``torch.set_num_threads(threads)``.
``run_workers`` returns the per-rank return values, in rank order.

A worker that raises makes ``run_workers`` raise ``WorkerError`` carrying the rank and the worker's formatted
traceback; the other workers (likely blocked in a collective with the failed one) are killed at once. A run
that takes longer than ``timeout`` seconds is killed and raises ``WorkerError`` as well; the same timeout
bounds each gloo collective, so a hung collective fails inside the worker with its own traceback.

Start method: "fork" by default (a forked worker inherits the already-imported torch/detectron2, so a
4-worker process group starts in well under a second, against several seconds per worker with "spawn", which
re-imports torch). Forking is safe here because no process group or other communication thread exists in
the parent, and each worker sets its intra-op thread count before doing any torch work (the parent's OpenMP
pool is not inherited by the child; tests/test_sync_bn.py checks that a fork after multi-threaded torch work
in the parent does not hang). Pass ``start_method="spawn"`` to get fresh interpreters (``fn`` and ``args``
must then be picklable, i.e. ``fn`` defined at module level of an importable module).

Results and tracebacks come back through pickle files in a temporary directory (``pickle`` proper, not
``multiprocessing``'s queue with torch's shared-memory tensor reductions, so a worker can exit right after
returning), which keeps the path from worker to test independent of the start method.
"""
import datetime
import multiprocessing
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback

__all__ = ["run_workers", "WorkerError", "free_port"]


class WorkerError(RuntimeError):
    """A worker raised, crashed or timed out; the message holds the worker's traceback."""

    def __init__(self, message, rank=None):
        super().__init__(message)
        self.rank = rank


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_start_method():
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _worker_main(fn, rank, world_size, args, port, result_dir, timeout, threads, sys_path):
    result_file = os.path.join(result_dir, f"rank{rank}.pkl")
    try:
        for p in reversed(sys_path):  # spawn: make the test's imports (tests/, projects/) resolvable
            if p not in sys.path:
                sys.path.insert(0, p)
        import torch
        import torch.distributed as dist

        if threads:
            torch.set_num_threads(threads)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            try:
                from detectron2.utils import comm
            except ImportError:
                comm = None
            if comm is not None and getattr(comm, "_LOCAL_PROCESS_GROUP", None) is None:
                # what detectron2's launch sets up: one machine, so the local group is every worker
                comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(world_size)))
            result = fn(rank, world_size, *args)
        finally:
            try:
                dist.destroy_process_group()
            except Exception:  # a failed collective can leave the group unusable; the result matters more
                pass
        payload = ("ok", result)
    except BaseException as e:  # noqa: B902 - report everything, including KeyboardInterrupt/SystemExit
        payload = ("error", f"{type(e).__name__}: {e}\n\n" + traceback.format_exc())
    try:
        data = pickle.dumps(payload)
    except Exception as e:
        data = pickle.dumps(("error", f"the return value of rank {rank} is not picklable: {e!r}"))
    tmp = result_file + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, result_file)  # the parent sees a complete file or none
    sys.stdout.flush()
    sys.stderr.flush()
    if payload[0] == "error":
        os._exit(1)


def _failure_error(result_dir, procs, failed_rank, world_size):
    """The WorkerError to raise: the first traceback written (the root cause; peers fail after it)."""
    errors = []
    for rank in range(world_size):
        path = os.path.join(result_dir, f"rank{rank}.pkl")
        payload = _read(result_dir, rank)
        if payload is not None and payload[0] == "error":
            errors.append((os.path.getmtime(path), rank, payload[1]))
    if not errors:
        return WorkerError(
            f"worker rank {failed_rank}/{world_size} died with exit code {procs[failed_rank].exitcode}",
            rank=failed_rank,
        )
    errors.sort()
    _, rank, text = errors[0]
    others = [r for _, r, _ in errors[1:]]
    tail = f"\n(ranks {others} failed after it)" if others else ""
    return WorkerError(f"worker rank {rank}/{world_size} raised:\n{text}{tail}", rank=rank)


def _read(result_dir, rank):
    path = os.path.join(result_dir, f"rank{rank}.pkl")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


def run_workers(fn, world_size, *args, timeout=120, start_method=None, threads=1):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo worker processes; return its results by rank.

    timeout: seconds for the whole run (and for each gloo collective); start_method: "fork" (default where
    available) or "spawn"; threads: ``torch.set_num_threads`` in each worker (0 leaves torch's default).
    Raises WorkerError with the failing rank's traceback when a worker raises, dies or the run times out.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = multiprocessing.get_context(start_method or _default_start_method())
    with tempfile.TemporaryDirectory(prefix="largebatch_dist_") as result_dir:
        port = free_port()
        procs = [
            ctx.Process(
                target=_worker_main,
                args=(fn, rank, world_size, args, port, result_dir, timeout, threads, list(sys.path)),
                name=f"largebatch-worker-{rank}",
                daemon=False,  # daemonic processes may not start children (DataLoader workers)
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failure = None
        try:
            while True:
                alive = [p for p in procs if p.is_alive()]
                for rank, p in enumerate(procs):
                    if not p.is_alive() and p.exitcode != 0:
                        failure = rank
                        break
                if failure is not None or not alive:
                    break
                if time.monotonic() > deadline:
                    break
                alive[0].join(0.05)
        finally:
            for p in procs:  # whatever is still running is blocked on a failed peer, or timed out
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(5)

        if failure is not None:
            raise _failure_error(result_dir, procs, failure, world_size)
        results = []
        for rank in range(world_size):
            payload = _read(result_dir, rank)
            if payload is None:
                raise WorkerError(
                    f"worker rank {rank}/{world_size} returned nothing within timeout={timeout}s "
                    f"(exit code {procs[rank].exitcode})",
                    rank=rank,
                )
            if payload[0] == "error":
                raise WorkerError(f"worker rank {rank}/{world_size} raised:\n{payload[1]}", rank=rank)
            results.append(payload[1])
        return results
