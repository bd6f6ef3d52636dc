"""`chunkflow train --model.path DIR`: a local Hugging Face model and its tokenizer, trained as
is or as the reference model, with checkpoints that transformers loads."""

import json
import socket

import pytest
import torch
import transformers
from safetensors.torch import load_file

from chunkflow.cli import main
from tests.train.data.test_tokenizer import make_hf_tokenizer

CHATS = [
    {"messages": [{"role": "user", "content": "hello there"},
                  {"role": "assistant", "content": "fine, thanks"}]},
    {"messages": [{"role": "system", "content": "be brief"},
                  {"role": "user", "content": "how are you? " * 6},
                  {"role": "assistant", "content": "the assistant says hi " * 5}]},
    {"text": "hello there, how are you? " * 4},
]


def model_dir(tmp_path, *, tied: bool) -> str:
    """A tiny random Qwen2 model saved with its tokenizer, as a user's local checkpoint."""
    path = make_hf_tokenizer(tmp_path / "model")
    # Padded past the tokenizer, as Qwen's are (and loading the tokenizer next to a Qwen2
    # config.json may add <|endoftext|>).
    vocab = len(transformers.AutoTokenizer.from_pretrained(path)) + 12
    config = transformers.Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def train(tmp_path, path: str, implementation: str, **extra) -> tuple[int, object]:
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHATS * 3))
    run = tmp_path / f"run-{implementation}"
    overrides = {"model.path": path, "model.implementation": implementation,
                 "model.dtype": "float64", "data.path": str(data), "data.batch_size": "4",
                 "data.shuffle_buffer": "0", "chunking.chunk_size": "16", "train.steps": "3",
                 # a random tiny model: the presets' learning rate and warmup, not a
                 # pretrained model's fine-tuning defaults, so that 3 steps lower the loss
                 "optim.lr": "2e-3", "optim.warmup_steps": "10",
                 "log.progress": "false", "train.output_dir": str(run), **extra}
    return main(["train", *[f"--{k}={v}" for k, v in overrides.items()]]), run


@pytest.mark.parametrize("tied", [False, True])
def test_hf_and_reference_implementations_train_the_same(tmp_path, tied):
    path = model_dir(tmp_path, tied=tied)
    losses, final = {}, {}
    for implementation in ("hf", "reference"):
        code, run = train(tmp_path, path, implementation)
        assert code == 0
        losses[implementation] = [json.loads(line)["loss"]
                                  for line in (run / "metrics.jsonl").read_text().splitlines()]
        final[implementation] = run / "step-00000003"
    # transformers' RMSNorm computes in float32 even in a float64 model, ours in float64: the two
    # implementations agree to float32 precision, not float64's.
    assert losses["hf"] == pytest.approx(losses["reference"], rel=1e-6)
    assert losses["hf"][-1] < losses["hf"][0]

    # each checkpoint is a model directory transformers loads, with the trained weights
    for implementation, ckpt in final.items():
        loaded = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float64)
        assert type(loaded) is transformers.Qwen2ForCausalLM
        stored = load_file(ckpt / "model.safetensors")
        state = loaded.state_dict()
        for name, tensor in stored.items():
            assert torch.equal(state[name], tensor), (implementation, name)
        if tied:
            assert torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    ids = torch.arange(20)[None]
    a, b = (transformers.AutoModelForCausalLM.from_pretrained(final[i], dtype=torch.float64)
            for i in ("hf", "reference"))
    torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=1e-5,
                               atol=1e-6)


def test_model_path_errors(tmp_path, capsys, monkeypatch):
    """Issue 13.8: a missing directory went to the network (5 retries, 26 s) and left an empty
    run directory; a Gemma2 directory got transformers' SDPA error plus advice that did not
    apply; a tokenizer larger than the model got --model.vocab_size advice."""
    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise OSError("test: the network was contacted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for implementation in ("hf", "reference"):
        code, run = train(tmp_path, str(tmp_path / "missing"), implementation)
        err = capsys.readouterr().err
        assert code == 2 and f"--model.path='{tmp_path / 'missing'}' does not exist" in err
        assert not calls and not run.exists()

    path = model_dir(tmp_path, tied=False)
    code, _ = train(tmp_path, path, "hf", **{"model.vocab_size": "999"})
    assert code == 2 and "--model.vocab_size applies to presets" in capsys.readouterr().err

    gemma = tmp_path / "gemma2"
    transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=400, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8)).save_pretrained(gemma)
    code, _ = train(tmp_path, str(gemma), "hf", **{"data.tokenizer": path})
    err = capsys.readouterr().err
    assert code == 2 and "cannot be trained with chunkflow: final_logit_softcapping=30.0: logit " \
        "soft-capping is not supported" in err
    assert "valid: a local directory" not in err and "sdpa" not in err.lower()

    small = tmp_path / "small"
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2)).save_pretrained(small)
    code, _ = train(tmp_path, str(small), "hf", **{"data.tokenizer": path})
    err = capsys.readouterr().err
    assert code == 2 and "the model's vocabulary has 100" in err
    assert "resize_token_embeddings" in err and "--model.vocab_size" not in err
    assert not calls


def test_the_command_line_runs_hugging_face_libraries_offline(tmp_path):
    """chunkflow never downloads: main() sets HF_HUB_OFFLINE before transformers is imported
    (the in-process tests import it first, so this needs a fresh interpreter)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\nfrom chunkflow.cli import main\n"
            "main(['plan', '--lengths', '5', '--model.preset', 'tiny'])\n"
            "import huggingface_hub.constants as c, transformers\n"
            "print('offline', c.HF_HUB_OFFLINE)\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["PYTHONPATH"] = str(Path(__file__).parents[2])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert "offline True" in out.stdout, out.stdout + out.stderr
