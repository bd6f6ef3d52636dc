"""`torchrun -m chunkflow train` on CPU gloo ranks ends where one process ends, and resumes
exactly on its layout and to rounding on another (DP with DDP and FSDP2, PP, TP and their
products; one process is a layout too)."""

import json
import os
import signal
import subprocess
import sys
import time
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


# Every pipeline step's point-to-point messages, as the stage I/O issued them, are replayed
# under NCCL's rules (chunkflow.plan.messages): an order that would hang on GPUs fails the run.
ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "CHUNKFLOW_CHECK_MESSAGES": "1",
       "PYTHONPATH": str(Path(__file__).parents[2])}


def torchrun(nproc: int, run_dir: Path, *, module: str = "chunkflow",
             **overrides) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", module, "train", *args(run_dir, **overrides)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)


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
    from tests.train.checkpoint.test_resume import chat_job, hf_args
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
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
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


def held_out(tmp_path: Path) -> str:
    """Held-out records: a chain of 3 chunks (at chunk 64) and short ones."""
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"input_ids": [(7 * i + n) % 250 + 1 for i in range(n)]})
                            + "\n" for n in (150, 9, 40, 3, 70)))
    return str(path)


@pytest.mark.parametrize("nproc,options", [
    (4, {**layout(pp=4), "chunking.k": "1", "chunking.recompute": "selective"}),
    (4, {**layout(pp=2), "chunking.k": "2"}),
], ids=["pp4-k1-selective", "dp2xpp2-k2"])
def test_torchrun_pipeline_messages_replay_deadlock_free_under_nccl_rules(
        tmp_path, nproc, options):
    """Training and evaluation steps on pipeline layouts: each step's recorded messages replay
    without a deadlock under NCCL's rules (PP=2 and PP=2 x TP=2 are checked by the resume test's
    launches too)."""
    out = launch(nproc, tmp_path / "run", options, **{"train.steps": "2",
                 "checkpoint.interval": "0", "eval.path": held_out(tmp_path),
                 "eval.interval": "1"})
    assert "eval" in out


def test_torchrun_fails_on_a_stage_message_order_that_deadlocks_under_nccl(tmp_path):
    """The stage I/O's earlier order (every send posted as soon as computed, each receive alone)
    passes on gloo, which buffers sends, but hangs under NCCL: the replay stops the run and
    names the stuck ops."""
    out = torchrun(2, tmp_path / "run", module="tests.parallel.eager_messages",
                   **layout(pp=2), **{"train.steps": "3"})  # step 1 is one chunk: no message
    assert out.returncode != 0
    assert "deadlock under NCCL's point-to-point rules" in out.stderr, out.stderr[-3000:]
    assert "unmatched in flight: post" in out.stderr and ">>" in out.stderr


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize("target", ["agent", "one rank"])
def test_torchrun_sigterm_saves_at_one_step_on_every_rank_and_resumes_bitwise(tmp_path, target):
    """SIGTERM to torchrun (which passes it to every rank, at slightly different moments) or to
    one rank only: every rank stops after the same step, one whole checkpoint is saved, and the
    resumed run ends bitwise where an uninterrupted one does."""
    steps = {"train.steps": "12", "checkpoint.interval": "3", **DP2}
    launch(2, tmp_path / "full", steps)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "chunkflow", "train", *args(run, **steps)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    deadline = time.monotonic() + 240
    while not (run / "step-00000003").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(proc.pid if target == "agent" else workers[1], signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    checkpoints = sorted(p.name for p in run.glob("step-*"))
    done = int(checkpoints[-1][len("step-"):])
    assert 3 < done < 12, (checkpoints, out, err)  # stopped early, after a save of its own
    assert not list(run.glob(".step-*")), "a partial checkpoint was left"
    assert f"interrupted: step {done}/12" in out, out + err
    launch(2, run, steps, **{"checkpoint.resume": "true"})
    final, again = weights(tmp_path / "full" / "step-00000012"), weights(run / "step-00000012")
    for name in final:
        assert torch.equal(again[name], final[name]), name


def test_torchrun_prints_a_user_error_once(tmp_path):
    """Every rank runs the same command, so a bad option is one error, said by rank 0."""
    out = torchrun(2, tmp_path / "run", **{"chunking.chunk_size": "-5"})
    assert out.returncode != 0
    line = "chunkflow: error: --chunking.chunk_size=-5: must be a positive integer"
    assert (out.stdout + out.stderr).count(line) == 1, out.stderr
    assert "FutureWarning" not in out.stderr


def test_bf16_masters_reshard_from_pipeline_stages_to_fsdp_shards(tmp_path):
    """A bfloat16 model trained fully: each stage saves its bfloat16 weight shard and its float32
    master weights; resumed at DP=2 with FSDP2, each rank loads its shard of the masters, and
    the run ends with the weights of one process training in float32 throughout."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    bf16 = {"model.dtype": "bfloat16", "optim.warmup_steps": "10"}
    launch(1, tmp_path / "f32", ONE, **{**bf16, "model.dtype": "float32"})
    launch(2, tmp_path / "run", PP2, **bf16, **{"train.steps": "2"})
    shards = weights(tmp_path / "run" / "step-00000002")
    assert {t.dtype for t in shards.values()} == {torch.bfloat16}
    out = launch(2, tmp_path / "run", DP2_FSDP, **bf16, **{"checkpoint.resume": "true"})
    assert "weights and optimizer state resharded" in out
    final = tmp_path / "run" / "step-00000004"
    dcp_to_torch_save(final / "master_weights", tmp_path / "masters.pt")
    masters = torch.load(tmp_path / "masters.pt", weights_only=True)
    assert {t.dtype for t in masters.values()} == {torch.float32}
    assert_close(masters, weights(tmp_path / "f32" / "step-00000004"), tol=1e-5)
    assert {t.dtype for t in weights(final).values()} == {torch.bfloat16}
