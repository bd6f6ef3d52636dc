"""The GPUs chunkflow can plan for: dense bf16 peak, memory bandwidth and capacity, each sourced.

One table for every place that asks (``chunkflow plan --dry-run --gpu``, ``plan --auto``'s
profiles, ``make gpu-check``'s MFU). Datasheets quote bf16 "with sparsity" (2:4); the dense peak
is half. Capacity is what the driver reports (``torch.cuda.get_device_properties().total_memory``,
nvidia-smi's ``memory.total``), not the marketing figure: an "80GB" H100 reports 81,559 MiB.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2 ** 30
MiB = 2 ** 20


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_bf16_flops: float
    """Dense bf16 tensor-core FLOP/s."""
    memory_bytes_per_s: float
    """HBM bandwidth."""
    capacity_bytes: int
    device_names: tuple[str, ...]
    """Exact ``torch.cuda.get_device_name()`` strings of this product."""
    source: str

    @property
    def reserve_bytes(self) -> int:
        """What a run cannot use: the CUDA context, cuBLAS and NCCL workspaces (1 GiB) and
        the caching allocator's fragmentation (5% of capacity; ``expandable_segments`` lowers
        it). A dry run counts live tensors only, so it fits when its peak is under
        ``capacity - reserve``."""
        return GiB + self.capacity_bytes // 20

    @property
    def usable_bytes(self) -> int:
        return self.capacity_bytes - self.reserve_bytes


_H100_SXM = ("NVIDIA H100 datasheet, H100 SXM5: 1,979 TF bf16 with sparsity (132 SMs x 4,096 "
             "FLOP/clock x 1.83 GHz), HBM3 3.35 TB/s; nvidia-smi memory.total 81,559 MiB")

GPUS: dict[str, GPUSpec] = {spec.name.lower(): spec for spec in (
    GPUSpec("H100-80GB", 989.4e12, 3.35e12, 81559 * MiB, ("NVIDIA H100 80GB HBM3",), _H100_SXM),
    GPUSpec("H100-PCIe", 756.5e12, 2.0e12, 81559 * MiB, ("NVIDIA H100 PCIe",),
            "NVIDIA H100 datasheet, H100 PCIe: 1,513 TF bf16 with sparsity, HBM2e 2.0 TB/s"),
    GPUSpec("H100-NVL", 835.5e12, 3.9e12, 95830 * MiB, ("NVIDIA H100 NVL",),
            "NVIDIA H100 datasheet, H100 NVL: 1,671 TF bf16 with sparsity, 94 GB HBM3 3.9 TB/s"),
    GPUSpec("H200", 989.4e12, 4.8e12, 143771 * MiB, ("NVIDIA H200",),
            "NVIDIA H200 datasheet, H200 SXM: 1,979 TF bf16 with sparsity (H100 SXM5's "
            "compute), 141 GB HBM3e 4.8 TB/s; nvidia-smi memory.total 143,771 MiB"),
    GPUSpec("H200-NVL", 835.5e12, 4.8e12, 143771 * MiB, ("NVIDIA H200 NVL",),
            "NVIDIA H200 datasheet, H200 NVL: 1,671 TF bf16 with sparsity, 141 GB 4.8 TB/s"),
    GPUSpec("A100-80GB", 312e12, 2.039e12, 81920 * MiB,
            ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"),
            "NVIDIA A100 datasheet: 312 TF bf16 (624 with sparsity), 80 GB HBM2e 2,039 GB/s "
            "(SXM; PCIe 1,935 GB/s); total_memory 81,920 MiB"),
    GPUSpec("A100-40GB", 312e12, 1.555e12, 40960 * MiB,
            ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB"),
            "NVIDIA A100 datasheet: 312 TF bf16 (624 with sparsity), 40 GB HBM2 1,555 GB/s"),
    GPUSpec("L40S", 362.05e12, 864e9, 46068 * MiB, ("NVIDIA L40S",),
            "NVIDIA L40S datasheet: 362.05 TF bf16 (733 with sparsity), 48 GB GDDR6 864 GB/s"),
    GPUSpec("L4", 121e12, 300e9, 23034 * MiB, ("NVIDIA L4",),
            "NVIDIA L4 datasheet: 121 TF bf16 (242 with sparsity), 24 GB GDDR6 300 GB/s"),
    GPUSpec("A10", 125e12, 600e9, 23028 * MiB, ("NVIDIA A10",),
            "NVIDIA A10 datasheet: 125 TF bf16 (250 with sparsity), 24 GB GDDR6 600 GB/s"),
)}


def get_gpu_spec(name: str) -> GPUSpec:
    """The GPU called ``name`` (case-insensitive, as ``--gpu`` takes it)."""
    spec = GPUS.get(str(name).lower())
    if spec is None:
        raise ValueError(f"--gpu {name!r} is not a known GPU; valid: "
                         f"{', '.join(s.name for s in GPUS.values())}")
    return spec


def spec_for_device(device_name: str) -> GPUSpec | None:
    """The table's entry for exactly this ``torch.cuda.get_device_name()``, or None: no guessing
    from a substring ("H100" is 989 TF as SXM5, 756 as PCIe)."""
    for spec in GPUS.values():
        if device_name.strip() in spec.device_names:
            return spec
    return None
