"""Distributed steps equal one process on the whole global batch (float64, CPU, gloo ranks):
data parallel (DDP, FSDP2), pipeline stages and tensor parallelism, and their compositions.

Batches mix chains and packed chunks, with masked prompts; each rank checks the gradients of the
parameters it holds against plain unchunked training of the whole batch, and the forward-only
evaluation loss against the unchunked token mean.
"""

import pytest
import torch

from tests.parallel.workers import (check_autocast, check_gradients, check_hf,
                                    check_vocab_loss_weight_gradient, spawn, train_lora)


def test_two_ranks_data_parallel_and_pipeline():
    spawn(check_gradients, 2, [
        dict(dp=2, pp=1, k=1, data_parallel="ddp", steps=2),
        dict(dp=2, pp=1, k=2, data_parallel="fsdp", steps=2),
        # float32 FSDP2 on gloo used to fail: "Cannot use ReduceOp.PREMUL_SUM with Gloo"
        dict(dp=2, pp=1, k=2, data_parallel="fsdp", dtype=torch.float32),
        dict(dp=2, pp=1, k=1, data_parallel="ddp", normalization="sequence"),
        dict(dp=2, pp=1, k=1, data_parallel="ddp", lengths=(50,)),   # one replica gets nothing
        dict(dp=2, pp=1, k=2, data_parallel="fsdp", lengths=(50,)),
        dict(dp=1, pp=2, k=1),
        dict(dp=1, pp=2, k=2, steps=2),
        dict(dp=1, pp=2, k=1, recompute="selective", offload="all"),
        dict(dp=2, pp=1, k=1, data_parallel="ddp", recompute="selective"),
        dict(dp=2, pp=1, k=1, data_parallel="fsdp", offload="state"),
        # sequence parallel and a vocabulary-parallel embedding and head, the defaults (the
        # vocabulary of 53 splits unevenly: 27 + 26 rows)
        dict(dp=1, pp=1, tp=2, k=1),
        dict(dp=1, pp=1, tp=2, k=2, recompute="selective"),
        dict(dp=1, pp=1, tp=2, k=1, sp=False),
        dict(dp=1, pp=1, tp=2, k=1, vp=False),
        dict(dp=1, pp=1, tp=2, k=2, sp=False, vp=False),
        # the vocabulary-parallel loss in blocks of 2 rows, sized by the wider part (27 rows)
        # on both ranks; float32
        dict(dp=1, pp=1, tp=2, k=1, logits_budget=26 * 8 * 3),
        dict(dp=1, pp=1, tp=2, k=2, dtype=torch.float32),
        dict(dp=1, pp=1, tp=2, k=2, ac=True),  # activation checkpointing recomputes the layers
        dict(dp=1, pp=1, tp=2, k=1, recompute="selective", offload="all"),
        # tied embedding and head, both with partial gradients per rank; o_proj's bias
        dict(dp=1, pp=1, tp=2, k=2, model=dict(tie_word_embeddings=True, model_type="llama",
                                               attention_bias=True)),
        # Qwen3's per-head q/k norms (partial gradients per rank) and Llama 3.1 RoPE
        dict(dp=1, pp=1, tp=2, k=2, model=dict(model_type="qwen3", head_dim=8, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    ])


def test_two_ranks_tensor_parallel_under_bf16_autocast():
    spawn(check_autocast, 2)


def test_vocabulary_parallel_loss_keeps_the_head_gradient_in_float32_under_bf16():
    spawn(check_vocab_loss_weight_gradient, 2)


def test_four_ranks_pipeline_and_data_x_pipeline():
    spawn(check_gradients, 4, [
        dict(dp=1, pp=4, k=1),
        dict(dp=1, pp=4, k=2),
        dict(dp=2, pp=2, k=1, data_parallel="ddp", steps=2),
        dict(dp=2, pp=2, k=2, data_parallel="fsdp", steps=2),
        dict(dp=2, pp=2, k=1, data_parallel="ddp", lengths=(50,)),
    ])


def test_four_ranks_tensor_parallel_with_pipeline_and_data_parallel():
    """TP=2 x PP=2 and DP=2 x TP=2 (DDP-style all-reduce and FSDP2 on the 2-D mesh), K=1 and
    K=2, with sequence parallelism and without: loss, every gradient and the clipped norm
    equal one unchunked process (float64)."""
    spawn(check_gradients, 4, [
        dict(dp=1, pp=2, tp=2, k=1),
        dict(dp=1, pp=2, tp=2, k=2, steps=2),
        dict(dp=1, pp=2, tp=2, k=1, sp=False),
        dict(dp=1, pp=2, tp=2, k=2, sp=False, vp=False),
        dict(dp=1, pp=1, tp=4, k=2, model=dict(num_key_value_heads=4)),
        dict(dp=2, pp=1, tp=2, k=1, data_parallel="ddp"),
        dict(dp=2, pp=1, tp=2, k=2, data_parallel="fsdp"),
        dict(dp=2, pp=1, tp=2, k=1, data_parallel="ddp", lengths=(50,)),
    ])


def test_two_ranks_hugging_face_models_data_and_tensor_parallel():
    """transformers models under DDP and FSDP2 (tied embeddings), TP=2 (chunkflow's plan on
    their own modules, with sequence parallelism and without; Qwen3 with its per-head q/k
    norms) and PP=2 (their decoder cut into stages), K=1 and K=2."""
    spawn(check_hf, 2, [
        dict(family="llama", dp=2, k=2),
        dict(family="qwen2", dp=1, tp=2, k=1),
        dict(family="qwen2", dp=1, tp=2, k=2, sp=False),
        dict(family="qwen2", dp=1, tp=2, k=1, vp=False),
        # the padding id's embedding row gets no gradient, on the rank that holds it
        dict(family="qwen2", dp=1, tp=2, k=1, config=dict(pad_token_id=40)),
        dict(family="llama", dp=1, tp=2, k=2),  # o_proj's bias
        dict(family="qwen3", dp=1, tp=2, k=2),
        dict(family="qwen2", dp=1, pp=2, k=2),
        dict(family="mistral", dp=1, pp=2, k=1),
        dict(family="mixtral", dp=2, k=1),  # summed by one all-reduce, not DDP
        dict(family="qwen2", dp=2, k=2, data_parallel="fsdp",
             config=dict(tie_word_embeddings=True)),
    ])


def test_four_ranks_hugging_face_tp_x_pp_and_dp_x_tp_and_fsdp_x_pp():
    spawn(check_hf, 4, [dict(family="qwen2", dp=2, tp=2, k=2),
                        dict(family="qwen2", dp=2, tp=2, k=1, data_parallel="fsdp"),
                        dict(family="qwen3", dp=2, pp=2, k=2, data_parallel="fsdp"),
                        dict(family="qwen2", dp=1, pp=2, tp=2, k=1),
                        dict(family="qwen3", dp=1, pp=2, tp=2, k=2)])


def test_lora_under_ddp_matches_one_process_and_resumes(tmp_path):
    """LoRA (with dropout) through the trainer on 2 DDP ranks: the adapter of one process after 4
    steps, and the same after stopping at step 2 and resuming. Each chunk's dropout masks are
    seeded by its id in the global batch, so the replicas draw the masks one process draws."""
    from safetensors.torch import load_file

    from chunkflow.cli import main
    from tests.train.checkpoint.test_resume import chat_job, hf_args
    from tests.train.test_trainer_hf import model_dir

    model, data = model_dir(tmp_path, tied=True), str(chat_job(tmp_path))
    lora = {"model.dtype": "float64", "lora.rank": "4", "lora.modules_to_save": "embed_tokens",
            "lora.dropout": "0.1", "train.steps": "4"}
    assert main(["train", *hf_args(str(tmp_path / "one"), model, data, **lora)]) == 0
    run = str(tmp_path / "ddp")
    spawn(train_lora, 2, run, model, data, 2, False)
    spawn(train_lora, 2, run, model, data, 4, True)
    one = load_file(tmp_path / "one" / "step-00000004" / "adapter_model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "step-00000004" / "adapter_model.safetensors")
    assert one.keys() == ddp.keys()
    for name in one:
        rel = float((ddp[name] - one[name]).norm() / one[name].norm())
        assert rel < 1e-9, (name, rel)
    assert (tmp_path / "ddp" / "step-00000004" / "merged" / "model.safetensors").is_file()


def test_lora_on_pipeline_stages_matches_one_process_across_layouts(tmp_path):
    """LoRA (a fully trained embedding on the first stage) on 2 pipeline stages through the
    trainer: 2 steps at PP=2 resumed in one process, and 2 steps in one process resumed at PP=2,
    both end with one process's 4-step adapter; the stages' adapters are saved as one PEFT
    file, and the merged model as stage shards with an index that from_pretrained loads."""
    import shutil

    import transformers
    from safetensors.torch import load_file

    from chunkflow.cli import main
    from tests.train.checkpoint.test_resume import chat_job, hf_args
    from tests.train.test_trainer_hf import model_dir

    model, data = model_dir(tmp_path, tied=False), str(chat_job(tmp_path))
    # no dropout: a stage's layers would draw other masks than one process's
    lora = {"model.dtype": "float64", "lora.rank": "4", "lora.modules_to_save": "embed_tokens",
            "lora.dropout": "0.0"}
    one = tmp_path / "one"
    assert main(["train", *hf_args(str(one), model, data, **lora, **{"train.steps": "4"})]) == 0
    pp2 = {"parallel.pp": "2", "lora.dropout": "0.0"}
    spawn(train_lora, 2, str(tmp_path / "a"), model, data, 2, False, pp2)
    merged = tmp_path / "a" / "step-00000002" / "merged"
    assert (merged / "model.safetensors.index.json").is_file()
    transformers.AutoModelForCausalLM.from_pretrained(merged)  # every tensor, from both stages
    assert main(["train", *hf_args(str(tmp_path / "a"), model, data, **lora, **{
        "train.steps": "4", "checkpoint.resume": "true", "parallel.pp": "1"})]) == 0
    shutil.copytree(one, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "step-00000004")
    spawn(train_lora, 2, str(tmp_path / "b"), model, data, 4, True, pp2)
    want = load_file(one / "step-00000004" / "adapter_model.safetensors")
    for run in ("a", "b"):
        got = load_file(tmp_path / run / "step-00000004" / "adapter_model.safetensors")
        assert got.keys() == want.keys(), run
        for name in want:
            rel = float((got[name] - want[name]).norm() / want[name].norm())
            assert rel < 1e-9, (run, name, rel)



def test_zero_bubble_schedule_on_two_ranks_matches_one_process():
    """The zero-bubble split backward (I, then W) gives one process's gradients, float64."""
    spawn(check_gradients, 2, [
        dict(dp=1, pp=2, k=1, schedule="zb-h1"),
        dict(dp=1, pp=2, k=2, schedule="zb-h1", steps=2),
        dict(dp=1, pp=2, k=1, schedule="zb-h1", recompute="selective", offload="all"),
        dict(dp=1, pp=2, k=2, schedule="zb-h1", offload="state"),
        dict(dp=1, pp=2, k=1, schedule="zb-h2", steps=2),
        dict(dp=1, pp=2, k=2, schedule="zb-h2", recompute="selective"),
        # the engine's own transport: a 2-rank process group per pair and direction
        dict(dp=1, pp=2, k=1, schedule="zb-h2", own_transport=True),
    ])


def test_zero_bubble_schedule_on_four_ranks_pp_dp_x_pp_and_pp_x_tp():
    spawn(check_gradients, 4, [
        dict(dp=1, pp=4, k=1, schedule="zb-h1"),
        dict(dp=1, pp=4, k=2, schedule="zb-h1", recompute="selective"),
        dict(dp=2, pp=2, k=1, data_parallel="ddp", steps=2, schedule="zb-h1"),
        dict(dp=1, pp=2, tp=2, k=1, schedule="zb-h1"),
        dict(dp=1, pp=2, tp=2, k=2, schedule="zb-h1", recompute="selective"),
        dict(dp=1, pp=4, k=1, schedule="zb-h2"),
        dict(dp=2, pp=2, k=2, data_parallel="ddp", schedule="zb-h2", own_transport=True),
    ])


def test_zero_bubble_schedules_with_hugging_face_models_on_two_stages():
    spawn(check_hf, 2, [
        dict(family="qwen2", dp=1, pp=2, k=1, schedule="zb-h1"),
        dict(family="llama", dp=1, pp=2, k=2, schedule="zb-h2"),
    ])


def test_compiled_layers_on_two_ranks_match_one_process():
    """Compiled decoder layers (inductor, gloo) under 1F1B stages, DDP and FSDP2: float64
    gradients equal one unchunked process."""
    spawn(check_gradients, 2, [
        # (the engine's own transport: the NCCL-rules emulation gives a peer 10 s, which a
        # first compile on a loaded machine can take; compiling changes no message)
        dict(dp=1, pp=2, k=2, compile=True, own_transport=True),
        dict(dp=2, pp=1, k=1, data_parallel="ddp", compile=True, recompute="selective"),
        dict(dp=2, pp=1, k=2, data_parallel="fsdp", compile=True),
    ])


@pytest.mark.slow  # ~1 min of compiling DTensor graphs
def test_compiled_layers_under_tensor_parallelism_match_one_process():
    spawn(check_gradients, 2, [dict(dp=1, pp=1, tp=2, k=2, compile=True)])
