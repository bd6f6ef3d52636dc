"""``chunkflow train --chunking.auto=true``: the choice is printed, saved and trained with."""

import tomllib

import pytest
import torch

from chunkflow.cli import main
from tests.train.test_trainer import args


def test_auto_chooses_prints_and_saves_the_settings(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *args(run, **{"chunking.auto": "true", "train.steps": "1",
                                        "chunking.memory_budget": "24MiB"})]) == 0
    out = capsys.readouterr().out
    chunking = tomllib.loads((run / "config.toml").read_text())["chunking"]
    assert chunking["auto"] is False  # a resume trains with the same settings
    chosen = (f"chunk_size={chunking['chunk_size']} k={chunking['k']} "
              f"recompute={chunking['recompute']}")
    assert f"chunking.auto: {chosen}" in out
    assert "memory budget 24.0MiB: --chunking.memory_budget=24MiB" in out
    assert "longest sequence planned for 300 tokens" in out  # --data.synthetic_max_len
    table = (run / "chunking_auto.txt").read_text()
    assert table.splitlines()[2].startswith("*") and "vs best" in table
    assert f"chunk_size={chunking['chunk_size']}, k={chunking['k']}" in out
    assert chunking["offload"] == "none"  # never on CPU


def test_auto_on_cpu_needs_a_budget_and_one_that_fits(tmp_path, capsys):
    assert main(["train", *args(tmp_path / "a", **{"chunking.auto": "true"})]) == 2
    assert "--chunking.memory_budget=16GiB" in capsys.readouterr().err
    assert main(["train", *args(tmp_path / "b", **{"chunking.auto": "true",
                                                   "chunking.memory_budget": "1MiB"})]) == 2
    err = capsys.readouterr().err
    assert ("--chunking.auto=true (budget from --chunking.memory_budget=1MiB): no chunk "
            "settings fit a memory budget of 1.0 MiB") in err
    assert not (tmp_path / "b").exists()  # a failed start leaves no run directory
    assert main(["train", *args(tmp_path / "c", **{"chunking.auto": "true",
                                                   "chunking.memory_budget": "lots"})]) == 2
    assert "--chunking.memory_budget='lots': cannot read size" in capsys.readouterr().err
    from chunkflow.train.auto import choose_chunking
    from tests.train.test_trainer import config

    lora = config(tmp_path / "e", **{"chunking.auto": "true", "lora.rank": "4",
                                     "chunking.memory_budget": "1GiB"})
    with pytest.raises(ValueError, match="the memory model prices full fine-tuning"):
        choose_chunking(lora, None, torch.device("cpu"), activation_bytes=4)


def test_offload_on_cpu_warns_that_it_saves_nothing(tmp_path, capsys):
    assert main(["train", *args(tmp_path / "run", **{"chunking.offload": "state",
                                                     "train.steps": "1"})]) == 0
    assert "--chunking.offload=state on cpu" in capsys.readouterr().out


def _auto_inputs(tmp_path):
    from chunkflow.train.build import build_tokenizer, model_shape
    from chunkflow.train.data import build_dataset
    from tests.train.test_trainer import config

    cfg = config(tmp_path, **{"chunking.auto": "true", "chunking.memory_budget": "64MiB"})
    dataset = build_dataset(cfg.data, vocab_size=model_shape(cfg).vocab_size,
                            seed=cfg.train.seed, tokenizer=build_tokenizer(cfg),
                            model_path=cfg.model.path)
    return cfg, dataset


def test_the_pick_is_confirmed_by_a_dry_run(tmp_path):
    from chunkflow.train.auto import choose_chunking

    cfg, dataset = _auto_inputs(tmp_path)
    text = choose_chunking(cfg, dataset, torch.device("cpu"), activation_bytes=4, confirm=True)
    assert "confirmed by a dry run: peak" in text.splitlines()[0]


def test_a_pick_the_dry_run_finds_too_big_gives_way_to_the_next(tmp_path, monkeypatch):
    from chunkflow.train.auto import choose_chunking
    from tests.dryrun.helpers import first_dry_run_too_big

    tried = first_dry_run_too_big(monkeypatch)
    cfg, dataset = _auto_inputs(tmp_path)
    lines = []
    text = choose_chunking(cfg, dataset, torch.device("cpu"), activation_bytes=4, confirm=True,
                           log=lines.append)
    assert len(tried) == 2 and "does not fit by a dry run" in lines[0]
    assert "after 1 that did not fit" in text.splitlines()[0]
