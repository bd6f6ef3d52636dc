"""A long stage and a long chain are extrapolated from shorter steps: the result equals the
whole step's (``--full-step``) wherever the step is polynomial in them, and a step that is not
is run whole."""

import json

import pytest

from chunkflow.cli import main
from chunkflow.dryrun.fit import _interpolate

SMALL = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 4096,
         "hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 4,
         "num_key_value_heads": 2, "hidden_act": "silu", "rms_norm_eps": 1e-6,
         "rope_theta": 1e6, "max_position_embeddings": 32768, "tie_word_embeddings": False}


def run(tmp_path, layers, *flags) -> dict:
    model = tmp_path / f"m{layers}"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({**SMALL, "num_hidden_layers": layers}))
    out = tmp_path / "out.json"
    assert main(["plan", "--dry-run", f"--model.path={model}", "--json", str(out),
                 *flags]) == 0
    return json.loads(out.read_text())


def same(a: dict, b: dict) -> None:
    for key in ("peak_device_bytes", "flops_per_step", "fits"):
        assert a[key] == pytest.approx(b[key], rel=1e-9), key
    assert a["predicted_step_s"] == pytest.approx(b["predicted_step_s"], rel=1e-6)
    for ra, rb in zip(a["ranks"], b["ranks"], strict=True):
        assert ra["breakdown"] == rb["breakdown"]
        assert ra["step_memory_peak_bytes"] == rb["step_memory_peak_bytes"]


@pytest.mark.parametrize("flags", [
    ["--lengths=3000,700x2", "--gpus=2", "--parallel.pp=2"],
    ["--lengths=3000,700x2", "--chunking.activation_checkpointing=true"],
], ids=["pp2", "one-gpu-activation-checkpointing"])
def test_layers_extrapolated_equal_the_whole_step(tmp_path, flags):
    flags = [*flags, "--chunking.chunk_size=1024"]
    probed = run(tmp_path, 10, *flags)
    assert all(r["extrapolated_from_layers"] == [2, 3, 4] for r in probed["ranks"])
    whole = run(tmp_path, 10, *flags, "--full-step")
    assert all(r["extrapolated_from_layers"] == [] for r in whole["ranks"])
    same(probed, whole)


@pytest.mark.parametrize("extra", [["--chunking.recompute=selective", "--chunking.k=2"],
                                   ["--chunking.offload=state"]],
                         ids=["selective-k2", "offload"])
def test_a_long_chain_extrapolated_equals_the_whole_step(tmp_path, extra):
    flags = ["--lengths=9000,900x2", "--chunking.chunk_size=1024", *extra]
    probed = run(tmp_path, 2, *flags)
    assert probed["ranks"][0]["extrapolated_from_chunks"] == [3, 4, 5, 6]
    whole = run(tmp_path, 2, *flags, "--full-step")
    same(probed, whole)
    # each offloaded buffer extrapolated, then laid out and rounded as the runtime does
    assert probed["host_pinned_bytes"] == whole["host_pinned_bytes"]


def test_a_step_not_linear_in_its_layers_is_run_whole(tmp_path, capsys):
    # offload keeps two layers' state on the device: the peak's KV state does not grow with
    # the layers, and the extrapolation says so and runs them all
    result = run(tmp_path, 6, "--lengths=4096", "--chunking.chunk_size=1024",
                 "--chunking.offload=state", "--chunking.k=1")
    assert result["ranks"][0]["extrapolated_from_layers"] == []
    assert "running all 6 layers" in capsys.readouterr().err


def test_interpolation_is_exact_for_polynomials():
    xs = (3, 4, 5)
    assert _interpolate(xs, [2 * x * x - x + 7 for x in xs], 128) == 2 * 128 * 128 - 128 + 7
