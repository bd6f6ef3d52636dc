"""LoRA from the command line ([lora]): exact adapter gradients, bitwise resume after SIGKILL,
and checkpoints that peft and transformers load with the trained model's logits."""

import pytest
import torch
import transformers

from chunkflow import ChunkFlowEngine
from chunkflow.cli import main
from chunkflow.train.config import load_config
from chunkflow.train.build import build_model
from chunkflow.train.run.trainer import Trainer
from tests.models.test_hf_adapter import assert_grads_close, grads, make_batch, plain_step
from tests.train.checkpoint.test_resume import chat_job, hf_args
from tests.train.run.test_trainer import kill_when
from tests.train.test_trainer_hf import model_dir

peft = pytest.importorskip("peft")


def lora_model(path: str, **lora):
    cfg = load_config(None, {"model.path": path, "model.dtype": "float64", "lora.rank": "4",
                             **{f"lora.{k}": v for k, v in lora.items()}})
    model = build_model(cfg, torch.device("cpu"))
    with torch.no_grad():  # B starts at zero; random adapters make every gradient count
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("to_save", [None, "embed_tokens"])
def test_adapter_gradients_equal_plain_peft_training(tmp_path, to_save):
    path = model_dir(tmp_path, tied=False)
    model = lora_model(path, **({"modules_to_save": to_save} if to_save else {}))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("modules_to_save" in n for n in trainable) == bool(to_save)
    batch = make_batch(model.config.vocab_size)
    plain_step(model, batch)
    want = grads(model)
    model.zero_grad(set_to_none=True)
    for k in (1, 2):
        ChunkFlowEngine(model, chunk_size=16, k=k).forward_backward(batch)
        assert_grads_close(grads(model), want)
        model.zero_grad(set_to_none=True)


def test_lora_dropout_draws_the_same_masks_in_a_chunks_recompute(tmp_path):
    """With dropout, k=1 (every chain chunk but the last recomputed) must give the gradients
    of k=100 (nothing recomputed): each chunk's forwards see one mask."""
    model = lora_model(model_dir(tmp_path, tied=False), dropout="0.3").train()
    batch = make_batch(model.config.vocab_size)
    results = []
    for k in (1, 100, 100):
        torch.manual_seed(7)
        ChunkFlowEngine(model, chunk_size=16, k=k).forward_backward(batch)
        results.append(grads(model))
        model.zero_grad(set_to_none=True)
    assert_grads_close(results[0], results[1])
    assert all(torch.equal(results[1][n], results[2][n]) for n in results[1])  # reproducible
    model.eval()  # dropout off: other gradients, so the masks were in play
    ChunkFlowEngine(model, chunk_size=16, k=1).forward_backward(batch)
    assert any(not torch.allclose(g, results[0][n]) for n, g in grads(model).items())


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_run_resumes_bitwise_after_sigkill_and_its_files_load(tmp_path):
    model = model_dir(tmp_path, tied=True)
    data = chat_job(tmp_path)
    lora = {"model.dtype": "float64", "lora.rank": "4", "lora.alpha": "8",
            "lora.modules_to_save": "embed_tokens", "checkpoint.interval": "1"}
    full = Trainer(load_config(None, dict(
        (a[2:].split("=", 1) for a in hf_args(str(tmp_path / "full"), model, str(data), **lora)))))
    full.run()
    final = tmp_path / "full" / "step-00000006"
    assert (final / "adapter_model.safetensors").is_file() and (final / "merged").is_dir()
    assert (final / "generation_config.json").is_file()
    assert not (tmp_path / "full" / "step-00000005" / "merged").exists()  # only at the end

    run = tmp_path / "killed"
    # the killed run also writes merged/ into every checkpoint: saving never touches the
    # weights being trained, so the adapters still come out bitwise equal
    kill_when(run / "step-00000002", hf_args(str(run), model, str(data), **lora,
                                               **{"lora.merge_on_save": "true"}))
    assert (run / "step-00000002" / "merged" / "model.safetensors").is_file()
    assert not (run / "step-00000006").exists(), "finished before the kill: proves nothing"
    assert main(["train", "--train.output_dir", str(run), "--resume"]) == 0
    from safetensors.torch import load_file

    a, b = (load_file(d / "step-00000006" / "adapter_model.safetensors") for d in (tmp_path / "full", run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # what a user loads: the adapter with peft, the merged model with transformers
    ids = torch.arange(40)[None] % full.model.config.vocab_size
    full.model.eval()
    want = logits(full.model, ids)
    base = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64)
    adapted = peft.PeftModel.from_pretrained(base, final)
    torch.testing.assert_close(logits(adapted, ids), want, rtol=1e-12, atol=1e-12)
    merged = transformers.AutoModelForCausalLM.from_pretrained(final / "merged",
                                                               dtype=torch.float64)
    torch.testing.assert_close(logits(merged, ids), want, rtol=1e-9, atol=1e-9)
    tok = transformers.AutoTokenizer.from_pretrained(final / "merged")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_lora_options_are_checked(tmp_path, capsys):
    assert main(["train", "--lora.rank=4", f"--train.output_dir={tmp_path / 'a'}"]) == 2
    assert "--lora.rank=4 adapts a pretrained model: set --model.path" in capsys.readouterr().err
    path = model_dir(tmp_path, tied=False)
    assert main(["train", "--lora.rank=4", f"--model.path={path}",
                 "--model.implementation=reference", f"--train.output_dir={tmp_path / 'b'}"]) == 2
    assert "valid: --model.implementation=hf" in capsys.readouterr().err
    assert main(["train", "--lora.rank=4", f"--model.path={path}", "--lora.target_modules=nope",
                 f"--data.path={chat_job(tmp_path)}", f"--train.output_dir={tmp_path / 'c'}"]) == 2
    assert "--lora.target_modules='nope'" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")
