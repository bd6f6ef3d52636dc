"""Resume as the README shows it, checkpoints that verify, and what a user loads from them.

Issue 13, items 1, 2, 6, 7 and 9 (permissions, empty run directories): each test reproduces a
failure of the trainer before the fix (noted in its docstring).
"""

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from chunkflow.cli import main
from chunkflow.train.checkpoint.store import checkpoint_problem
from chunkflow.train.data.tokenizer import ByteTokenizer
from tests.train.run.test_trainer import args, assert_bitwise_equal, kill_when, metrics, weights
from tests.train.test_trainer_hf import CHATS, model_dir


def chat_job(tmp_path: Path) -> Path:
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHATS * 4))
    return data


def hf_args(run: str, model: str, data: str, **extra) -> list[str]:
    options = {"model.path": model, "data.path": data, "chunking.chunk_size": "16",
               "data.batch_size": "3", "train.steps": "6", "checkpoint.interval": "2",
               # a warmup longer than any of these runs: the learning rate of a step does not
               # depend on the run's length, so a run stopped early (fewer --train.steps) and
               # resumed is the longer run (a warmup ratio would stretch with the run)
               "optim.warmup_steps": "10",
               "log.progress": "false", "train.output_dir": run, **extra}
    return [f"--{k}={v}" for k, v in options.items()]


def test_readme_resume_of_a_model_path_run_from_anywhere(tmp_path, monkeypatch, capsys):
    """Item 1: `chunkflow train --train.output_dir RUN --resume` ignored RUN/config.toml (built
    the tiny preset: "size mismatch"), relative paths broke it from another directory (leaving an
    empty run directory), and the same files by absolute path were "a different model, data"."""
    model_dir(tmp_path, tied=True)
    chat_job(tmp_path)
    monkeypatch.chdir(tmp_path)
    steps = {"train.steps": "20"}
    assert main(["train", *hf_args("runs/full", "model", "chats.jsonl", **steps)]) == 0
    kill_when(tmp_path / "runs/res/step-00000004", hf_args("runs/res", "model", "chats.jsonl",
                                                        **steps))
    assert not (tmp_path / "runs/res/step-00000020").exists(), "finished before the kill"
    saved = (tmp_path / "runs/res/config.toml").read_text()
    assert f'path = "{tmp_path / "model"}"' in saved  # stored absolute

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # the same command from another directory: nothing there, and nothing created
    assert main(["train", "--train.output_dir", "runs/res", "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err and not (elsewhere / "runs").exists()
    # the README's command, with the run directory as seen from here
    assert main(["train", "--train.output_dir", "../runs/res", "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"configuration: {tmp_path / 'runs/res/config.toml'}" in out
    assert "resuming from" in out and "size mismatch" not in out
    assert_bitwise_equal(weights(tmp_path / "runs/full/step-00000020"),
                         weights(tmp_path / "runs/res/step-00000020"))
    assert [r["step"] for r in metrics(tmp_path / "runs/res")] == list(range(1, 21))
    # the same files, by absolute path, are the same run
    assert main(["train", *hf_args(str(tmp_path / "runs/res"), str(tmp_path / "model"),
                                   str(tmp_path / "chats.jsonl"), **{"train.steps": "21"}),
                 "--resume"]) == 0


def test_checkpoints_are_hugging_face_model_directories(tmp_path):
    """Item 2: step-N/ had no tokenizer and no generation_config.json; AutoTokenizer returned a
    tokenizer of length 1 that encoded "Hello world" to []."""
    model = model_dir(tmp_path, tied=False)
    data = chat_job(tmp_path)
    run = tmp_path / "run"
    assert main(["train", *hf_args(str(run), model, str(data), **{"train.steps": "2"})]) == 0
    step = run / "step-00000002"
    source = transformers.AutoTokenizer.from_pretrained(model)
    tok = transformers.AutoTokenizer.from_pretrained(step)
    assert len(tok) == len(source) > 1
    assert tok.encode("Hello world") == source.encode("Hello world") != []
    chat = CHATS[0]["messages"]
    assert tok.apply_chat_template(chat, tokenize=False) == \
        source.apply_chat_template(chat, tokenize=False)
    generation = transformers.GenerationConfig.from_pretrained(step)
    assert generation.eos_token_id is not None
    loaded = transformers.AutoModelForCausalLM.from_pretrained(step)
    assert torch.equal(loaded.lm_head.weight, weights(step)["lm_head.weight"])

    # a byte-level run's checkpoint carries the byte tokenizer in Hugging Face form
    byte_run = tmp_path / "byte"
    assert main(["train", *args(byte_run, **{"train.steps": "1"})]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(byte_run / "step-00000001")
    byte = ByteTokenizer()
    for text in ("Hello world", "café \u4e2d\u6587\n\t <|end|>"):
        assert tok.encode(text, add_special_tokens=False) == byte.encode(text)
        assert tok.decode(byte.encode(text)) == text
    for prompt in (False, True):
        assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt) == \
            byte.render_chat(chat, add_generation_prompt=prompt)


def test_checkpoint_files_get_the_usual_permissions(tmp_path):
    """Item 9: checkpoint directories were created 0700 and the weights 0600."""
    run = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert main(["train", *args(run, **{"train.steps": "1"})]) == 0
    finally:
        os.umask(old)
    step = run / "step-00000001"
    assert stat.S_IMODE(step.stat().st_mode) == 0o755
    for f in step.rglob("*"):  # the optimizer/ directory included
        assert stat.S_IMODE(f.stat().st_mode) == (0o755 if f.is_dir() else 0o644), f.name


def _corrupt(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_a_corrupt_newest_checkpoint_is_skipped_and_older_steps_resume(tmp_path, capsys):
    """Item 6: a truncated newest model.safetensors gave a raw SafetensorError; resume_from an
    older step of the same run was "another history"; a corrupt trainer_state.json error did
    not name the file."""
    steps = {"train.steps": "6", "checkpoint.interval": "2", "checkpoint.keep_last": "5"}
    assert main(["train", *args(tmp_path / "full", **steps)]) == 0
    run = tmp_path / "run"
    assert main(["train", *args(run, **dict(steps, **{"train.steps": "4"}))]) == 0
    assert checkpoint_problem(run / "step-00000004") is None
    _corrupt(run / "step-00000004" / "model.safetensors")
    assert "truncated" in checkpoint_problem(run / "step-00000004")
    capsys.readouterr()
    assert main(["train", *args(run, **steps), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "warning: skipping checkpoint(s) that do not verify: step-00000004" in out
    assert "resuming from step-00000002" in out
    assert_bitwise_equal(weights(tmp_path / "full" / "step-00000006"),
                         weights(run / "step-00000006"))
    # the bad one was moved aside when the run saved over its step, not deleted
    assert (run / "superseded" / "step-00000004" / "model.safetensors").is_file()
    assert checkpoint_problem(run / "step-00000004") is None

    # an older step of the same run: accepted; the newer steps are set aside, then redone
    assert main(["train", *args(run, **dict(steps, **{
        "checkpoint.resume_from": str(run / "step-00000002")}))]) == 0
    assert "will be moved to" in capsys.readouterr().out
    assert (run / "superseded" / "step-00000006").is_dir()
    assert_bitwise_equal(weights(tmp_path / "full" / "step-00000006"),
                         weights(run / "step-00000006"))

    # a flipped byte (same size) is caught by the checksum
    weights_file = run / "step-00000006" / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-1] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    assert checkpoint_problem(run / "step-00000006").endswith(
        "does not match its SHA-256 in manifest.json (corrupted)")
    data[-1] ^= 0xFF
    weights_file.write_bytes(bytes(data))

    # a corrupt trainer state is named, file and all
    (run / "step-00000006" / "trainer_state.json").write_text('{"step": 6, "data_')
    for bad in ("step-00000002", "step-00000004"):
        shutil.rmtree(run / bad)
    assert main(["train", *args(run, **steps), "--resume"]) == 2
    err = capsys.readouterr().err
    assert str(run / "step-00000006" / "trainer_state.json") in err


def test_disk_full_while_checkpointing_is_one_line_and_exit_3(tmp_path, monkeypatch, capsys):
    """Item 7: a full disk during a checkpoint printed a traceback (exit 1)."""
    run = tmp_path / "run"
    from chunkflow.parallel import checkpoint as parallel_checkpoint

    real_save = parallel_checkpoint.dcp.save

    def save(state, *, checkpoint_id, **kw):  # the optimizer state's torch.distributed.checkpoint
        if ".step-00000002" in checkpoint_id:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, checkpoint_id=checkpoint_id, **kw)

    monkeypatch.setattr(parallel_checkpoint.dcp, "save", save)
    assert main(["train", *args(run, **{"train.steps": "3", "checkpoint.interval": "1"})]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("chunkflow: checkpoint not saved: no space left on the device for "
                          f"checkpoint step-00000002 in {run}: it needs about ")
    assert "the newest saved checkpoint, step-00000001, is intact" in err
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".step", "step"))) == \
        ["step-00000001"]
    assert checkpoint_problem(run / "step-00000001") is None


def test_a_real_full_disk(tmp_path):
    """The same on a 16 MiB tmpfs (a mount namespace of our own; skipped where unavailable)."""
    if not shutil.which("unshare") or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rm (user and mount namespaces) is not available")
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = textwrap.dedent(f"""
        import json, os, sys
        from chunkflow.cli import main
        rc = main(["train", *{args(mnt / 'run', **{'train.steps': '3', 'checkpoint.interval': '1'})!r}])
        print(json.dumps({{"rc": rc, "files": sorted(os.listdir({str(mnt / 'run')!r}))}}))
    """)
    (tmp_path / "job.py").write_text(script)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[3]))
    out = subprocess.run(["unshare", "-rm", "sh", "-c",
                          f'mount -t tmpfs -o size=16m tmpfs "{mnt}" && exec "{sys.executable}" '
                          f'"{tmp_path / "job.py"}"'], capture_output=True, text=True, env=env,
                         timeout=300)
    if "mount" in out.stderr and "permission denied" in out.stderr.lower():
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rc"] == 3, out.stderr
    assert "no space left on the device for checkpoint step-0000000" in out.stderr
    assert "Traceback" not in out.stderr
    assert not any(f.startswith(".step") for f in result["files"])
    assert "step-00000001" in result["files"]


def test_a_checkpoint_from_before_sharded_optimizer_state_still_resumes_bitwise(tmp_path):
    """Checkpoints written before optimizer/ held optimizer.pt (torch.save of the optimizer's
    state dict, by position) and no layout: they resume, on their layout, to the uninterrupted
    run's weights."""
    from chunkflow.train.config import read_toml
    from chunkflow.train.run.trainer import Trainer

    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", *args(full, **{"train.steps": "4"})]) == 0
    assert main(["train", *args(part, **{"train.steps": "4", "checkpoint.interval": "2"})]) == 0
    old = part / "step-00000002"
    shutil.rmtree(part / "step-00000004")
    cfg = read_toml(part / "config.toml")
    cfg.checkpoint.resume = True
    trainer = Trainer(cfg)  # resumes step 2: its optimizer holds the saved state
    # Rewrite step 2 in the old format, its manifest to match.
    torch.save(trainer.optimizer.state_dict(), old / "optimizer.pt")
    shutil.rmtree(old / "optimizer")
    state = json.loads((old / "trainer_state.json").read_text())
    del state["layout"]
    (old / "trainer_state.json").write_text(json.dumps(state))
    manifest = json.loads((old / "manifest.json").read_text())
    files = {k: v for k, v in manifest["files"].items() if not k.startswith("optimizer/")}
    for name in ("optimizer.pt", "trainer_state.json"):
        files[name] = {"bytes": (old / name).stat().st_size,
                       "sha256": hashlib.sha256((old / name).read_bytes()).hexdigest()}
    (old / "manifest.json").write_text(json.dumps(dict(manifest, files=files)))
    trainer.close()  # the run directory's lock

    assert main(["train", *args(part, **{"train.steps": "4"}), "--resume"]) == 0
    assert_bitwise_equal(weights(part / "step-00000004"), weights(full / "step-00000004"))
