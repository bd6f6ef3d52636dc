"""The dry run at Qwen2.5-7B's widths with 2 decoder layers: every layout's rank roles, LoRA,
offload, selective recompute and activation checkpointing run on fake tensors, and each
accounts for what it changes (issue 24, section 5)."""

import json

import pytest

from chunkflow.cli import main
from chunkflow.dryrun.tracker import allocator_bytes

# Qwen2.5-7B's published config.json (huggingface.co/Qwen/Qwen2.5-7B), with 2 of its 28 layers
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064,
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "sliding_window": 131072, "max_window_layers": 28, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151643, "initializer_range": 0.02,
}
HIDDEN, INTER, VOCAB, KV = 3584, 18944, 152064, 4 * 128
LAYER = HIDDEN * (HIDDEN + 2 * KV + HIDDEN) + 2 * KV + HIDDEN \
    + 3 * HIDDEN * INTER + 2 * HIDDEN
PARAMS = 2 * VOCAB * HIDDEN + 2 * LAYER + HIDDEN  # embedding, head, 2 layers, final norm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2.5-7b-2l")
    (path / "config.json").write_text(json.dumps({**QWEN25_7B, "num_hidden_layers": 2}))
    return path


def dry(tmp_path, model_dir, *flags, lengths="16384,1500x4", chunk=4096) -> dict:
    out = tmp_path / f"dry-{len(list(tmp_path.iterdir()))}.json"
    assert main(["plan", "--dry-run", f"--model.path={model_dir}", f"--lengths={lengths}",
                 f"--chunking.chunk_size={chunk}", "--json", str(out), *flags]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory, model_dir):
    return dry(tmp_path_factory.mktemp("single"), model_dir)


def test_one_gpu_full_fine_tune(single):
    assert set(single) >= {"fits", "peak_device_bytes", "device_capacity_bytes",
                           "host_pinned_bytes", "flops_per_step", "predicted_step_s", "mfu",
                           "ranks"}
    role, = single["ranks"]
    assert set(role["breakdown"]) == {"weights", "gradients", "optimizer", "activations",
                                      "kv_state", "communication", "transient"}
    assert sum(role["breakdown"].values()) == role["peak_device_bytes"] == \
        single["peak_device_bytes"]
    # float32 master weights, their gradients, AdamW's two moments (plus a step count each)
    fp32 = 4 * PARAMS
    assert role["most_bytes"]["gradients"] == pytest.approx(fp32, rel=1e-3)
    assert role["breakdown"]["optimizer"] == pytest.approx(2 * fp32, rel=1e-3)
    # and bf16 autocast's copies of the weights, cached for the step
    assert fp32 < role["breakdown"]["weights"] <= 1.5 * fp32 + 2**20
    assert role["breakdown"]["activations"] > 0 and role["breakdown"]["kv_state"] > 0
    assert single["fits"] and single["host_pinned_bytes"] == 0
    # 6 x params per token at least, the roofline above the FLOPs' time alone
    tokens = 16384 + 6000
    assert single["flops_per_step"] > 6 * (PARAMS - VOCAB * HIDDEN) * tokens
    assert single["predicted_step_s"] >= single["flops_per_step"] / 989.4e12
    assert 0 < single["mfu"] < 1


def test_allocator_rounding():
    assert [allocator_bytes(n) for n in (0, 1, 512, 513)] == [0, 512, 512, 1024]


def test_lora_keeps_only_adapter_gradients(tmp_path, model_dir, single):
    lora = dry(tmp_path, model_dir, "--lora.rank=16")
    role, full = lora["ranks"][0], single["ranks"][0]
    assert role["most_bytes"]["gradients"] < 0.01 * full["most_bytes"]["gradients"]
    assert role["breakdown"]["optimizer"] < 0.01 * full["breakdown"]["optimizer"]
    assert lora["peak_device_bytes"] < single["peak_device_bytes"]


def test_offload_moves_the_kv_state_to_pinned_host_memory(tmp_path):
    # 4 layers: the device keeps two layers' state (the one in use and the next)
    four = tmp_path / "4l"
    four.mkdir()
    (four / "config.json").write_text(json.dumps({**QWEN25_7B, "num_hidden_layers": 4}))
    kept = dry(tmp_path, four)
    off = dry(tmp_path, four, "--chunking.offload=state")
    assert kept["host_pinned_bytes"] == 0 and off["host_pinned_bytes"] > 0
    most = off["ranks"][0]["most_bytes"]["kv_state"]
    assert most < 0.75 * kept["ranks"][0]["most_bytes"]["kv_state"]
    # the whole chain's keys and values (16K positions, 4 layers, bf16) are on the host
    assert off["host_pinned_bytes"] >= 4 * 2 * 16384 * KV * 2


def test_selective_recompute_skips_attention_in_the_recompute(tmp_path, model_dir, single):
    sel = dry(tmp_path, model_dir, "--chunking.recompute=selective")
    assert sel["flops_per_step"] < single["flops_per_step"]


def test_activation_checkpointing_holds_fewer_activations(tmp_path, model_dir, single):
    ckpt = dry(tmp_path, model_dir, "--chunking.activation_checkpointing=true")
    assert ckpt["ranks"][0]["most_bytes"]["activations"] < \
        0.5 * single["ranks"][0]["most_bytes"]["activations"]
    assert ckpt["flops_per_step"] > single["flops_per_step"]


@pytest.mark.parametrize("flags, roles", [
    (["--gpus=2", "--parallel.data_parallel=ddp"], 1),
    (["--gpus=2", "--parallel.data_parallel=fsdp"], 1),
    (["--gpus=2", "--parallel.tp=2"], 1),
    (["--gpus=2", "--parallel.pp=2"], 2),
    (["--gpus=8", "--parallel.tp=2", "--parallel.pp=2", "--parallel.data_parallel=fsdp"], 2),
], ids=["ddp", "fsdp", "tp", "pp", "fsdp-tp-pp"])
def test_every_layout_runs_each_rank_role(tmp_path, model_dir, single, flags, roles):
    out = dry(tmp_path, model_dir, *flags)
    assert len(out["ranks"]) == roles
    one = single["ranks"][0]["breakdown"]
    for role in out["ranks"]:
        b = role["breakdown"]
        if "--parallel.data_parallel=ddp" in flags:  # DDP's buckets hold a gradient's copy
            assert b["optimizer"] == one["optimizer"]
            assert role["most_bytes"]["communication"] >= 0.9 * 4 * PARAMS
        else:  # each rank holds a share of the optimizer state
            assert b["optimizer"] < 0.6 * one["optimizer"]
    if "--parallel.data_parallel=fsdp" in flags and roles == 1:
        # FSDP2 with bf16 mixed precision: half the float32 weights and AdamW state on each
        # of the 2 ranks, and a bf16 copy of all weights gathered for the step (float32
        # gathered weights would be 2 + 4 bytes per parameter)
        assert out["ranks"][0]["breakdown"]["optimizer"] == pytest.approx(
            one["optimizer"] / 2, rel=0.01)
        assert out["ranks"][0]["breakdown"]["weights"] == pytest.approx(
            (4 / 2 + 2) * PARAMS, rel=0.02)


def bad(capsys, *argv) -> str:
    assert main(["plan", "--dry-run", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chunkflow: error:"), err
    return err[0]


def test_bad_input_is_one_clear_line(tmp_path, capsys, model_dir):
    assert "H100-80GB" in bad(capsys, "--gpu=H900", "--lengths=100")
    assert "multiple of" in bad(capsys, "--gpus=3", "--parallel.tp=2", "--lengths=100")
    assert "LENGTHxCOUNT" in bad(capsys, "--lengths=12,ax3")
    line = bad(capsys, f"--model.path={model_dir}", "--parallel.tp=3", "--lengths=100",
               "--gpus=3")
    assert "tp=3" in line or "--parallel.tp=3" in line
    encoder = tmp_path / "bert"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": 100,
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 128}))
    assert "bert" in bad(capsys, f"--model.path={encoder}", "--lengths=100").lower()
