"""``Heartbeat``: when a worker or a whole machine dies, every other worker ends within about ``timeout`` seconds
(``train_net.py --heartbeat-timeout``, default 60) with one line naming the rank, instead of waiting in a
collective until its own timeout (30 min) runs out.

It runs through the TCPStore of the rendezvous (``launch._rendezvous``, hosted by rank 0), on a connection of its
own, in two daemon threads per worker (one beats, one watches the time since the store last answered):

- every worker adds 1 to its counter every ``interval`` seconds, and reads the one verdict key;
- rank 0 also reads all counters at once (one ``multi_get``) and, when one has not moved for ``timeout`` seconds
  (a killed process, a lost machine, a process that cannot run for that long), writes the verdict naming it;
- a worker that ends sets its counter to "done", or to "failed: <its error>": a failure is the verdict, acted on
  after one more beat (a worker that fails alike meanwhile ends with its own error);
- a worker that cannot reach the store for ``timeout`` seconds names rank 0, which hosts it (machine 0 gone).

On a verdict the thread prints it (``error: ...``) and ends the process with ``PEER_LOST_EXIT_CODE``: the main
thread may be blocked in a collective that never returns. Cost: one store request per worker per interval
(5 s), and rank 0's read of world-size counters per interval; no collective, nothing on the GPU.
"""
import logging
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, Optional

import torch.distributed as dist

__all__ = ["DEFAULT_HEARTBEAT_TIMEOUT", "PEER_LOST_EXIT_CODE", "Heartbeat", "describe_rank", "is_communication_error",
           "post_verdict"]

DEFAULT_HEARTBEAT_TIMEOUT = 60.0  # seconds without a beat after which a worker counts as dead
#: EX_UNAVAILABLE: another worker or machine of the run died; this one stopped after saying which
PEER_LOST_EXIT_CODE = 69
_PREFIX = "largebatch/heartbeat"
_VERDICT = f"{_PREFIX}/verdict"  # the first message that stops every worker
logger = logging.getLogger("largebatch")


def is_communication_error(error: BaseException) -> bool:
    """A collective or store failure, typically the echo of a peer that died (gloo: "Connection reset by peer";
    NCCL: a DistBackendError); not the error that a worker raised on its own."""
    text = str(error)
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(s in text for s in ("gloo", "NCCL", "Connection", "connection")))


def describe_rank(rank: int, workers_per_machine: int) -> str:
    return f"rank {rank} (machine {rank // workers_per_machine})"


def post_verdict(host: str, port: int, message: str) -> bool:
    """Tell every worker of the run, through the store at ``host:port``, to stop with ``message`` (the first verdict
    stays); False if the store cannot be reached (its host, rank 0, is gone too)."""
    try:
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=5), wait_for_workers=False)
        store.compare_set(_VERDICT, "", message)
        return True
    except Exception:  # noqa: BLE001 - unreachable, for whatever reason
        return False


def _exit_with(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(PEER_LOST_EXIT_CODE)


class Heartbeat:
    """The heartbeat of worker ``rank`` of ``world_size`` over ``store`` (a TCPStore; cloned, so the caller's
    connection stays free for the process group). ``start()`` starts the thread, ``finish(failure)`` ends it
    with "done" or "failed: ..."; ``on_verdict(message)`` defaults to printing it and exiting the process."""

    def __init__(self, store, rank: int, world_size: int, workers_per_machine: int,
                 timeout: float = DEFAULT_HEARTBEAT_TIMEOUT, interval: Optional[float] = None,
                 where: str = "the rendezvous store", on_verdict: Callable[[str], None] = _exit_with):
        self.rank, self.world_size, self.workers_per_machine = rank, world_size, workers_per_machine
        self.timeout = float(timeout)
        self.interval = interval if interval is not None else min(5.0, self.timeout / 6)
        self.where, self.on_verdict = where, on_verdict
        self.store = store.clone()
        # a request never blocks much longer than a beat (the store host may be gone without closing the socket)
        self.store.set_timeout(timedelta(seconds=max(2 * self.interval, 1.0)))
        self.verdict: Optional[str] = None
        self._stop = threading.Event()
        self._last_contact = time.monotonic()
        self._keys = [f"{_PREFIX}/{r}" for r in range(world_size)]  # every worker's counter
        self._key = self._keys[rank]
        self.store.add(self._key, 1)
        if rank == 0:  # every counter exists from the start: one that never moves is a worker that never beat
            for key in self._keys[1:]:
                self.store.add(key, 0)
        self._threads = [threading.Thread(target=self._beat, name="largebatch-heartbeat", daemon=True),
                         threading.Thread(target=self._deadline, name="largebatch-heartbeat-deadline", daemon=True)]

    def who(self, rank: int) -> str:
        return describe_rank(rank, self.workers_per_machine)

    def start(self) -> "Heartbeat":
        for thread in self._threads:
            thread.start()
        return self

    def _decide(self, message: str) -> None:
        if self.verdict is None:
            self.verdict = message
            self._stop.set()
            self.on_verdict(message)

    def _beat(self) -> None:
        last_values, last_change = {}, {}
        while not self._stop.wait(self.interval):
            try:
                self.store.add(self._key, 1)
                verdict = self.store.get(_VERDICT).decode() if self.store.check([_VERDICT]) else None
                if self.rank == 0 and verdict is None:
                    verdict = self._watch(self.store.multi_get(self._keys), last_values, last_change)
                    if verdict is not None:
                        self.store.compare_set(_VERDICT, "", verdict)
                        verdict = self.store.get(_VERDICT).decode()  # the first one stays
                        # the store lives in this process: leave the others time to read the verdict from it
                        time.sleep(2 * self.interval)
            except Exception:  # noqa: BLE001 - an unreachable store: the deadline thread decides when to give up
                continue
            self._last_contact = time.monotonic()
            if verdict is not None:
                # a worker that failed on its own (a divergence raises on every worker at once): one beat for this
                # worker to end with the same error of its own before it is stopped with the other's
                if " failed: " in verdict and self._stop.wait(self.interval):
                    return
                self._decide(verdict)
                return

    def _watch(self, values, last_values, last_change) -> Optional[str]:
        """Rank 0: the verdict on the counters (None: every worker alive or done)."""
        now = time.monotonic()
        quiet = {}  # rank -> seconds since its counter last moved
        for rank, value in enumerate(v.decode() for v in values):
            if value.startswith("failed: "):
                return f"{self.who(rank)} {value}: stopping every worker"
            if value != last_values.get(rank) or value == "done":
                last_values[rank], last_change[rank] = value, now
            else:
                quiet[rank] = now - last_change[rank]
        if not any(q > self.timeout for q in quiet.values()):
            return None
        # a lost machine: all of its workers at once, also those whose last beat came a little later (a busy
        # machine's beats slip; a live worker's counter moves every interval, so half the timeout is no live one)
        silent = sorted(rank for rank, q in quiet.items() if q > self.timeout / 2)
        return (f"{', '.join(self.who(r) for r in silent)} stopped responding: no heartbeat for {self.timeout:g} s "
                "(killed, its machine lost, or stuck; --heartbeat-timeout): stopping every worker")

    def _deadline(self) -> None:
        while not self._stop.wait(self.interval):
            if time.monotonic() - self._last_contact > self.timeout:
                self._decide(f"rank 0 (machine 0), which holds {self.where}, cannot be reached for {self.timeout:g} s "
                             "(killed, or its machine lost; --heartbeat-timeout): stopping every worker")
                return

    def await_verdict(self, seconds: Optional[float] = None) -> Optional[str]:
        """Wait up to ``seconds`` (default: long enough for any verdict to come) for a verdict; None if none came."""
        deadline = time.monotonic() + (seconds if seconds is not None else self.timeout + 4 * self.interval)
        while self.verdict is None and time.monotonic() < deadline and any(t.is_alive() for t in self._threads):
            time.sleep(0.1)
        return self.verdict

    def finish(self, failure: Optional[str] = None) -> None:
        """This worker ended: "done", or "failed: <failure>" (the others stop within two beats). Rank 0, which hosts
        the store, waits (at most ``timeout``) for the others to end, so none of them loses the store while it ends."""
        self._stop.set()
        try:
            self.store.set(self._key, f"failed: {failure}" if failure else "done")
            if self.rank == 0:
                deadline = time.monotonic() + (2 * self.interval if failure else self.timeout)
                while time.monotonic() < deadline and any(
                        not v.startswith((b"done", b"failed")) for v in self.store.multi_get(self._keys)):
                    time.sleep(min(self.interval, 0.5))
        except Exception as e:  # noqa: BLE001 - the store is gone: there is nobody left to tell
            logger.debug("heartbeat: could not say that rank %d ended: %s", self.rank, e)
