"""The model's dtype follows its config.json (``--model.dtype=auto``): a bfloat16 checkpoint is
saved and merged in bfloat16, a LoRA base stays bfloat16 in memory, and full fine-tuning trains
float32 master weights that a resumed run continues from bit for bit."""

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from chunkflow.cli import main
from chunkflow.train.build import build_model, describe_dtypes
from chunkflow.train.config import load_config
from tests.train.checkpoint.test_resume import chat_job, hf_args
from tests.train.test_trainer_hf import model_dir


def checkpoint_dir(tmp_path, *, dtype: str, tied: bool = True) -> str:
    """A tiny random Qwen2 directory saved in ``dtype``, as Hugging Face publishes models."""
    path = model_dir(tmp_path, tied=tied)
    transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype)).save_pretrained(path)
    assert json.loads((tmp_path / "model" / "config.json").read_text())["dtype"] == dtype
    return path


def saved_dtypes(file) -> set[torch.dtype]:
    with safe_open(str(file), framework="pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def master_weights(step_dir) -> dict[str, torch.Tensor]:
    out = step_dir.parent / f"{step_dir.name}-master.pt"
    dcp_to_torch_save(step_dir / "master_weights", out)
    return torch.load(out, weights_only=True)


def test_the_dtype_is_resolved_from_config_json_and_said(tmp_path):
    bf16 = checkpoint_dir(tmp_path, dtype="bfloat16")
    full = load_config(None, {"model.path": bf16})
    assert (full.model.weights_dtype(), full.param_dtype()) == ("bfloat16", "float32")
    assert describe_dtypes(full) == ("bfloat16 weights (config.json), float32 master weights")
    lora = load_config(None, {"model.path": bf16, "lora.rank": "4"})
    assert (lora.model.weights_dtype(), lora.param_dtype()) == ("bfloat16", "bfloat16")
    assert describe_dtypes(lora) == "bfloat16 frozen base (config.json), float32 adapters"
    chosen = load_config(None, {"model.path": bf16, "model.dtype": "float32"})
    assert (chosen.model.weights_dtype(), chosen.param_dtype()) == ("float32", "float32")
    assert describe_dtypes(chosen) == "float32 (--model.dtype)"
    assert load_config(None, {}).model.weights_dtype() == "float32"  # a preset

    # a float16 checkpoint: no loss scaling here, so it trains (and is saved) in float32
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps(dict(config, dtype="float16")))
    half = load_config(None, {"model.path": bf16})
    assert (half.model.weights_dtype(), half.param_dtype()) == ("float32", "float32")
    assert describe_dtypes(half) == "float32 (config.json's float16, loaded as float32)"
    # transformers < 4.56 wrote torch_dtype
    del config["dtype"]
    (tmp_path / "model" / "config.json").write_text(json.dumps(dict(config,
                                                                    torch_dtype="bfloat16")))
    assert load_config(None, {"model.path": bf16}).model.weights_dtype() == "bfloat16"


def test_bf16_full_fine_tuning_saves_bf16_and_resumes_bitwise_from_float32_masters(tmp_path,
                                                                                  capsys):
    model = checkpoint_dir(tmp_path, dtype="bfloat16")
    data = str(chat_job(tmp_path))
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(["train", *hf_args(str(straight), model, data, **{"train.steps": "4"})]) == 0
    out = capsys.readouterr().out
    assert "bfloat16 weights (config.json), float32 master weights" in out
    assert main(["train", *hf_args(str(stopped), model, data, **{"train.steps": "2"})]) == 0
    assert main(["train", *hf_args(str(stopped), model, data, **{"train.steps": "4"}),
                 "--checkpoint.resume=true"]) == 0

    assert losses(stopped) == losses(straight)  # steps 3 and 4 from the masters: bitwise
    final = straight / "step-00000004"
    masters = master_weights(final)
    assert master_weights(stopped / "step-00000004").keys() == masters.keys()
    for name, tensor in master_weights(stopped / "step-00000004").items():
        assert torch.equal(tensor, masters[name]), name
    assert {t.dtype for t in masters.values()} == {torch.float32}
    # the Hugging Face files are the masters rounded to bfloat16, as config.json says
    assert saved_dtypes(final / "model.safetensors") == {torch.bfloat16}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(final)
    assert loaded.dtype == torch.bfloat16
    state = loaded.state_dict()
    for name, tensor in masters.items():
        assert torch.equal(state[name], tensor.to(torch.bfloat16)), name
    # the masters moved by less than bfloat16's resolution somewhere: kept, not rounded away
    source = transformers.AutoModelForCausalLM.from_pretrained(model).state_dict()
    assert any(not torch.equal(masters[n].to(torch.bfloat16), source[n]) for n in masters)
    assert any(not torch.equal(masters[n], source[n].float()) for n in masters)


def test_a_chosen_float32_runs_and_saves_float32_without_masters(tmp_path):
    model = checkpoint_dir(tmp_path, dtype="bfloat16", tied=False)
    run = tmp_path / "run"
    assert main(["train", *hf_args(str(run), model, str(chat_job(tmp_path)),
                                   **{"train.steps": "2", "model.dtype": "float32"})]) == 0
    final = run / "step-00000002"
    assert saved_dtypes(final / "model.safetensors") == {torch.float32}
    assert json.loads((final / "config.json").read_text())["dtype"] == "float32"
    assert not (final / "master_weights").exists()


def test_reference_implementation_saves_in_the_checkpoints_dtype(tmp_path):
    model = checkpoint_dir(tmp_path, dtype="bfloat16")
    run = tmp_path / "run"
    assert main(["train", *hf_args(str(run), model, str(chat_job(tmp_path)),
                                   **{"train.steps": "2", "model.implementation": "reference"})
                 ]) == 0
    final = run / "step-00000002"
    assert saved_dtypes(final / "model.safetensors") == {torch.bfloat16}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in master_weights(final).values()} == {torch.float32}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(final)
    assert torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)  # still tied


def test_lora_keeps_a_bf16_base_trains_float32_adapters_and_merges_in_bf16(tmp_path):
    model = checkpoint_dir(tmp_path, dtype="bfloat16", tied=False)
    cfg = load_config(None, {"model.path": model, "lora.rank": "4"})
    built = build_model(cfg, torch.device("cpu"))
    frozen = {p.dtype for p in built.parameters() if not p.requires_grad}
    trained = {p.dtype for p in built.parameters() if p.requires_grad}
    assert (frozen, trained) == ({torch.bfloat16}, {torch.float32})

    run = tmp_path / "run"
    assert main(["train", *hf_args(str(run), model, str(chat_job(tmp_path)),
                                   **{"train.steps": "2", "lora.rank": "4",
                                      "lora.merge_on_save": "true"})]) == 0
    final = run / "step-00000002"
    assert saved_dtypes(final / "adapter_model.safetensors") == {torch.float32}
    assert saved_dtypes(final / "merged" / "model.safetensors") == {torch.bfloat16}
    assert json.loads((final / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    assert transformers.AutoModelForCausalLM.from_pretrained(final / "merged").dtype \
        == torch.bfloat16


def test_modules_to_save_on_a_bf16_base(tmp_path, capsys):
    """Trained in float32 beside bfloat16 layers: only autocast runs that mix."""
    model = checkpoint_dir(tmp_path, dtype="bfloat16", tied=False)
    data = str(chat_job(tmp_path))
    lora = {"train.steps": "2", "lora.rank": "4", "lora.modules_to_save": "lm_head"}
    assert main(["train", *hf_args(str(tmp_path / "a"), model, data, **lora)]) == 2
    err = capsys.readouterr().err
    assert "--lora.modules_to_save='lm_head' on a bfloat16 base (config.json)" in err
    assert "valid: --train.autocast=bf16" in err
    run = tmp_path / "b"
    assert main(["train", *hf_args(str(run), model, data, **lora,
                                   **{"train.autocast": "bf16"})]) == 0
    adapter = run / "step-00000002" / "adapter_model.safetensors"
    assert saved_dtypes(adapter) == {torch.float32}


@pytest.mark.parametrize("lora", [False, True])
def test_plan_prices_the_dtypes_the_run_holds(tmp_path, capsys, lora):
    model = checkpoint_dir(tmp_path, dtype="bfloat16")
    extra = ["--lora.rank=4"] if lora else []
    assert main(["plan", f"--model.path={model}", "--lengths=64,32", *extra]) == 0
    out = capsys.readouterr().out
    assert ("bfloat16 frozen base (config.json), float32 adapters" if lora else
            "bfloat16 weights (config.json), float32 master weights") in out
