"""Layout arithmetic, stage splitting and the errors a user meets before any process talks."""

import pytest
import torch

from chunkflow.cli import main
from chunkflow.parallel import Layout, split_stage, stage_layer_ranges
from chunkflow.plan.cost import CostModel, get_gpu
from chunkflow.models.families import model_shape
from tests.conftest import tiny_model


def test_ranks_are_pipeline_major():
    layout = Layout(dp=3, pp=2)
    assert [layout.coords(r) for r in range(6)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(layout.rank(*layout.coords(r)) == r for r in range(6))
    with pytest.raises(ValueError, match="pp must be a positive integer"):
        Layout(dp=1, pp=0)


def test_tensor_parallel_ranks_are_consecutive():
    """(dp, pp, tp) = (2, 2, 2): a stage's TP group is two consecutive ranks, then the stages."""
    layout = Layout(dp=2, pp=2, tp=2)
    assert layout.world_size == 8
    assert [(*layout.coords(r), layout.tp_rank(r)) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert all(layout.rank(*layout.coords(r), layout.tp_rank(r)) == r for r in range(8))


def test_tensor_parallel_degree_must_split_heads_and_mlp():
    from chunkflow.parallel.tensor import check_tp

    config = tiny_model().config  # 4 query heads, 2 key/value heads, MLP width 40
    check_tp(config, 2)
    with pytest.raises(ValueError, match=r"--parallel.tp=4 does not divide the model's "
                                         r"num_key_value_heads=2 \(each rank keeps the KV state"):
        check_tp(config, 4)
    with pytest.raises(ValueError, match="num_attention_heads=4"):
        check_tp(config, 3)


@pytest.mark.parametrize("layers,stages", [(4, 1), (4, 2), (7, 3), (28, 4), (5, 5)])
def test_stage_layers_match_the_cost_model(layers, stages):
    ranges = stage_layer_ranges(layers, stages)
    assert [i for r in ranges for i in r] == list(range(layers))
    model = tiny_model(num_hidden_layers=layers)
    cost = CostModel(model_shape(model.config), get_gpu("h100-80gb"), pp=stages)
    assert tuple(len(r) for r in ranges) == cost.stage_layers


def test_split_stage_keeps_its_modules_and_names():
    full = dict(tiny_model(num_hidden_layers=4).named_parameters())
    stages = [split_stage(tiny_model(num_hidden_layers=4), s, 3) for s in range(3)]
    names = [set(dict(m.named_parameters())) for m in stages]
    assert set().union(*names) == set(full) and sum(map(len, names)) == len(full)
    assert "model.embed_tokens.weight" in names[0] and "lm_head.weight" in names[2]
    assert stages[0].layer_ids == (0, 1) and stages[2].layer_ids == (3,)
    # The stages chained reproduce the whole model's forward.
    ids = torch.randint(0, 53, (1, 9))
    x = ids
    for stage in stages:
        x = stage.hidden_states(x)
    want = tiny_model(num_hidden_layers=4).hidden_states(ids)
    assert torch.allclose(x, want, rtol=0, atol=1e-12)


def test_refusals():
    with pytest.raises(ValueError, match="every stage needs a layer"):
        stage_layer_ranges(2, 3)
    with pytest.raises(ValueError, match="tied"):
        split_stage(tiny_model(tie_word_embeddings=True), 0, 2)


def test_fsdp_refuses_lora_and_experts_with_the_reason():
    import peft

    from chunkflow.parallel.data_parallel import check_fsdp
    from tests.models.test_hf_adapter import build

    check_fsdp(build("qwen2"))  # dense transformers models shard
    lora = peft.get_peft_model(build("qwen2"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="fsdp' with LoRA .* valid: --parallel.data_parallel=ddp"):
        check_fsdp(lora)
    with pytest.raises(ValueError, match="'mixtral' .* route no token to an expert"):
        check_fsdp(build("mixtral"))
    with pytest.raises(ValueError, match="got Linear"):
        check_fsdp(torch.nn.Linear(2, 2))


def test_a_step_that_sums_gradients_over_ranks_refuses_gradients_left_from_another():
    """Summing .grad in place over the ranks would count an earlier step's gradients again."""
    from chunkflow.parallel.data_parallel import DataParallelSync

    param = torch.nn.Parameter(torch.zeros(3))
    DataParallelSync(None, None, [param]).start()  # cleared: fine
    param.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"1 parameter\(s\) still hold a gradient .*"
                                         r"zero_grad\(set_to_none=True\)"):
        DataParallelSync(None, None, tp_partial=[param]).start()


def test_a_model_without_trainable_parameters_is_refused():
    from chunkflow.parallel import LocalContext, ParallelEngine

    model = tiny_model()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="the model has no trainable parameter"):
        ParallelEngine(model, LocalContext(torch.device("cpu")), chunk_size=16)


def test_pipeline_without_torchrun_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--parallel.pp=2", f"--train.output_dir={tmp_path}"]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err
