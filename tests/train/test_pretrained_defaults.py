"""Defaults for a pretrained model (--model.path): a fine-tuning learning rate and warmup
as a share of the run, printed; a LoRA target that matches nothing is refused; a config
file's relative paths are relative to the file."""

import math

import pytest

from chunkflow.cli import main
from chunkflow.train.config import load_config
from tests.train.checkpoint.test_resume import chat_job, hf_args
from tests.train.run.test_trainer import args, metrics
from tests.train.test_trainer_hf import model_dir


def test_fine_tuning_defaults_apply_to_a_pretrained_model_only(tmp_path):
    path = str(tmp_path / "model")
    full = load_config(None, {"model.path": path})
    assert (full.optim.lr, full.optim.warmup_ratio) == (2e-5, 0.03)
    assert full.notes == ["optim.lr=2e-05", "optim.warmup_ratio=0.03"]
    lora = load_config(None, {"model.path": path, "lora.rank": "8"})
    assert lora.optim.lr == 2e-4
    mine = load_config(None, {"model.path": path, "optim.lr": "1e-6",
                              "optim.warmup_steps": "5"})
    assert (mine.optim.lr, mine.optim.warmup_ratio, mine.notes) == (1e-6, None, [])
    toml = tmp_path / "job.toml"
    toml.write_text("[optim]\nlr = 3e-5\n")
    assert load_config(toml, {"model.path": path}).optim.lr == 3e-5
    preset = load_config(None, {})
    assert (preset.optim.lr, preset.optim.warmup_ratio, preset.notes) == (2e-3, None, [])


def test_a_pretrained_run_prints_its_defaults_and_warms_up_over_3_percent(tmp_path, capsys):
    model, data = model_dir(tmp_path, tied=True), chat_job(tmp_path)
    argv = [a for a in hf_args(str(tmp_path / "run"), model, str(data),
                               **{"train.steps": "40", "checkpoint.interval": "0"})
            if not a.startswith("--optim.")]  # the defaults under test
    assert main(["train", *argv]) == 0
    out = capsys.readouterr().out
    assert ("fine-tuning defaults for a pretrained model: optim.lr=2e-05, "
            "optim.warmup_ratio=0.03 (set the options to choose others)") in out
    warmup = math.ceil(0.03 * 40)  # 2 steps
    lrs = [r["lr"] for r in metrics(tmp_path / "run")]
    assert lrs[0] == pytest.approx(2e-5 / warmup) and lrs[warmup - 1] == pytest.approx(2e-5)


def test_a_warmup_as_long_as_the_run_is_warned_about(tmp_path, capsys):
    assert main(["train", *args(tmp_path, **{"train.steps": "3",
                                             "optim.warmup_steps": "3"})]) == 0
    assert ("warning: the warmup (3 steps) is not shorter than the run (3 steps): the learning "
            "rate never reaches --optim.lr=0.002") in capsys.readouterr().out


def test_a_lora_target_that_matches_nothing_is_refused(tmp_path, capsys):
    pytest.importorskip("peft")
    model, data = model_dir(tmp_path, tied=True), chat_job(tmp_path)
    argv = hf_args(str(tmp_path / "run"), model, str(data),
                   **{"lora.rank": "4", "lora.target_modules": "q_proj,vproj"})
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert ("--lora.target_modules='q_proj,vproj': 'vproj' matches no module of the model; "
            "valid: its linear layers down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, "
            "up_proj, v_proj, or 'all-linear'") in err
    assert not (tmp_path / "run").exists()


def test_relative_paths_in_a_config_file_are_relative_to_the_file(tmp_path, monkeypatch):
    job = tmp_path / "jobs" / "sft"
    job.mkdir(parents=True)
    (job / "train.jsonl").write_text('{"text": "hello"}\n')
    (job / "job.toml").write_text('[data]\npath = "train.jsonl"\n[train]\n'
                                  'output_dir = "../../runs/sft"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config(job / "job.toml", {"eval.path": "held.jsonl"})
    assert cfg.data.path == str(job / "train.jsonl")
    assert cfg.train.output_dir == str(tmp_path / "runs" / "sft")
    assert cfg.eval.path == str(tmp_path / "held.jsonl")  # the command line: the cwd
