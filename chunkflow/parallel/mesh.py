"""The process layout of a distributed run: data-parallel replicas x pipeline stages x tensor
parallel ranks.

Ranks are laid out tensor-major, then pipeline: ``rank = (dp_rank * pp + stage) * tp + tp_rank``,
so a stage's tensor-parallel group is consecutive ranks (the GPUs of one NVLink domain), then the
stages of one replica, and the data-parallel group of a (stage, tp_rank) is every ``pp * tp``-th
rank. A :class:`DeviceMesh` of shape (dp, pp, tp) names the three groups; FSDP2 shards over its
"dp" dimension, tensor parallelism (:mod:`chunkflow.parallel.tensor`) over "tp".

Every collective runs under the process group's timeout, so a rank that dies or stops answering
turns into an error on the others instead of a hang (gloo notices a closed peer at once; a silent
peer costs the timeout).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from chunkflow.plan.chunks import check_positive_int
from chunkflow.runtime.devices import normalize_device


@dataclass(frozen=True)
class Layout:
    """``dp`` data-parallel replicas of a ``pp``-stage pipeline, each stage over ``tp`` ranks
    (torchtitan's ``ParallelDims``); one process is the 1x1x1 layout."""

    dp: int
    """Data-parallel replicas: each trains its share of the global batch's chunks; DDP
    all-reduces gradients over them, FSDP2 also shards the weights and optimizer state."""
    pp: int
    """Pipeline stages: consecutive decoder layers per stage, chunks sent stage to stage."""
    tp: int = 1
    """Tensor-parallel ranks of one stage: each holds a slice of every layer's heads and MLP."""

    def __post_init__(self):
        check_positive_int("dp", self.dp)
        check_positive_int("pp", self.pp)
        check_positive_int("tp", self.tp)

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp_rank, stage) of a global rank."""
        return divmod(rank // self.tp, self.pp)

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def rank(self, dp_rank: int, stage: int, tp_rank: int = 0) -> int:
        return (dp_rank * self.pp + stage) * self.tp + tp_rank


class ParallelContext:
    """This rank's place in the layout and the process groups it talks over."""

    def __init__(self, layout: Layout, mesh: DeviceMesh, device: torch.device):
        self.layout, self.mesh, self.device = layout, mesh, device
        self.rank = dist.get_rank()
        self.dp_rank, self.stage = layout.coords(self.rank)
        self.tp_rank = layout.tp_rank(self.rank)
        self.dp_group = mesh.get_group("dp")
        self.pp_group = mesh.get_group("pp")
        self.tp_group = mesh.get_group("tp")

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def dp_enabled(self) -> bool:
        return self.layout.dp_enabled

    @property
    def pp_enabled(self) -> bool:
        return self.layout.pp_enabled

    @property
    def tp_enabled(self) -> bool:
        return self.layout.tp_enabled

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.layout.pp - 1

    @property
    def prev_rank(self) -> int:
        return self.layout.rank(self.dp_rank, self.stage - 1, self.tp_rank)

    @property
    def next_rank(self) -> int:
        return self.layout.rank(self.dp_rank, self.stage + 1, self.tp_rank)

    def barrier(self) -> None:
        dist.barrier()

    def broadcast_object(self, obj=None):
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        out = [None] * self.layout.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over every rank (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def all_max(self, value: int) -> int:
        """The largest ``value`` over every rank."""
        t = torch.tensor([value], dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def run_on_rank0(self, fn):
        """``fn()`` on rank 0, its result on every rank; if it raises, the same error is raised
        on every rank (so a refused setting stops the whole run, not just rank 0)."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:  # re-raised below, on every rank
                error = e
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        # Every rank done with its collectives before any tears its connections down (gloo
        # aborts a process whose peer closed the pair under a pending operation).
        dist.barrier()
        dist.destroy_process_group()

    @property
    def comm_device(self) -> torch.device:
        """Where small control tensors live: NCCL needs them on the GPU, gloo on the CPU."""
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


class LocalContext:
    """The 1x1x1 layout of one process, with :class:`ParallelContext`'s interface and no process
    group: the collectives are what they are over one rank, so code that saves, loads and agrees
    over a layout runs unchanged in a single process."""

    layout = Layout(dp=1, pp=1, tp=1)
    rank = dp_rank = stage = tp_rank = 0
    is_first_stage = is_last_stage = True

    def __init__(self, device: torch.device):
        self.device = normalize_device(device)  # cuda -> cuda:<current>, as ParallelContext's

    world_size = dp = pp = tp = 1
    dp_enabled = pp_enabled = tp_enabled = False

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj=None):
        return obj

    def all_gather_object(self, obj) -> list:
        return [obj]

    def all_sum(self, values: list[float]) -> list[float]:
        return [float(v) for v in values]

    def all_max(self, value: int) -> int:
        return int(value)

    @property
    def comm_device(self) -> torch.device:
        return self.device

    def run_on_rank0(self, fn):
        return fn()

    def close(self) -> None:
        pass


def is_distributed_launch() -> bool:
    """True under ``torchrun`` (or any launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(*, pp: int = 1, tp: int = 1, dp: int | None = None, device: torch.device,
                     timeout_s: float = 600.0) -> ParallelContext:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR/PORT) and build
    the (dp, pp, tp) mesh. ``dp=None``: the world size divided by ``pp * tp``."""
    pp, tp = check_positive_int("pp", pp), check_positive_int("tp", tp)
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if dp is None:
        if world % (pp * tp):
            raise ValueError(f"pp={pp} x tp={tp} does not divide the world size {world}; valid: "
                             f"pp x tp a divisor of {world}")
        dp = world // (pp * tp)
    layout = Layout(dp=check_positive_int("dp", dp), pp=pp, tp=tp)
    if layout.world_size != world:
        raise ValueError(f"dp={dp} x pp={pp} x tp={tp} = {layout.world_size} processes, but the "
                         f"launch has {world}; valid: dp x pp x tp == WORLD_SIZE")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    mesh = init_device_mesh(device.type, (layout.dp, layout.pp, layout.tp),
                            mesh_dim_names=("dp", "pp", "tp"))
    return ParallelContext(layout, mesh, device)
