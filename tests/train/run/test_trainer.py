"""The training loop: metrics, checkpoints, exact resume (also after SIGKILL), Ctrl-C, NaN."""

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
from chunkflow.runtime import compiled
from chunkflow.train import TrainingError
from chunkflow.train.config import load_config, read_toml
from chunkflow.train.run.trainer import Trainer, lr_at

# A small, fast job: the tiny model on short synthetic sequences, chains of up to 5 chunks.
SMALL = {"data.synthetic_max_len": "300", "data.batch_size": "6", "chunking.chunk_size": "64",
         "log.progress": "false", "optim.warmup_steps": "2"}


def args(run_dir: Path, **overrides) -> list[str]:
    merged = dict(SMALL, **{"train.output_dir": str(run_dir)}, **overrides)
    return [f"--{k}={v}" for k, v in merged.items()]


def config(run_dir: Path, **overrides):
    return load_config(None, dict(SMALL, **{"train.output_dir": str(run_dir)}, **overrides))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def write_jsonl(path: Path, num: int, *, bad_line: int | None = None) -> Path:
    """Text records of varied length, one malformed line when asked."""
    lines = []
    for i in range(num):
        text = f"record {i}: " + "abcdefgh"[i % 8] * (5 + (i * 37) % 200)
        lines.append("{broken" if i == bad_line else json.dumps({"text": text}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_run_writes_metrics_config_and_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *args(run, **{"train.steps": "5", "checkpoint.interval": "2",
                                        "checkpoint.keep_last": "2"})]) == 0
    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for key in ("loss", "lr", "grad_norm", "supervised_tokens", "chunks", "packing_efficiency",
                "peak_memory_bytes", "step_time_s", "tokens_per_s"):
        assert all(isinstance(r[key], (int, float)) for r in records), key
    assert all(r["sequences"] == 6 and 0 < r["packing_efficiency"] <= 1 for r in records)
    # every 2 steps and at the end, keeping the last 2: step 2 was deleted
    assert sorted(p.name for p in run.glob("step-*")) == ["step-00000004", "step-00000005"]
    final = run / "step-00000005"
    assert {p.name for p in final.iterdir()} >= {"model.safetensors", "config.json",
                                                 "optimizer", "rng.pt", "trainer_state.json"}
    assert json.loads((final / "trainer_state.json").read_text())["step"] == 5
    # the optimizer state is a torch.distributed.checkpoint (sharded by rank; here one rank)
    assert {p.name for p in (final / "optimizer").iterdir()} == {".metadata", "__0_0.distcp"}
    # everything but the weights loads with weights_only (no pickled code)
    torch.load(final / "rng.pt", weights_only=True)
    assert read_toml(run / "config.toml") == config(run, **{"train.steps": "5",
                                                           "checkpoint.interval": "2",
                                                           "checkpoint.keep_last": "2"})
    out = capsys.readouterr().out
    assert "done: step 5/5, loss" in out


def test_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, **kw) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert lr_at(9, **kw) == pytest.approx(0.55)  # half way: (0.1 + 1) / 2
    assert lr_at(14, **kw) == pytest.approx(0.1)


def test_resume_equals_uninterrupted_run_bitwise(tmp_path):
    """File data with a shuffle buffer, a skipped bad record and a token budget per batch."""
    data = write_jsonl(tmp_path / "data.jsonl", 30, bad_line=7)  # 7 steps cross an epoch
    common = {"data.path": str(data), "data.shuffle_buffer": "16", "data.skip_invalid": "true",
              "data.batch_tokens": "700", "train.steps": "7", "checkpoint.interval": "3",
              "eval.path": str(write_jsonl(tmp_path / "eval.jsonl", 6)), "eval.interval": "2"}
    Trainer(config(tmp_path / "a", **common)).run()

    # dies in step 5, after the step-3 checkpoint and a logged step 4
    crash_after(Trainer(config(tmp_path / "b", **common)), 4)
    partial = tmp_path / "b" / ".step-00000006.tmp-x"  # what a kill during a save leaves
    partial.mkdir()
    resumed = Trainer(config(tmp_path / "b", **common, **{"checkpoint.resume": "true"}))
    assert resumed.step == 3 and not partial.exists()
    resumed.run()

    assert_bitwise_equal(weights(tmp_path / "a" / "step-00000007"),
                         weights(tmp_path / "b" / "step-00000007"))
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    # step 4 logged once, not twice (the run's last evaluation is a line of its own)
    assert [r["step"] for r in b if "loss" in r] == list(range(1, 8))
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b]
    assert [r.get("eval_loss") for r in a] == [r.get("eval_loss") for r in b]
    state = json.loads((tmp_path / "b" / "step-00000007" / "trainer_state.json").read_text())
    assert state["data_stats"]["skipped"] == 1 and state["data_position"]["epoch"] >= 1


def crash_after(trainer: Trainer, step: int) -> None:
    """Run ``trainer`` until it dies in the step after ``step`` (as a kill would stop it)."""
    train_step = trainer.train_step

    def crash(*batch, **kwargs):
        if trainer.step == step:
            raise KeyboardInterrupt
        return train_step(*batch, **kwargs)

    trainer.train_step = crash
    with pytest.raises(KeyboardInterrupt):
        trainer.run()


def kill_when(path: Path, argv: list[str]) -> None:
    """Start ``chunkflow train *argv`` and SIGKILL it once ``path`` exists."""
    proc = subprocess.Popen([sys.executable, "-m", "chunkflow", "train", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(path, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training exited early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM,
                                 signal.SIGUSR1])
def test_killed_run_resumes_bitwise_and_ctrl_c_saves(tmp_path, sig):
    """SIGKILL loses the steps since the last checkpoint; Ctrl-C, SIGTERM (what SLURM and
    Kubernetes send before a kill) and SIGUSR1 (sbatch --signal) finish the step, save it and
    exit with 128 + the signal's number."""
    steps = {"train.steps": "12", "checkpoint.interval": "3"}
    assert main(["train", *args(tmp_path / "a", **steps)]) == 0

    run = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "chunkflow", "train", *args(run, **steps)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(run / "step-00000003", proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    done = metrics(run)[-1]["step"]
    assert done < 12, "the run finished before the signal: the test proved nothing"
    if sig != signal.SIGKILL:  # finish the step, save it, exit 128 + signal
        assert proc.returncode == 128 + sig, err
        name = {signal.SIGINT: "Ctrl-C"}.get(sig, signal.Signals(sig).name)
        assert f"chunkflow: {name}; finishing this step and saving" in err
        assert f"interrupted: step {done}/12" in out and (run / f"step-{done:08d}").is_dir()
        assert f"continue with: chunkflow train --train.output_dir {run} --resume" in out
    else:
        assert proc.returncode == -signal.SIGKILL
    assert main(["train", *args(run, **steps), "--resume"]) == 0
    assert_bitwise_equal(weights(tmp_path / "a" / "step-00000012"),
                         weights(run / "step-00000012"))


def test_a_second_signal_during_the_save_leaves_a_complete_checkpoint(tmp_path, capsys):
    """SIGTERM, then SIGTERM again while the checkpoint is written (a scheduler that signals
    twice): the save finishes, the run stops after it, and the checkpoint resumes."""
    trainer = Trainer(config(tmp_path, **{"train.steps": "6", "checkpoint.interval": "0"}))
    train_step, save = trainer.train_step, trainer.checkpoints.save

    def step(*batch, **kwargs):
        record = train_step(*batch, **kwargs)
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    def save_signalled(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)  # handled before the save goes on
        return save(*a, **kw)

    trainer.train_step, trainer.checkpoints.save = step, save_signalled
    summary = trainer.run()
    assert summary.stop_signal == signal.SIGTERM and summary.steps_done == 2
    assert "while saving a checkpoint: it is finished first" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".step", "step"))] == [
        "step-00000002"]
    resumed = Trainer(config(tmp_path, **{"train.steps": "6", "checkpoint.interval": "0",
                                          "checkpoint.resume": "true"}))
    assert resumed.step == 2


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, capsys):
    trainer = Trainer(config(tmp_path, **{"train.steps": "5", "checkpoint.interval": "2"}))
    forward_backward = trainer.engine.forward_backward

    def poisoned(batch, **kwargs):
        result = forward_backward(batch, **kwargs)
        if trainer.step == 2:  # the third step diverges
            result.loss = torch.tensor(float("nan"))
        return result

    trainer.engine.forward_backward = poisoned
    with pytest.raises(TrainingError, match=r"step 3: loss nan.*stopped before updating the "
                                            r"weights; the last checkpoint, .*step-00000002, is "
                                            r"intact"):
        trainer.run()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002"]
    saved = weights(tmp_path / "step-00000002")
    for name, p in trainer.model.state_dict().items():
        assert torch.equal(p, saved[name]), name  # no update after the checkpoint


def test_nan_exits_1_from_the_command_line(tmp_path, capsys):
    assert main(["train", *args(tmp_path, **{"train.steps": "2", "optim.lr": "1e30",
                                             "optim.warmup_steps": "0",
                                             "optim.grad_clip": "0"})]) == 1
    assert "chunkflow: training stopped: step 2: loss nan" in capsys.readouterr().err


def test_existing_checkpoints_are_never_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *args(run, **{"train.steps": "1"})]) == 0
    before = (run / "step-00000001" / "model.safetensors").read_bytes()
    assert main(["train", *args(run, **{"train.steps": "1"})]) == 2
    assert "already holds checkpoints (step-00000001); pass --resume" in capsys.readouterr().err
    assert (run / "step-00000001" / "model.safetensors").read_bytes() == before
    assert main(["train", *args(tmp_path / "empty"), "--resume"]) == 2
    assert "--resume: no checkpoint" in capsys.readouterr().err
    assert main(["train", *args(tmp_path / "x", **{"checkpoint.resume_from": str(tmp_path)})]) == 2
    assert "cannot be used: " in (err := capsys.readouterr().err) and "holds no weights" in err
    # refused starts leave no run directory behind
    assert not (tmp_path / "empty").exists() and not (tmp_path / "x").exists()


def test_tensorboard_and_cpu_autocast(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *args(run, **{"train.steps": "2", "log.tensorboard": "true",
                                        "train.autocast": "bf16",
                                        "train.deterministic": "true"})]) == 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert all(r["loss"] > 0 for r in metrics(run))
    assert not torch.are_deterministic_algorithms_enabled()  # only for the run


def test_resume_after_a_partial_metrics_line(tmp_path):
    """SIGKILL while appending to metrics.jsonl leaves half a line; resuming drops it."""
    run = tmp_path / "run"
    assert main(["train", *args(run, **{"train.steps": "2", "checkpoint.interval": "1"})]) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.')
    assert main(["train", *args(run, **{"train.steps": "3"}), "--resume"]) == 0
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]


def test_default_job_learns(tmp_path):
    """The README's main job, shortened: the built-in data is learnable and the loss falls."""
    run = tmp_path / "run"
    assert main(["train", f"--train.output_dir={run}", "--train.steps=30",
                 "--data.synthetic_max_len=1024", "--log.progress=false"]) == 0
    losses = [r["loss"] for r in metrics(run)]
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses


def test_bad_data_from_the_command_line(tmp_path, capsys):
    """Errors reach the user with file and line; skipped and truncated records are reported."""
    data = write_jsonl(tmp_path / "data.jsonl", 12, bad_line=4)
    common = {"data.path": str(data), "train.steps": "2"}
    assert main(["train", *args(tmp_path / "a", **common)]) == 2
    assert f"chunkflow: error: {data}:5: malformed JSON" in capsys.readouterr().err
    assert main(["train", *args(tmp_path / "b", **common, **{"data.skip_invalid": "true",
                                                             "data.max_length": "100"})]) == 0
    out = capsys.readouterr().out
    assert f"warning: skipping invalid records (--data.skip_invalid); first: {data}:5" in out
    summary = out.splitlines()[-1]
    assert "1 invalid record skipped" in summary and "truncated to max_length 100" in summary
    assert metrics(tmp_path / "b")[-1]["skipped"] == 1
    assert main(["train", *args(tmp_path / "c", **{"data.path": str(tmp_path / "nope.jsonl")})]) == 2
    assert "--data.path: " in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    assert main(["train", *args(tmp_path / "d", **{"data.path": str(tmp_path / "empty.jsonl")})]) == 2
    assert "no usable records" in capsys.readouterr().err


def test_results_do_not_depend_on_chunking(tmp_path):
    """One optimizer step per global batch: chunk_size and k change nothing but memory/speed."""
    final = {}
    for name, chunk_size, k in (("chained", 64, 1), ("k2", 48, 2), ("whole", 4096, 1)):
        run = tmp_path / name
        assert main(["train", *args(run, **{"train.steps": "3", "model.dtype": "float64",
                                            "chunking.chunk_size": chunk_size,
                                            "chunking.k": k})]) == 0
        assert (name == "whole") == all(r["chains"] == 0 for r in metrics(run))
        final[name] = weights(run / "step-00000003")
    for name in ("chained", "k2"):
        for key, ref in final["whole"].items():
            torch.testing.assert_close(final[name][key], ref, rtol=1e-9, atol=1e-12)


def test_cuda_requested_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["train", *args(tmp_path, **{"train.device": "cuda"})]) == 2
    assert "--train.device=cuda but no CUDA device is available" in capsys.readouterr().err


def test_resume_from_another_run_then_resume_that_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *args(a, **{"train.steps": "3", "checkpoint.interval": "1"})]) == 0
    assert main(["train", *args(b, **{"train.steps": "4", "checkpoint.resume_from":
                                      str(a / "step-00000002")})]) == 0
    assert "resuming from" in capsys.readouterr().out
    # b's saved config does not point back at a: --resume continues b's own checkpoints
    assert main(["train", "--config", str(b / "config.toml"), "--train.steps=5", "--resume"]) == 0
    assert "(step 4)" in capsys.readouterr().out
    assert [r["step"] for r in metrics(b)] == [3, 4, 5]
    # into a directory with another history, or with both flags: refused, nothing deleted
    assert main(["train", *args(b, **{"checkpoint.resume_from": str(a / "step-00000003")})]) == 2
    assert "holds checkpoints of another history (newest step-00000005)" in (
        capsys.readouterr().err)
    assert main(["train", *args(b, **{"checkpoint.resume_from": str(a / "step-00000003")}),
                 "--resume"]) == 2
    assert "both --resume and --checkpoint.resume_from" in capsys.readouterr().err
    assert sorted(p.name for p in b.glob("step-*")) == ["step-00000004", "step-00000005"]


def test_resume_refuses_other_data_and_applies_new_optimizer_settings(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *args(run, **{"train.steps": "2"})]) == 0
    assert main(["train", *args(run, **{"train.steps": "3", "data.batch_size": "5"}),
                 "--resume"]) == 2
    assert ("cannot resume" in (err := capsys.readouterr().err)
            and "--data.batch_size=5 (the checkpoint has 6)" in err)
    trainer = Trainer(config(run, **{"train.steps": "3", "optim.weight_decay": "0.5",
                                     "optim.beta2": "0.5", "checkpoint.resume": "true"}))
    out = capsys.readouterr().out
    assert "note: resuming with changed settings: " in out and "optim.beta2 0.95 -> 0.5" in out
    group = trainer.optimizer.param_groups[0]
    assert group["weight_decay"] == 0.5 and group["betas"] == (0.9, 0.5)


def test_a_batch_without_targets_is_skipped_and_counted_and_resume_moves_past_it(tmp_path,
                                                                                  capsys):
    """Issue 13.5: one unsupervised global batch used to stop the run for good (exit 1, and
    --resume replayed the same batch). Now it is skipped, counted, and the data moves on."""
    records = [{"input_ids": [1, 2, 3, 4], "labels": [-100] * 4} if i in (2, 3) else
               {"input_ids": [1 + i, 2, 3, 4 + i]} for i in range(10)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = {"data.path": str(data), "data.shuffle_buffer": "0", "data.batch_size": "2",
              "checkpoint.interval": "1"}
    assert main(["train", *args(tmp_path / "a", **common, **{"train.steps": "3"})]) == 0
    out = capsys.readouterr().out
    assert f"warning: the global batch {data}:3 .. {data}:4 has no supervised token: skipped" in out
    assert "1 global batch without a supervised token skipped" in out.splitlines()[-1]
    steps = metrics(tmp_path / "a")
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["empty_batches"] for r in steps] == [0, 1, 1]
    state = json.loads((tmp_path / "a" / "step-00000003" / "trainer_state.json").read_text())
    assert state["data_position"]["index"] == 8 and state["empty_batches"] == 1  # moved on

    # stopped right before the empty batch, resumed: the same run
    assert main(["train", *args(tmp_path / "b", **common, **{"train.steps": "1"})]) == 0
    assert main(["train", *args(tmp_path / "b", **common, **{"train.steps": "3"}),
                 "--resume"]) == 0
    assert_bitwise_equal(weights(tmp_path / "a" / "step-00000003"),
                         weights(tmp_path / "b" / "step-00000003"))

    # --train.epochs counts steps, not batches: the empty one is not a step
    assert main(["train", *args(tmp_path / "e", **dict(common, **{"train.epochs": "1"}))]) == 0
    assert "train.epochs=1: 4 steps" in (out := capsys.readouterr().out)
    assert "done: step 4/4" in out and [r["step"] for r in metrics(tmp_path / "e")] == [1, 2, 3, 4]

    # --train.max_empty_batches in a row stop the run, and the steps before are saved
    empty = {"input_ids": [1, 2, 3], "labels": [-100] * 3}
    more = [records[i] for i in (0, 1, 4, 5)] + [empty] * 6
    data.write_text("".join(json.dumps(r) + "\n" for r in more))
    assert main(["train", *args(tmp_path / "s", **{
        "data.path": str(data), "data.shuffle_buffer": "0", "data.batch_size": "2",
        "train.steps": "9", "checkpoint.interval": "0", "train.max_empty_batches": "2"})]) == 1
    assert "the steps so far are saved in" in capsys.readouterr().err
    assert (tmp_path / "s" / "step-00000002").is_dir()

    # only --train.max_empty_batches in a row stop the run
    data.write_text(json.dumps({"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}) + "\n")
    assert main(["train", *args(tmp_path / "r", **{"data.path": str(data), "train.steps": "1",
                                                    "train.max_empty_batches": "3"})]) == 1
    err = capsys.readouterr().err
    assert "3 global batches in a row have no supervised token" in err
    assert "--train.max_empty_batches=3" in err
    assert not (tmp_path / "r").exists()  # no step ran: no run directory left behind


def test_nan_gradient_stops_the_run(tmp_path):
    trainer = Trainer(config(tmp_path, **{"train.steps": "2"}))
    forward_backward = trainer.engine.forward_backward

    def poisoned(batch, **kwargs):
        result = forward_backward(batch, **kwargs)
        next(trainer.model.parameters()).grad[0, 0] = float("inf")
        return result

    trainer.engine.forward_backward = poisoned
    with pytest.raises(TrainingError, match=r"step 1: loss [0-9.]+, gradient norm (inf|nan).*no "
                                            r"checkpoint was saved yet"):
        trainer.run()


def test_epochs_count_the_steps_and_read_every_record_exactly_that_often(tmp_path, capsys):
    """--train.epochs: the step count comes from the data (shuffled, token-budget batches);
    the last batch takes what is left; epoch boundaries are reported (issue 13.9: the data
    used to wrap around without a word)."""
    data = write_jsonl(tmp_path / "data.jsonl", 23)
    lengths = [len(json.loads(line)["text"]) for line in data.read_text().splitlines()]
    common = {"data.path": str(data), "data.shuffle_buffer": "5", "data.batch_tokens": "600",
              "train.epochs": "2", "checkpoint.interval": "2"}
    assert main(["train", *args(tmp_path / "a", **common)]) == 0
    out = capsys.readouterr().out
    records = metrics(tmp_path / "a")
    steps = len(records)
    assert f"train.epochs=2: {steps} steps (global batches) in 2 pass(es)" in out
    assert sum(r["tokens"] for r in records) == 2 * sum(lengths)  # every record twice
    assert sum(r["sequences"] for r in records) == 2 * 23
    assert records[-1]["epoch"] == pytest.approx(2.0) and 0 < records[0]["epoch"] < 1
    assert "data: epoch 1 complete (23 records read); step " in out
    assert "wraps around" not in out and "2.00 passes over the data" in out.splitlines()[-1]

    # killed mid-run and resumed: the same weights
    crash_after(Trainer(config(tmp_path / "b", **common)), 3)
    Trainer(config(tmp_path / "b", **common, **{"checkpoint.resume": "true"})).run()
    final = f"step-{steps:08d}"
    assert_bitwise_equal(weights(tmp_path / "a" / final), weights(tmp_path / "b" / final))

    # by steps, the stream wraps around, and says so
    assert main(["train", *args(tmp_path / "c", **{"data.path": str(data),
                                                    "train.steps": "12"})]) == 0
    assert "; the data wraps around (--train.epochs" in capsys.readouterr().out
    assert main(["train", *args(tmp_path / "d", **{"train.epochs": "1"})]) == 2
    assert "--train.epochs=1 needs data files" in capsys.readouterr().err
    assert main(["train", *args(tmp_path / "e", **{"train.epochs": "1", "train.steps": "3",
                                                    "data.path": str(data)})]) == 2
    assert "set one of them" in capsys.readouterr().err


def test_each_step_records_how_long_the_loop_waited_for_its_batch(tmp_path, capsys, monkeypatch):
    """A data stream that takes 0.2 s per global batch, read in the loop (no prefetching): every
    step's record says so, with the wait's share of the step, and the progress line shows it."""
    import time as time_module

    import chunkflow.train.run.trainer as trainer_module

    real = trainer_module.global_batches

    def slow(*a, **kw):
        for item in real(*a, **kw):
            time_module.sleep(0.2)
            yield item

    monkeypatch.setattr(trainer_module, "global_batches", slow)
    run = tmp_path / "run"
    assert main(["train", *args(run, **{"train.steps": "3", "log.interval": "1",
                                        "data.prefetch": "0"})]) == 0
    out = capsys.readouterr().out
    records = metrics(run)
    assert len(records) == 3
    for r in records:
        assert r["data_wait_s"] >= 0.2, r
        share = r["data_wait_s"] / (r["data_wait_s"] + r["step_time_s"])
        assert r["data_wait_share"] == pytest.approx(share) and 0 < share < 1
        line = next(x for x in out.splitlines() if x.startswith(f"step {r['step']}/3 "))
        assert f"data {r['data_wait_share']:4.0%}" in line, line


def test_the_step_plan_is_made_in_the_prefetch_thread_and_used_by_the_step(tmp_path):
    """With --data.prefetch the chunk plan and action list of each global batch are built in
    the prefetch thread (the zero-bubble schedules take a simulation to build), and the step
    runs exactly those; the run is bitwise the one planned in the loop."""
    import threading

    from chunkflow.parallel.engine import ParallelEngine

    where, used = [], []
    prepare, forward_backward = ParallelEngine.prepare, ParallelEngine.forward_backward

    def recording_prepare(self, seq_lens, **kw):
        where.append(threading.current_thread().name)
        return prepare(self, seq_lens, **kw)

    def recording_step(self, batch, *, prepared=None):
        used.append(prepared is not None
                    and prepared.seq_lens == tuple(len(x["input_ids"]) for x in batch))
        return forward_backward(self, batch, prepared=prepared)

    runs = {}
    for depth in ("2", "0"):
        where.clear()
        used.clear()
        ParallelEngine.prepare, ParallelEngine.forward_backward = (recording_prepare,
                                                                   recording_step)
        try:
            trainer = Trainer(config(tmp_path / depth, **{"train.steps": "3",
                                                          "data.prefetch": depth}))
            trainer.run()
        finally:
            ParallelEngine.prepare, ParallelEngine.forward_backward = prepare, forward_backward
        assert used == [True] * 3
        thread = "chunkflow-prefetch" if depth != "0" else threading.main_thread().name
        assert set(where) == {thread}, where
        runs[depth] = weights(tmp_path / depth / "step-00000003")
    assert_bitwise_equal(runs["2"], runs["0"])


def test_compiled_run_trains_as_the_eager_one_and_counts_its_graphs(tmp_path):
    """--train.compile: the losses of an eager run (float32, so to float32 rounding), and
    metrics.jsonl's compiled_graphs, which stops growing once every graph is compiled."""
    torch.compiler.reset()
    before = compiled.COUNTER.graphs  # (one count per process)
    steps = {"train.steps": "4"}
    assert main(["train", *args(tmp_path / "eager", **steps)]) == 0
    assert main(["train", *args(tmp_path / "compiled", **steps, **{"train.compile": "true"})]) == 0
    eager, comp = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    for e, c in zip(eager, comp, strict=True):
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-5)
        assert "compiled_graphs" not in e
    graphs = [r["compiled_graphs"] - before for r in comp]
    # grad and no-grad forwards, each for the first length and then any (automatic dynamic)
    assert 1 <= graphs[0] <= graphs[-1] <= 4, graphs
    torch.compiler.reset()
