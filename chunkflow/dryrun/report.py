"""A dry run's findings: per rank role, what fits and how fast; as text and as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass

from chunkflow.dryrun.tracker import CATEGORIES
from chunkflow.plan.gpus import GPUSpec
from chunkflow.plan.units import format_size as format_bytes

BLIND_SPOTS = (
    "what a dry run cannot see: stream overlap (offload copies and collectives are assumed "
    "hidden behind compute), NCCL timing (no communication time is in the step time), the "
    "caching allocator's fragmentation (covered by the reserve), kernel efficiency (each op "
    "runs at the roofline: the larger of its FLOPs at peak and its bytes at memory bandwidth, "
    "so the step time is a lower bound and the MFU an upper bound)")


def _list(values) -> str:
    return ", ".join(map(str, values[:-1])) + f" and {values[-1]}"


@dataclass
class DryRunReport:
    cfg: object
    gpu: GPUSpec
    layout: object
    roles: list
    predicted_step_s: float
    model_flops: float
    """Forward and backward of every chunk once, over all GPUs (MFU's numerator)."""
    flops_per_step: float
    """What the step executes over all GPUs (recomputation included)."""
    batches: int
    target: str = "cuda"
    """The device type the step was run as (``--train.device=cpu``: CPU)."""

    @property
    def peak_device_bytes(self) -> int:
        return max(r.peak_device_bytes for r in self.roles)

    @property
    def host_pinned_bytes(self) -> int:
        return max(r.host_pinned_bytes for r in self.roles)

    @property
    def fits(self) -> bool:
        return self.peak_device_bytes <= self.gpu.usable_bytes

    @property
    def mfu(self) -> float:
        world = self.layout.world_size
        denominator = self.predicted_step_s * world * self.gpu.peak_bf16_flops
        return self.model_flops / denominator if denominator else 0.0

    def to_dict(self) -> dict:
        return {
            "fits": self.fits, "peak_device_bytes": self.peak_device_bytes,
            "device_capacity_bytes": self.gpu.capacity_bytes,
            "reserve_bytes": self.gpu.reserve_bytes,
            "host_pinned_bytes": self.host_pinned_bytes, "flops_per_step": self.flops_per_step,
            "model_flops_per_step": self.model_flops,
            "predicted_step_s": self.predicted_step_s, "mfu": self.mfu, "gpu": self.gpu.name,
            "target": self.target,
            "layout": {"dp": self.layout.dp, "pp": self.layout.pp, "tp": self.layout.tp},
            "ranks": [{"role": r.name, "rank": r.rank,
                       "peak_device_bytes": r.peak_device_bytes,
                       "breakdown": {c: r.breakdown[c] for c in CATEGORIES},
                       "most_bytes": {c: r.most.get(c, 0) for c in CATEGORIES},
                       "step_memory_peak_bytes": r.step_memory_peak_bytes,
                       "host_pinned_bytes": r.host_pinned_bytes, "flops": r.cost.flops,
                       "busy_s": r.cost.roofline_s, "dry_run_wall_s": r.wall_s,
                       "extrapolated_from_layers": list(r.layers_run),
                       "extrapolated_from_chunks": list(r.chunks_run)}
                      for r in self.roles],
            "cannot_see": BLIND_SPOTS,
        }

    def write_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    def format(self) -> str:
        gpu, lay = self.gpu, self.layout
        step = ("the CPU step (--train.device=cpu) priced" if self.target == "cpu" else "")
        lines = [f"dry run{' of ' + step if step else ''} on {lay.world_size} x {gpu.name} "
                 f"(dp={lay.dp}, pp={lay.pp}, tp={lay.tp}), the worst of {self.batches} global "
                 f"batch{'es' if self.batches > 1 else ''}; per rank role, live at its peak:"]
        header = f"  {'role':34s} {'peak':>9s} " + " ".join(f"{c[:13]:>13s}" for c in CATEGORIES)
        lines.append(header + f" {'host pinned':>11s}")
        for r in self.roles:
            lines.append(f"  {r.name:34s} {format_bytes(r.peak_device_bytes):>9s} "
                         + " ".join(f"{format_bytes(r.breakdown[c]):>13s}" for c in CATEGORIES)
                         + f" {format_bytes(r.host_pinned_bytes):>11s}")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(
            f"peak {format_bytes(self.peak_device_bytes)} per GPU: {verdict} in "
            f"{format_bytes(gpu.usable_bytes)} ({format_bytes(gpu.capacity_bytes)} less "
            f"{format_bytes(gpu.reserve_bytes)} reserved for the CUDA context, workspaces and "
            f"fragmentation)")
        if not self.fits:
            worst = max(self.roles, key=lambda r: r.peak_device_bytes)
            big = sorted(CATEGORIES, key=lambda c: -worst.breakdown[c])[:3]
            lines.append("  largest at the peak: " + ", ".join(
                f"{c} {format_bytes(worst.breakdown[c])}" for c in big))
        lines.append(
            f"FLOPs per step {self.flops_per_step:.3g} executed ({self.model_flops:.3g} model "
            f"FLOPs); predicted step {self.predicted_step_s:.3g} s at the roofline of "
            f"{gpu.peak_bf16_flops / 1e12:.0f} TFLOP/s and "
            f"{gpu.memory_bytes_per_s / 1e12:.2f} TB/s; MFU {self.mfu:.1%}")
        for r in self.roles:
            how = []
            if r.layers_run:
                how.append(f"its decoder layers from steps with {_list(r.layers_run)} (linear)")
            if r.chunks_run:
                how.append(f"its long chain from chains of {_list(r.chunks_run)} chunks (bytes "
                           f"linear, FLOPs and time quadratic)")
            if how:
                lines.append(f"extrapolated, {r.name}: {'; '.join(how)}; each fit checked "
                             f"by an extra step (--full-step runs them all)")
        lines.append(BLIND_SPOTS)
        return "\n".join(lines)
