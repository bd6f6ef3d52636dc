"""The command line: plan output (lengths and configured data), report, and bad input."""

import json

import pytest

from chunkflow.cli import main


def test_plan_of_lengths_prints_chunks_and_schedule(capsys):
    assert main(["plan", "--lengths", "10,3,25", "--chunking.chunk_size=8",
                 "--chunking.k=1"]) == 0
    out = capsys.readouterr().out
    assert "3 sequences, 38 tokens -> 6 chunks of 8 (lower bound 5), 2 chains" in out
    assert "s0[8:10] s1[0:3]" in out  # the short sequence packed into chain 0's tail
    assert "schedule (k=1): S0 F1 B1 R0 B0 S2 S3 S4 F5 B5 R4 B4 R3 B3 R2 B2" in out
    assert "estimated peak memory (tiny, float32, k=1)" in out


def test_plan_shows_what_recompute_offload_and_checkpointing_change(capsys):
    assert main(["plan", "--lengths", "9000,300,120", "--chunking.chunk_size=2048",
                 "--chunking.recompute=selective", "--chunking.offload=state"]) == 0
    out = capsys.readouterr().out
    assert "k=1, recompute=selective, offload=state): peak " in out
    assert "in host memory" in out.splitlines()[1]
    other = out.splitlines()[2]
    assert other.startswith("  other settings: recompute=full: ")
    assert "recompute=selective, offload=all" not in other  # only what changes one setting
    assert "offload=all: " in other and "offload=none: " in other
    assert "activation_checkpointing=true: " in other
    assert "schedule (k=1): s0 s1 s2 s3 F4 B4 r3 B3 r2 B2 r1 B1 r0 B0" in out


def test_plan_prices_an_offloaded_state_in_the_cuda_kernel_s_layout(capsys):
    """16-bit compute runs varlen on CUDA, whose chain state holds a chunk of rows past its
    prefix: the host figure of an offloaded state counts them; float32 (the math kernel) not."""
    from chunkflow.plan import build_chunks
    from chunkflow.plan.memory import estimate_peak_memory
    from chunkflow.train.build import configured_shape
    from chunkflow.train.config import TrainConfig

    shape = configured_shape(TrainConfig())  # the default model, as plan builds it
    plan = build_chunks([9000, 300, 120], chunk_size=2048)
    hosts = []
    for extra, options, bytes_ in ((2048, ["--train.autocast=bf16"], 2), (0, [], 4)):
        assert main(["plan", "--lengths", "9000,300,120", "--chunking.chunk_size=2048",
                     "--chunking.offload=state", *options]) == 0
        line = capsys.readouterr().out.splitlines()[1]
        est = estimate_peak_memory(shape, plan, k=1, param_bytes=4, activation_bytes=bytes_,
                                   offload="state", state_extra_rows=extra)
        assert line.endswith(est.summary()), (line, est.summary())
        hosts.append((est.host, estimate_peak_memory(
            shape, plan, k=1, param_bytes=4, activation_bytes=bytes_, offload="state").host))
    assert hosts[0][0] > hosts[0][1] and hosts[1][0] == hosts[1][1]


def test_plan_of_configured_data(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input_ids": list(range(n))}) + "\n"
                            for n in (10, 3, 25, 7, 30)))
    assert main(["plan", f"--data.path={data}", "--data.shuffle_buffer=0",
                 "--data.batch_size=3", "--chunking.chunk_size=8", "--batches=2"]) == 0
    out = capsys.readouterr().out
    assert "global batch 1: 3 sequences, 38 tokens -> 6 chunks of 8" in out
    assert "global batch 2: 3 sequences, 47 tokens" in out  # the stream wraps into epoch 2
    assert out.count("estimated peak memory") == 2
    # the default configuration: the built-in data
    assert main(["plan", "--batches=1"]) == 0
    assert "global batch 1: 32 sequences" in capsys.readouterr().out


def test_report_writes_a_png(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", f"--train.output_dir={run}", "--train.steps=2", "--log.progress=false",
                 "--data.synthetic_max_len=100", "--data.batch_size=2"]) == 0
    assert main(["report", str(run)]) == 0
    png = run / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_bad_input_is_a_clear_error(capsys):
    assert main(["plan", "--lengths", "10,0", "--chunking.chunk_size=8"]) == 2
    assert "--lengths '10,0': '0' is not a positive length or LENGTHxCOUNT" in \
        capsys.readouterr().err
    assert main(["plan", "--lengths", "5,x"]) == 2
    assert "--lengths '5,x': 'x' is not a positive length" in capsys.readouterr().err
    assert main(["plan", "--lengths", "5", "--batches=0"]) == 2
    assert "--batches=0: must be a positive integer" in capsys.readouterr().err


def test_simulate_prints_the_paper_figure_and_a_trace(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert main(["simulate", "--order", "standalone-first", "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "plain 1F1B, one sequence per micro-batch: makespan 56, bubble ratio 57.14%" in out
    assert ("state-aware 1F1B (k=2, standalone-first order): makespan 46, bubble ratio 47.83%"
            in out)
    assert "stage 3: F2 B2 F3 B3 F0 F1 B1 B0" in out
    assert len([e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]) == 32
    assert main(["simulate", "--order", "search"]) == 0
    assert "(k=2, search order): makespan 44" in capsys.readouterr().out
    assert main(["simulate", "--lengths", "4,x"]) == 2


def test_plan_auto_prints_the_best_candidates(capsys):
    assert main(["plan", "--auto", "--model", "qwen2.5-7b", "--max-len", "32K", "--gpus", "4",
                 "--memory-budget", "80GiB", "--global-batch", "32", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "auto-tune: qwen2.5-7b on 4 x H100-80GB, max length 32K" in out
    assert out.count("<TP") == 3 and "*" in out
    assert main(["plan", "--auto", "--memory-budget", "1GiB", "--max-len", "32K", "--gpus",
                 "4", "--global-batch", "8"]) == 2
    assert "chunkflow: error: " in capsys.readouterr().err


def test_ignored_options_are_named_and_bad_ones_fail_before_output(capsys):
    assert main(["plan", "--lengths", "10,3", "--gpus", "8"]) == 0
    assert "warning: --gpus only apply with --auto; ignored" in capsys.readouterr().err
    assert main(["simulate", "--k", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "k must be a positive integer, got 0" in err


def test_plan_counts_with_the_model_directorys_tokenizer(tmp_path, capsys):
    """Issue 13.3: plan counted a --model.path run's data with the byte tokenizer (36,399 tokens
    for a batch that trains as 9,172) and called the model "tiny"."""
    import transformers

    from tests.train.test_trainer_hf import CHATS, model_dir

    model = model_dir(tmp_path, tied=False)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    assert main(["plan", f"--model.path={model}", f"--data.path={data}", "--batches=1",
                 "--data.shuffle_buffer=0", "--data.batch_size=3",
                 "--chunking.chunk_size=64"]) == 0
    out = capsys.readouterr().out
    tok = transformers.AutoTokenizer.from_pretrained(model)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) if "messages" in r
             else r["text"] for r in CHATS]
    tokens = sum(len(tok.encode(t, add_special_tokens=False)) for t in texts) + 1  # text: EOS
    assert f"global batch 1: 3 sequences, {tokens} tokens" in out
    assert f"estimated peak memory ({model} (hf), float32" in out and "(tiny" not in out


def test_plan_prices_lora_by_its_trained_parameters(tmp_path, capsys):
    """``chunkflow plan --lora.rank`` priced a full fine-tune (gradients and AdamW state for
    every frozen weight); it now counts the adapters peft builds."""
    import re

    pytest.importorskip("peft")
    from tests.train.test_trainer_hf import model_dir

    model = model_dir(tmp_path, tied=False)
    base = ["plan", f"--model.path={model}", "--lengths=200,50", "--chunking.chunk_size=64"]
    assert main([*base, "--lora.rank=4"]) == 0
    lora = capsys.readouterr().out
    assert main(base) == 0
    full = capsys.readouterr().out
    trained = int(re.search(r"LoRA \(([\d,]+) trained parameters\)", lora)[1].replace(",", ""))
    # per layer: rank 4 x (in + out) of q, k, v, o, gate, up, down (hidden 32, q 32, kv 16,
    # MLP 48), two layers
    assert trained == 2 * 4 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 2 * (32 + 48) + (48 + 32))
    grads = re.compile(r"grads ([\d.]+) (KiB|MiB)")
    assert grads.search(full)[1] != grads.search(lora)[1]
    assert "LoRA" not in full


def test_plan_auto_tunes_the_users_own_run(tmp_path, capsys):
    """Issue 13: plan --auto took only the built-in 7B-72B shapes and a synthetic batch."""
    from tests.train.test_trainer_hf import CHATS, model_dir

    model = model_dir(tmp_path, tied=False)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHATS * 40))
    assert main(["plan", "--auto", f"--model.path={model}", f"--data.path={data}",
                 "--data.batch_size=8", "--gpus=2", "--memory-budget=1GiB", "--top=8"]) == 0
    out = capsys.readouterr().out
    assert f"auto-tune: {model} (hf) on 2 x H100-80GB, the first 3 global batch(es) of " \
           f"{data}" in out
    # the layouts chunkflow runs: TP with sequence parallelism, pipelines for an hf model
    assert "<TP 1, SP 1, PP 1> x DP 2" in out and "<TP 2, SP 2, PP 1> x DP 1" in out
    assert "<TP 1, SP 1, PP 2> x DP 1" in out
    assert main(["plan", "--auto", f"--model.path={model}", f"--data.path={data}",
                 "--data.batch_size=8", "--gpus=2", "--memory-budget=1GiB", "--top=8",
                 "--parallel.sequence_parallel=false"]) == 0
    no_sp = capsys.readouterr().out
    assert "<TP 2, SP 1, PP 1> x DP 1" in no_sp and "SP 2" not in no_sp
    # LoRA runs data parallel (DDP) and on pipeline stages; tensor parallelism refuses it
    assert main(["plan", "--auto", f"--model.path={model}", f"--data.path={data}",
                 "--data.batch_size=8", "--gpus=2", "--memory-budget=1GiB", "--top=8",
                 "--lora.rank=4"]) == 0
    lora = capsys.readouterr().out
    assert "<TP 1, SP 1, PP 1> x DP 2" in lora and "<TP 1, SP 1, PP 2> x DP 1" in lora
    assert "TP 2" not in lora
    assert (f"-m chunkflow train --data.batch_size=8 --data.path={data} --lora.rank=4 "
            f"--model.path={model} --chunking.chunk_size=") in lora
    assert "--parallel.data_parallel=fsdp" not in lora  # LoRA: DDP when data parallel
    # pipeline layouts are tried with every schedule; a zero-bubble choice is launched so
    assert " zb-h1 " in lora and " zb-h2 " in lora
    if "--parallel.pp=2" in lora.splitlines()[-1]:
        assert "--parallel.schedule=" in lora.splitlines()[-1]
    # the command that launches the choice, with the run's own options
    assert (f"launch it: torchrun --nproc-per-node 2 -m chunkflow train --data.batch_size=8 "
            f"--data.path={data} --model.path={model} --chunking.chunk_size=") in out
    # presets by name, the 0.5B included
    assert main(["plan", "--auto", "--model", "qwen2.5-0.5b", "--gpus=1", "--max-len=32K",
                 "--global-batch=8", "--top=1"]) == 0
    assert "auto-tune: qwen2.5-0.5b on 1 x H100-80GB" in capsys.readouterr().out
    assert main(["plan", "--auto", "--model", "qwen2.5-7b", f"--model.path={model}"]) == 2
    assert "both given" in capsys.readouterr().err
    # a named model with the run's data: its vocabulary, not the tiny preset's, checks the ids;
    # sequences shorter than the smallest chunk size still get a candidate
    ids = tmp_path / "ids.jsonl"
    ids.write_text("".join(json.dumps({"input_ids": [151000 + i, 5, 7]}) + "\n" for i in range(8)))
    assert main(["plan", "--auto", "--model", "qwen2.5-7b", f"--data.path={ids}", "--gpus=4",
                 "--data.batch_size=4", "--top=1"]) == 0
    assert "... --chunking.chunk_size=128 --chunking.k=1" in capsys.readouterr().out


def test_plan_auto_launch_command_spells_out_the_layout():
    from chunkflow.train.auto.launch import launch_command
    from chunkflow.sim.tune import Candidate

    one = Candidate(4096, 2, 1, 1, 1, 1.0, 1.0, 0.0)
    assert launch_command(one, gpus=1) == \
        "chunkflow train ... --chunking.chunk_size=4096 --chunking.k=2"
    big = Candidate(8192, 1, 4, 2, 4, 1.0, 1.0, 0.0)
    assert launch_command(big, gpus=32, run=" --config sft.toml") == (
        "torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 "
        "-m chunkflow train --config sft.toml --chunking.chunk_size=8192 --chunking.k=1 "
        "--parallel.tp=4 --parallel.pp=2 --parallel.data_parallel=fsdp")
    assert big.layout == "<TP 4, SP 4, PP 2> x DP 4"
    assert launch_command(Candidate(512, 1, 2, 1, 2, 1.0, 1.0, 0.0), gpus=4, fsdp=False).endswith(
        "--parallel.tp=2 --parallel.data_parallel=ddp")
    assert launch_command(Candidate(512, 1, 2, 1, 2, 1.0, 1.0, 0.0, sp=1), gpus=4).endswith(
        "--parallel.tp=2 --parallel.sequence_parallel=false --parallel.data_parallel=fsdp")
    # with a config file, whose layout the launch line must override, the defaults too
    assert launch_command(one, gpus=2, explicit=True).endswith(
        "--chunking.k=2 --chunking.auto=false --parallel.tp=1 --parallel.pp=1")
    assert "--parallel.tp=2 --parallel.vocab_parallel=false " in launch_command(
        Candidate(512, 1, 2, 1, 2, 1.0, 1.0, 0.0), gpus=4, vocab_parallel=False)


def test_plan_auto_plans_for_this_machine_or_asks_for_the_cluster(tmp_path, capsys,
                                                                   monkeypatch):
    """Issue 25 §4: on a CPU box plan --auto proposed 16 x H100 for a tiny model; its launch
    line with a run's config.toml failed ("already holds checkpoints")."""
    import torch

    assert main(["plan", "--auto", "--model=tiny", "--max-len=4K"]) == 2
    assert ("this machine has no CUDA device; valid: --gpus N (and --gpu h100-80gb or "
            "a100-80gb)") in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA A100-SXM4-80GB")
    assert main(["plan", "--auto", "--model=tiny", "--max-len=4K", "--global-batch=8"]) == 0
    out = capsys.readouterr().out
    assert "on 2 x A100-80GB" in out and "the GPUs: this machine's CUDA devices)" in out
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA L4")
    assert main(["plan", "--auto", "--model=tiny", "--max-len=4K"]) == 2
    assert "no cost profile for this machine's 'NVIDIA L4'" in capsys.readouterr().err
    # a run's own configuration: the launch line continues its directory or starts it
    run = tmp_path / "run"
    assert main(["plan", "--auto", "--model.preset=tiny", f"--train.output_dir={run}",
                 "--gpus=2", "--global-batch=8", "--max-len=4K"]) == 0
    assert f"--train.output_dir={run} --resume=auto" in capsys.readouterr().out
