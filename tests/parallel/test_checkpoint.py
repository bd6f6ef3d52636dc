"""Checkpoint state on any layout: weights read by name from whichever shard holds them, and the
optimizer's torch.distributed.checkpoint metadata checked before pickle may run it."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from chunkflow.parallel.checkpoint import (
    check_metadata,
    load_optimizer,
    read_weights,
    save_optimizer,
)


def test_weights_are_read_by_name_from_stage_shards_and_tied_names_alias(tmp_path):
    a, b, emb = torch.randn(2, 3), torch.randn(4), torch.randn(5, 3)
    save_file({"model.layers.0.w": a, "model.embed_tokens.weight": emb},
              str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"model.layers.1.w": b}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {"model.layers.0.w": "model-00001-of-00002.safetensors",'
        ' "model.embed_tokens.weight": "model-00001-of-00002.safetensors",'
        ' "model.layers.1.w": "model-00002-of-00002.safetensors"}}')
    out = read_weights(tmp_path, ["model.layers.1.w", "lm_head.weight"], tied=True)
    assert torch.equal(out["model.layers.1.w"], b) and torch.equal(out["lm_head.weight"], emb)
    with pytest.raises(ValueError, match=r"lacks \['lm_head.weight'\]"):
        read_weights(tmp_path, ["lm_head.weight"], tied=False)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_optimizer_state_round_trips_and_a_metadata_pickle_that_runs_code_is_refused(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_optimizer(model, opt, tmp_path / "optimizer", rank=0)
    check_metadata(tmp_path / "optimizer")  # what dcp writes passes
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    load_optimizer(model, fresh, tmp_path / "optimizer")
    for param in model.parameters():
        want, got = opt.state[param], fresh.state[param]
        assert sorted(got) == ["exp_avg", "exp_avg_sq", "step"], sorted(got)
        assert all(torch.equal(want[k], got[k]) for k in got)

    (tmp_path / "optimizer" / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(ValueError, match="names posix.system"):
        load_optimizer(model, fresh, tmp_path / "optimizer")
