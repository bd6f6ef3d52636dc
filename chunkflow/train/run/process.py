"""The process a run lives in: its device, its distributed context, Ctrl-C, determinism."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
import threading

import torch

from chunkflow.train.config import TrainConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--train.device=cuda but no CUDA device is available (this torch "
                         f"build: {torch.__version__}); use --train.device=cpu")
    return torch.device(name)


def init_parallel(cfg: TrainConfig):
    """This rank's distributed context under torchrun (WORLD_SIZE > 1); for one process, the
    1x1x1 layout's stand-in without a process group."""
    from chunkflow.parallel import LocalContext, init_distributed, is_distributed_launch

    if not is_distributed_launch():
        par = cfg.parallel
        if par.pp * par.tp > 1:
            need = par.pp * par.tp
            raise ValueError(f"--parallel.pp={par.pp} x --parallel.tp={par.tp} needs at least "
                             f"{need} processes, one per stage and tensor-parallel rank; valid: "
                             f"launch with torchrun --nproc-per-node {need} -m chunkflow train "
                             f"..., or pp=1 and tp=1")
        return LocalContext(resolve_device(cfg.train.device))
    return init_distributed(pp=cfg.parallel.pp, tp=cfg.parallel.tp,
                            device=resolve_device(cfg.train.device),
                            timeout_s=cfg.parallel.timeout_s)


STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1"}
"""Signals that stop a run after its step, with a checkpoint: Ctrl-C, SIGTERM (what SLURM and
Kubernetes send before they kill a job) and SIGUSR1 (what ``sbatch --signal`` sends)."""


def exit_code(signum: int) -> int:
    """A run stopped by ``signum`` (after saving) exits with the shell's code for it,
    128 + the signal's number: 130 after Ctrl-C, 143 after SIGTERM, 138 after SIGUSR1."""
    return 128 + signum


class StopRequest:
    """The first stop signal (:data:`STOP_SIGNALS`): finish the step, save, exit. A second one
    while the step runs stops at once (KeyboardInterrupt); while a checkpoint is being written
    (:meth:`saving`) it waits for the checkpoint, which is then complete, and stops after it."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._saving = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        name = STOP_SIGNALS.get(signum, f"signal {signum}")
        if self.requested:
            if self._saving:
                print(f"\nchunkflow: {name} while saving a checkpoint: it is finished first",
                      file=sys.stderr, flush=True)
                return
            raise KeyboardInterrupt
        self.signum = signum
        again = "Ctrl-C" if signum == signal.SIGINT else name
        print(f"\nchunkflow: {name}; finishing this step and saving a checkpoint ({again} "
              f"again to abort without saving)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def saving(self):
        """A checkpoint is written inside: a second signal does not cut it short."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


@contextlib.contextmanager
def deterministic(enabled: bool):
    """torch.use_deterministic_algorithms for the run only, not for the rest of the process."""
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
    torch.use_deterministic_algorithms(enabled or previous)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
