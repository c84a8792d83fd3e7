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
traceback (the earliest exception: peers that fail because of it come after); the other workers (likely
blocked in a collective with the failed one) are killed at once. A run
that takes longer than ``timeout`` seconds is killed and raises ``WorkerError`` as well; each gloo collective
gives up after 0.8 x ``timeout``, so a collective that hangs (a peer never joins) fails inside the worker and
is reported with that worker's traceback.

Start method: "fork" by default. A forked worker inherits the already-imported torch/detectron2, so a
4-worker run costs about 0.3-1 s on 2 cores, against about 17 s with "spawn" (every worker
re-imports torch and detectron2). Forking is safe under two conditions, both kept here: no process group or
other communication thread exists in the parent (the test process never initializes torch.distributed), and
each forked worker runs torch single-threaded, set before it does any torch work. The second is not
optional: torch uses GNU OpenMP, which is not fork-safe; after the parent has run a parallel region (any
sizeable op), a forked child that enters one with 2 threads hangs (measured: all 4 workers stuck), while
with 1 thread it never enters the OpenMP pool (20 of 20 runs fine after multi-threaded conv/matmul in the
parent; tests/test_sync_bn.py repeats that check). Hence ``threads`` must be 1 with "fork". Pass
``start_method="spawn"`` for fresh interpreters or more threads per worker (``fn`` and ``args`` must then be
picklable: ``fn`` defined at module level of an importable module; the parent's sys.path is passed on).

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


def _write(result_file, payload):
    tmp = result_file + ".tmp"
    with open(tmp, "wb") as f:
        f.write(pickle.dumps(payload))
    os.replace(tmp, result_file)  # the parent sees a complete file or none


def _worker_main(fn, rank, world_size, args, port, result_dir, timeout, threads, sys_path):
    result_file = os.path.join(result_dir, f"rank{rank}.pkl")
    dist = None
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
            # a collective gives up before the run does, so that a hang is reported with the worker's traceback
            timeout=datetime.timedelta(seconds=max(1.0, 0.8 * timeout)),
        )
        try:
            from detectron2.utils import comm
        except ImportError:
            comm = None
        if comm is not None and getattr(comm, "_LOCAL_PROCESS_GROUP", None) is None:
            # what detectron2's launch sets up: one machine, so the local group is every worker
            comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(world_size)))
        payload = ("ok", fn(rank, world_size, *args))
    except BaseException as e:  # noqa: B902 - report everything, including KeyboardInterrupt/SystemExit
        payload = ("error", f"{type(e).__name__}: {e}\n\n" + traceback.format_exc(), time.time())
    try:
        _write(result_file, payload)
    except Exception as e:
        payload = ("error", f"the return value of rank {rank} is not picklable: {e!r}", time.time())
        _write(result_file, payload)
    # only now tear the group down: its peers fail (connection reset) after the root cause is on disk
    if dist is not None and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a failed collective can leave the group unusable; the result is saved
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    if payload[0] == "error":
        os._exit(1)


def _failure_error(result_dir, procs, failed_rank, world_size):
    """The WorkerError to raise: the earliest exception (the root cause; its peers fail after it)."""
    errors = []
    for rank in range(world_size):
        payload = _read(result_dir, rank)
        if payload is not None and payload[0] == "error":
            errors.append((payload[2], rank, payload[1]))  # (time it was caught, rank, traceback)
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
    start_method = start_method or _default_start_method()
    if start_method == "fork" and threads != 1:
        # GNU OpenMP is not fork-safe: once the parent has run a parallel region (any sizeable torch op), a
        # forked child that enters one with more than one thread hangs (seen: every worker stuck, threads=2).
        raise ValueError(f"start_method='fork' needs threads=1 (got {threads}); use start_method='spawn'")
    ctx = multiprocessing.get_context(start_method)
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
