"""The process layout of a distributed run: data-parallel replicas x pipeline stages.

Ranks are laid out pipeline-major: ``rank = dp_rank * pp + stage``, so the stages of one replica
are consecutive ranks (one node's GPUs, where point-to-point traffic is cheapest) and the
data-parallel group of stage s is ``{s, pp + s, 2 pp + s, ...}``. A :class:`DeviceMesh` of shape
(dp, pp) names both groups; FSDP2 shards over its "dp" dimension.

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


@dataclass(frozen=True)
class Layout:
    """``dp`` data-parallel replicas of a ``pp``-stage pipeline."""

    dp: int
    pp: int

    def __post_init__(self):
        check_positive_int("dp", self.dp)
        check_positive_int("pp", self.pp)

    @property
    def world_size(self) -> int:
        return self.dp * self.pp

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp_rank, stage) of a global rank."""
        return divmod(rank, self.pp)

    def rank(self, dp_rank: int, stage: int) -> int:
        return dp_rank * self.pp + stage


class ParallelContext:
    """This rank's place in the layout and the process groups it talks over."""

    def __init__(self, layout: Layout, mesh: DeviceMesh, device: torch.device):
        self.layout, self.mesh, self.device = layout, mesh, device
        self.rank = dist.get_rank()
        self.dp_rank, self.stage = layout.coords(self.rank)
        self.dp_group = mesh.get_group("dp")
        self.pp_group = mesh.get_group("pp")

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.layout.pp - 1

    @property
    def prev_rank(self) -> int:
        return self.layout.rank(self.dp_rank, self.stage - 1)

    @property
    def next_rank(self) -> int:
        return self.layout.rank(self.dp_rank, self.stage + 1)

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
        dist.destroy_process_group()

    @property
    def comm_device(self) -> torch.device:
        """Where small control tensors live: NCCL needs them on the GPU, gloo on the CPU."""
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def is_distributed_launch() -> bool:
    """True under ``torchrun`` (or any launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(*, pp: int = 1, dp: int | None = None, device: torch.device,
                     timeout_s: float = 600.0) -> ParallelContext:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR/PORT) and build
    the (dp, pp) mesh. ``dp=None``: the world size divided by ``pp``."""
    pp = check_positive_int("pp", pp)
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if dp is None:
        if world % pp:
            raise ValueError(f"pp={pp} does not divide the world size {world}; valid: a divisor "
                             f"of {world}")
        dp = world // pp
    layout = Layout(dp=check_positive_int("dp", dp), pp=pp)
    if layout.world_size != world:
        raise ValueError(f"dp={dp} x pp={pp} = {layout.world_size} processes, but the launch has "
                         f"{world}; valid: dp x pp == WORLD_SIZE")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    mesh = init_device_mesh(device.type, (layout.dp, layout.pp), mesh_dim_names=("dp", "pp"))
    return ParallelContext(layout, mesh, device)
