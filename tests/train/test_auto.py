"""``chunkflow train --chunking.auto=true``: the choice is printed, saved and trained with."""

import tomllib

import pytest
import torch

from chunkflow.cli import main
from tests.train.run.test_trainer import args


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


def test_lora_is_priced_by_its_trained_parameters(tmp_path):
    """--chunking.auto with LoRA: the frozen weights take no gradients or AdamW state, so a
    budget that no full fine-tune of the model fits still gets settings."""
    from chunkflow.train.auto.chunking import choose_chunking
    from chunkflow.train.build import build_tokenizer, configured_shape, trainable_params
    from chunkflow.train.config import load_config
    from chunkflow.train.data.dataset import build_dataset
    from tests.train.checkpoint.test_resume import chat_job
    from tests.train.test_trainer_hf import model_dir

    pytest.importorskip("peft")
    model, data = model_dir(tmp_path, tied=True), chat_job(tmp_path)

    def cfg(rank: int, budget: int):
        return load_config(None, {"model.path": model, "data.path": str(data),
                                  "lora.rank": str(rank), "chunking.auto": "true",
                                  "chunking.memory_budget": str(budget),
                                  "train.output_dir": str(tmp_path / "run")})

    lora = cfg(4, 1)
    trained = trainable_params(lora)
    shape = configured_shape(lora)
    assert 0 < trained < shape.num_params
    dataset = build_dataset(lora.data, vocab_size=shape.vocab_size, seed=0,
                            tokenizer=build_tokenizer(lora), model_path=model)
    # the smallest budget each fits, in steps of an eighth: LoRA's is lower
    fits = {}
    for rank in (0, 4):
        for budget in (2**16 * 9**i // 8**i for i in range(200)):
            try:
                choose_chunking(cfg(rank, budget), dataset, torch.device("cpu"),
                                activation_bytes=4, confirm=False)
            except ValueError as e:
                assert "no chunk settings fit" in str(e)
                continue
            fits[rank] = budget
            break
    assert fits[4] < fits[0]


def test_offload_on_cpu_warns_that_it_saves_nothing(tmp_path, capsys):
    assert main(["train", *args(tmp_path / "run", **{"chunking.offload": "state",
                                                     "train.steps": "1"})]) == 0
    assert "--chunking.offload=state on cpu" in capsys.readouterr().out


def _auto_inputs(tmp_path):
    from chunkflow.train.build import build_tokenizer, configured_shape
    from chunkflow.train.data.dataset import build_dataset
    from tests.train.run.test_trainer import config

    cfg = config(tmp_path, **{"chunking.auto": "true", "chunking.memory_budget": "64MiB"})
    dataset = build_dataset(cfg.data, vocab_size=configured_shape(cfg).vocab_size,
                            seed=cfg.train.seed, tokenizer=build_tokenizer(cfg),
                            model_path=cfg.model.path)
    return cfg, dataset


def test_the_pick_is_confirmed_by_a_dry_run(tmp_path):
    from chunkflow.train.auto.chunking import choose_chunking

    cfg, dataset = _auto_inputs(tmp_path)
    text = choose_chunking(cfg, dataset, torch.device("cpu"), activation_bytes=4, confirm=True)
    assert "confirmed by a dry run: peak" in text.splitlines()[0]


def test_a_pick_the_dry_run_finds_too_big_gives_way_to_the_next(tmp_path, monkeypatch):
    from chunkflow.train.auto.chunking import choose_chunking
    from tests.dryrun.helpers import first_dry_run_too_big

    tried = first_dry_run_too_big(monkeypatch)
    cfg, dataset = _auto_inputs(tmp_path)
    lines = []
    text = choose_chunking(cfg, dataset, torch.device("cpu"), activation_bytes=4, confirm=True,
                           log=lines.append)
    assert len(tried) == 2 and "does not fit by a dry run" in lines[0]
    assert "after 1 that did not fit" in text.splitlines()[0]
