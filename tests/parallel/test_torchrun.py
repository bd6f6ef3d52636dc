"""`torchrun -m chunkflow train` on CPU gloo ranks ends where one process ends, and resumes
exactly on its layout (DP with DDP and FSDP2, PP, DP x PP)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chunkflow.cli import main

# float64, so one process and several ranks agree to rounding; chains of up to 5 chunks.
JOB = {"data.synthetic_max_len": "300", "data.batch_size": "7", "chunking.chunk_size": "64",
       "log.progress": "false", "optim.warmup_steps": "2", "model.dtype": "float64",
       "train.steps": "4", "checkpoint.interval": "2", "parallel.timeout_s": "60"}


def args(run_dir: Path, **overrides) -> list[str]:
    return [f"--{k}={v}" for k, v in dict(JOB, **{"train.output_dir": str(run_dir)},
                                          **overrides).items()]


def torchrun(nproc: int, run_dir: Path, **overrides) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "chunkflow", "train", *args(run_dir, **overrides)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                              "PYTHONPATH": str(Path(__file__).parents[2])})
    return out


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint, whole or in pipeline-stage shards."""
    out = {}
    for f in sorted(checkpoint.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


def assert_close(a: dict, b: dict, tol: float = 1e-9):
    assert a.keys() == b.keys()
    for name in a:
        rel = float((a[name] - b[name]).norm() / b[name].norm())
        assert rel < tol, (name, rel)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run = tmp_path_factory.mktemp("single")
    assert main(["train", *args(run)]) == 0
    return weights(run / "step-00000004")


@pytest.mark.parametrize("nproc,layout", [
    (2, {"parallel.data_parallel": "ddp"}),
    (2, {"parallel.data_parallel": "fsdp"}),
    (2, {"parallel.pp": "2"}),
    (4, {"parallel.pp": "2", "parallel.data_parallel": "fsdp"}),
], ids=["dp2-ddp", "dp2-fsdp", "pp2", "dp2xpp2-fsdp"])
def test_torchrun_matches_one_process_and_resumes_exactly(tmp_path, single, nproc, layout):
    full = torchrun(nproc, tmp_path / "full", **layout)
    assert full.returncode == 0, full.stdout + full.stderr
    final = weights(tmp_path / "full" / "step-00000004")
    assert_close(final, single)

    # Stop after step 2 (its checkpoint), then resume on the same layout: the same weights.
    part = torchrun(nproc, tmp_path / "part", **layout, **{"train.steps": "2"})
    assert part.returncode == 0, part.stdout + part.stderr
    resumed = torchrun(nproc, tmp_path / "part", **layout, **{"checkpoint.resume": "true"})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stdout
    again = weights(tmp_path / "part" / "step-00000004")
    for name in final:
        assert torch.equal(again[name], final[name]), name

    # One process cannot continue a distributed checkpoint (or the reverse): a clear refusal.
    assert main(["train", *args(tmp_path / "part", **{"train.steps": "6",
                                                      "checkpoint.resume": "true"})]) == 2

    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().split("\n")
             if x]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    dp = nproc // int(layout.get("parallel.pp", 1))
    assert all(len(r["dp_chunks"]) == dp and r["dp_imbalance"] >= 1.0 for r in lines)
