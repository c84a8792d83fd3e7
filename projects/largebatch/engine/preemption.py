"""Preemption: SIGTERM or SIGUSR1 (what SLURM and Kubernetes send before they stop a job) makes every worker finish
its step, write a checkpoint and exit with ``PREEMPTED_EXIT_CODE``; ``--resume`` then continues exactly.

The signal may reach one worker, all of them, or only the launcher (which forwards it to its workers, see
``launch``): a worker that receives it asks to stop (``LargeBatchStepper.request_stop``, a flag), the workers
agree on it in the next iteration's all-reduce, and all of them stop after that same iteration.
"""
import logging
import signal
import threading

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["PREEMPTED_EXIT_CODE", "STOP_SIGNALS", "Preempted", "PreemptionHook"]

#: EX_TEMPFAIL ("temporary failure, try again"): the job can be requeued and resumed with --resume
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
logger = logging.getLogger("largebatch")


class Preempted(SystemExit):
    """Training stopped on a stop signal after writing a checkpoint; the process exits with PREEMPTED_EXIT_CODE."""

    def __init__(self):
        super().__init__(PREEMPTED_EXIT_CODE)


class PreemptionHook(HookBase):
    """Turns SIGTERM / SIGUSR1 into a checkpoint and a clean exit of every worker (the last hook: the others have
    seen the iteration first)."""

    def before_train(self):
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Training runs outside the main thread: SIGTERM / SIGUSR1 do not checkpoint and stop it")
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.trainer.stepper.request_stop()

    def after_step(self):
        if not self.trainer.stepper.stop_agreed:
            return
        iteration = self.trainer.iter
        # every worker calls save (it gathers their random-generator states); the main process writes
        self.trainer.checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
        comm.synchronize()
        logger.warning(
            "Stopped by a stop signal (SIGTERM / SIGUSR1) after iteration %d, checkpoint written; exiting with code "
            "%d: run the same command with --resume to continue", iteration, PREEMPTED_EXIT_CODE,
        )
        raise Preempted()

    def after_train(self):
        for sig, handler in getattr(self, "_previous", {}).items():
            signal.signal(sig, handler)
