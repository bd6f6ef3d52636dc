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


class StopRequest:
    """First Ctrl-C: finish the step, save, exit. Second: stop at once (KeyboardInterrupt)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nchunkflow: interrupted; finishing this step and saving a checkpoint "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


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
