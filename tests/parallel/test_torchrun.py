"""`torchrun -m chunkflow train` on CPU gloo ranks ends where one process ends, and resumes
exactly on its layout and to rounding on another (DP with DDP and FSDP2, PP, TP and their
products; one process is a layout too)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chunkflow.cli import main

# float64, so one process and several ranks agree to rounding; chains of up to 5 chunks; a
# vocabulary of 259, which TP and FSDP2 split unevenly.
JOB = {"model.vocab_size": "259", "data.synthetic_max_len": "300", "data.batch_size": "7",
       "chunking.chunk_size": "64", "log.progress": "false", "optim.warmup_steps": "2",
       "model.dtype": "float64", "train.steps": "4", "checkpoint.interval": "2",
       "parallel.timeout_s": "60"}


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


def launch(nproc: int, run_dir: Path, options: dict, **overrides) -> str:
    """Train on ``nproc`` processes (torchrun) or in this one; its stdout."""
    if nproc == 1:
        assert main(["train", *args(run_dir, **options, **overrides)]) == 0
        return ""
    out = torchrun(nproc, run_dir, **options, **overrides)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def layout(*, pp: int = 1, tp: int = 1, data_parallel: str = "ddp") -> dict[str, str]:
    """Every layout option spelled out: a resumed run reads the others from the run's config."""
    return {"parallel.pp": str(pp), "parallel.tp": str(tp),
            "parallel.data_parallel": data_parallel}


ONE = DP2 = layout()
DP2_FSDP = layout(data_parallel="fsdp")
PP2 = layout(pp=2)
TP2 = DP2_TP2 = layout(tp=2)
DP2_TP2_FSDP = layout(tp=2, data_parallel="fsdp")
TP2_PP2 = layout(tp=2, pp=2)
DP2_PP2_FSDP = layout(pp=2, data_parallel="fsdp")
slow = pytest.mark.slow  # test_gradients checks each layout's step exactly, in one launch


@pytest.mark.parametrize("nproc,start,resume_nproc,resume_layout", [
    (2, DP2, 2, TP2),
    (2, PP2, 1, ONE),
    (2, TP2, 2, TP2),
    (4, DP2_TP2_FSDP, 4, TP2_PP2),
    pytest.param(1, ONE, 2, DP2_FSDP, marks=slow),
    pytest.param(2, DP2_FSDP, 1, ONE, marks=slow),
    pytest.param(4, DP2_PP2_FSDP, 2, DP2, marks=slow),
    pytest.param(4, TP2_PP2, 4, DP2_TP2, marks=slow),
], ids=["dp2-to-tp2", "pp2-to-1", "tp2-same", "dp2xtp2-fsdp-to-tp2xpp2", "1-to-dp2-fsdp",
        "dp2-fsdp-to-1", "dp2xpp2-fsdp-to-dp2", "tp2xpp2-to-dp2xtp2"])
def test_torchrun_matches_one_process_and_resumes_on_any_layout(
        tmp_path, single, nproc, start, resume_nproc, resume_layout):
    """Two steps on one layout, stopped, two more on the other: one process's four steps. (The
    same layout twice: bitwise the uninterrupted run's.)"""
    same = (nproc, start) == (resume_nproc, resume_layout)
    if same:
        launch(nproc, tmp_path / "full", start)
        final = weights(tmp_path / "full" / "step-00000004")
        assert_close(final, single)
    launch(nproc, tmp_path / "part", start, **{"train.steps": "2"})
    out = launch(resume_nproc, tmp_path / "part", resume_layout, **{"checkpoint.resume": "true"})
    if resume_nproc > 1:
        assert "resuming from" in out
        if not same:
            assert "weights and optimizer state resharded" in out
    again = weights(tmp_path / "part" / "step-00000004")
    if same:
        for name in final:
            assert torch.equal(again[name], final[name]), name
    else:  # another layout: the same sums in another order
        assert_close(again, single)

    lines = [json.loads(x) for x in
             (tmp_path / "part" / "metrics.jsonl").read_text().split("\n") if x]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    for records, n, options in ((lines[:2], nproc, start), (lines[2:], resume_nproc,
                                                             resume_layout)):
        dp = n // (int(options["parallel.pp"]) * int(options["parallel.tp"]))
        assert all(len(r["dp_chunks"]) == dp and r["dp_imbalance"] >= 1.0 for r in records)


def test_a_transformers_qwen2_run_at_tp2_resumes_at_dp2_fsdp_with_the_single_process_weights(
        tmp_path):
    """A tied-embedding transformers Qwen2 (--model.path, implementation hf): 2 steps at TP=2,
    then 2 more at DP=2 (FSDP2), end with one process's weights after 4 steps."""
    from tests.train.test_resume import chat_job, hf_args
    from tests.train.test_trainer_hf import model_dir

    model, data = model_dir(tmp_path, tied=True), str(chat_job(tmp_path))
    common = {"model.dtype": "float64", "parallel.timeout_s": "60"}

    def run(nproc: int, steps: int, **extra) -> str:
        options = dict(a[2:].split("=", 1) for a in hf_args(
            str(tmp_path / "run"), model, data, **common, **{"train.steps": str(steps)}, **extra))
        if nproc == 1:
            options["train.output_dir"] = str(tmp_path / "one")
            assert main(["train", *[f"--{k}={v}" for k, v in options.items()]]) == 0
            return ""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "chunkflow", "train",
               *[f"--{k}={v}" for k, v in options.items()]]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                             env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                  "PYTHONPATH": str(Path(__file__).parents[2])})
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    run(1, 4)
    assert "tp=2" in run(2, 2, **{"parallel.tp": "2"})
    out = run(2, 4, **{"parallel.tp": "1", "parallel.data_parallel": "fsdp",
                       "checkpoint.resume": "true"})
    assert "weights and optimizer state resharded" in out
    def untied(checkpoint: Path) -> dict:  # the one tied tensor is stored under either name
        state = weights(checkpoint)
        if "lm_head.weight" in state:
            state["model.embed_tokens.weight"] = state.pop("lm_head.weight")
        return state

    assert_close(untied(tmp_path / "run" / "step-00000004"),
                 untied(tmp_path / "one" / "step-00000004"))
