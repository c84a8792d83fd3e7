"""A dead worker or machine ends every worker within the heartbeat timeout, with one line naming the rank.

The heartbeat threads of several "workers" run here in one process over one TCPStore (short timeouts, verdicts
recorded instead of ending the process); the end-to-end runs kill a worker, or a whole "machine" (a launcher's
process group), of a two-machine train_net.py launch on 127.0.0.1."""
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from helpers import REPO, SHAPES_CONFIG, script_env
from largebatch.engine.heartbeat import PEER_LOST_EXIT_CODE, Heartbeat, post_verdict

TIMEOUT, INTERVAL = 2.0, 0.1  # generous: the suite shares 2 busy cores


def _workers(world_size, store=None, workers_per_machine=1, interval=INTERVAL, timeout=TIMEOUT):
    store = store or dist.TCPStore("127.0.0.1", 0, world_size, True, timedelta(seconds=10), wait_for_workers=False)
    verdicts = {}
    beats = [Heartbeat(store, r, world_size, workers_per_machine, timeout=timeout, interval=interval,
                       on_verdict=lambda message, r=r: verdicts.setdefault(r, message)) for r in range(world_size)]
    return store, [b.start() for b in beats], verdicts


def _wait(condition, seconds):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_a_worker_that_stops_beating_is_named_to_every_other_worker():
    _, beats, verdicts = _workers(4, workers_per_machine=2)
    time.sleep(3 * INTERVAL)
    beats[3]._stop.set()  # as kill -9: no "done", no more beats
    assert _wait(lambda: len(verdicts) == 3, 10 * TIMEOUT), verdicts
    assert sorted(verdicts) == [0, 1, 2]
    assert all(v.startswith("rank 3 (machine 1) stopped responding: no heartbeat for 2 s") for v in verdicts.values())


def test_the_workers_of_a_lost_machine_are_named_together():
    _, beats, verdicts = _workers(4, workers_per_machine=2)
    time.sleep(3 * INTERVAL)
    beats[2]._stop.set()
    beats[3]._stop.set()
    assert _wait(lambda: 0 in verdicts, 10 * TIMEOUT), verdicts
    assert verdicts[0].startswith("rank 2 (machine 1), rank 3 (machine 1) stopped responding"), verdicts


def test_a_lost_machines_workers_are_named_together_when_their_last_beats_differ():
    """A busy machine's beats slip: rank 3's last beat came 0.6 s after rank 2's (of a 2 s timeout); when rank 2 is
    past the timeout, rank 3, silent for over half of it, is named with it."""
    _, beats, verdicts = _workers(4, workers_per_machine=2)
    time.sleep(3 * INTERVAL)
    beats[2]._stop.set()
    time.sleep(0.6)
    beats[3]._stop.set()
    assert _wait(lambda: 0 in verdicts, 10 * TIMEOUT), verdicts
    assert verdicts[0].startswith("rank 2 (machine 1), rank 3 (machine 1) stopped responding"), verdicts


def test_a_failed_worker_stops_the_others_at_once():
    _, beats, verdicts = _workers(3)
    beats[1].finish("RuntimeError: out of memory")
    assert _wait(lambda: len(verdicts) == 2, 5 * TIMEOUT), verdicts
    assert verdicts[0] == verdicts[2] == "rank 1 (machine 1) failed: RuntimeError: out of memory: stopping every worker"


def test_workers_that_fail_alike_each_end_with_their_own_error():
    """A divergence raises on every worker at once: none is stopped with another's error instead of its own."""
    store, beats, verdicts = _workers(3, interval=0.5, timeout=5.0)  # a beat of grace: 0.5 s
    time.sleep(1.0)
    beats[2].finish("FloatingPointError: Training diverged at iteration 9")
    assert _wait(lambda: store.check(["largebatch/heartbeat/verdict"]), 5 * TIMEOUT)  # rank 0 saw it: the others'
    beats[1].finish("FloatingPointError: Training diverged at iteration 9")  # own errors come within a beat
    beats[0].finish("FloatingPointError: Training diverged at iteration 9")
    time.sleep(2.0)
    assert not verdicts, verdicts


def test_workers_that_end_normally_get_no_verdict_and_rank_0_waits_for_them():
    _, beats, verdicts = _workers(3)
    time.sleep(2 * INTERVAL)
    beats[2].finish()
    time.sleep(3 * TIMEOUT)  # a finished worker beats no more: not a dead one
    beats[1].finish()
    start = time.monotonic()
    beats[0].finish()
    assert time.monotonic() - start < TIMEOUT and not verdicts


def test_a_verdict_posted_from_outside_reaches_every_worker():
    """What a launcher does when one of its own workers dies: it knows first, and says which."""
    store, beats, verdicts = _workers(2)
    assert post_verdict("127.0.0.1", store.port, "rank 1 (machine 0) died: killed by SIGKILL")
    assert _wait(lambda: len(verdicts) == 2, 5 * TIMEOUT), verdicts
    assert set(verdicts.values()) == {"rank 1 (machine 0) died: killed by SIGKILL"}
    assert not post_verdict("127.0.0.1", 1, "nobody listens on port 1")


def test_a_worker_that_loses_the_store_names_rank_0():
    """Machine 0 (rank 0 hosts the store) gone: the others stop after the timeout, naming it."""
    host = subprocess.Popen([sys.executable, "-c", "import sys, time, torch.distributed as d; "
                             "s = d.TCPStore('127.0.0.1', 0, 2, True, wait_for_workers=False); "
                             "print(s.port, flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(host.stdout.readline())
        store = dist.TCPStore("127.0.0.1", port, 2, False, timedelta(seconds=10), wait_for_workers=False)
        verdicts = {}
        beat = Heartbeat(store, 1, 2, 1, timeout=TIMEOUT, interval=INTERVAL, where="the store at here",
                         on_verdict=lambda message: verdicts.setdefault(1, message)).start()
        time.sleep(3 * INTERVAL)
        assert not verdicts
        host.kill()
        assert _wait(lambda: verdicts, 10 * TIMEOUT), "no verdict"
        assert verdicts[1].startswith("rank 0 (machine 0), which holds the store at here, cannot be reached for 2 s")
        assert beat.await_verdict(0) == verdicts[1]
    finally:
        host.kill()
        host.wait()


# -----------------------------------------------------------------------------------------------------------------
# end to end: two "machines" of one worker each on 127.0.0.1
# -----------------------------------------------------------------------------------------------------------------
def _start_machines(tmp_path, port, *extra):
    common = ["--num-gpus", "1", "--num-machines", "2", "--dist-url", f"tcp://127.0.0.1:{port}", *extra,
              "--config-file", SHAPES_CONFIG, "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "5000",
              "DATASETS.TEST", "()", "MONITOR.PERIOD", "1"]
    return [subprocess.Popen([sys.executable, "train_net.py", "--machine-rank", str(rank), *common,
                              "OUTPUT_DIR", str(tmp_path / str(rank))],
                             cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # a process group per "machine"
            for rank in (0, 1)]


def _wait_for_training(tmp_path, procs):
    records = tmp_path / "0" / "layer_stats.jsonl"
    assert _wait(lambda: records.exists() or any(p.poll() is not None for p in procs), 300), "training never started"
    assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs]


def _workers_of(pid):
    """The worker processes a launcher spawned (not multiprocessing's resource tracker)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                spawned = b"spawn_main" in f.read()
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid and spawned:
            found.append(int(entry))
    return found


@pytest.mark.slow
def test_a_killed_machine_ends_the_other_with_a_line_naming_its_rank(tmp_path, free_port):
    """kill -9 of machine 1's whole process group (launcher and worker): machine 0 stops after the heartbeat
    timeout (10 s here, 60 s by default) instead of the collectives' 30 minutes."""
    procs = _start_machines(tmp_path, free_port, "--heartbeat-timeout", "10")
    try:
        _wait_for_training(tmp_path, procs)
        os.killpg(procs[1].pid, signal.SIGKILL)
        start = time.monotonic()
        log = procs[0].communicate(timeout=120)[0]
        assert time.monotonic() - start < 60, log[-3000:]
        assert procs[0].returncode == PEER_LOST_EXIT_CODE, log[-3000:]
        errors = [line for line in log.splitlines() if line.startswith("error: ")]
        assert errors and "rank 1 (machine 1) stopped responding" in errors[0], log[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()


@pytest.mark.slow
def test_a_killed_worker_is_named_by_its_launcher_and_the_other_machine_stops_at_once(tmp_path, free_port):
    """kill -9 of machine 1's worker alone: its launcher sees it die, says so, and posts the verdict; machine 0 stops
    within a beat, naming the rank, long before the heartbeat timeout (60 s)."""
    procs = _start_machines(tmp_path, free_port)
    try:
        _wait_for_training(tmp_path, procs)
        (worker,) = _workers_of(procs[1].pid)
        os.kill(worker, signal.SIGKILL)
        start = time.monotonic()
        logs = [p.communicate(timeout=120)[0] for p in procs]
        assert time.monotonic() - start < 40, logs[0][-2000:] + logs[1][-2000:]
        assert [p.returncode for p in procs] == [PEER_LOST_EXIT_CODE] * 2, logs[0][-2000:] + logs[1][-2000:]
        for log in logs:
            errors = [line for line in log.splitlines() if line.startswith("error: ")]
            assert errors and "rank 1 (machine 1) died: killed by SIGKILL" in errors[0], log[-3000:]
            # the launchers end with that line, not with a traceback of their own (detectron2 logs the collective's
            # error in the worker that was in it)
            assert log.strip().splitlines()[-1] == errors[0] and "ProcessExitedException" not in log, log[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
