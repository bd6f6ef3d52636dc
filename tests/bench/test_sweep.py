"""The sweep: budget selection against made-up measurements, the files it writes, the worker
process and the command line."""

import json

import pytest

from chunkflow.bench import report
from chunkflow.bench.options import BenchOptions, MethodConfig
from chunkflow.bench.sweep import _run_worker, budget_candidates, command_line, run, table_rows
from chunkflow.cli import main

MiB = 2**20


def fake_worker(figures):
    """A worker that reports ``figures[label] = (seconds per step, peak MiB)``, and records."""
    calls = []

    def worker(spec):
        label = MethodConfig(**spec["method"]).label
        calls.append((spec["max_len"], label))
        seconds, peak = figures(spec["max_len"], label)
        step = {"seconds": seconds, "forward_backward_seconds": seconds, "optimizer_seconds": 0.0,
                "loss": 1.0, "micro_batches_run": 1, "micro_batches": 1, "tokens": 1000,
                "supervised_tokens": 500, "model_flops": 1e9, "executed_flops": 1.5e9}
        return {"spec": spec, "label": label, "peak_bytes": peak * MiB, "base_bytes": 0,
                "steps": [step]}

    worker.calls = calls
    return worker


def test_budget_picks_each_methods_fastest_configuration_that_fits(tmp_path):
    def figures(max_len, label):
        if label.startswith("chunkflow"):  # one chunk per sequence: faster and larger
            return (0.8, 300) if f"chunk {max_len}, K=1)" in label else (1.0, 100)
        if "full recompute" in label or "checkpointing" in label:
            return 1.3, 400
        return 1.0, 450 if max_len == 1024 else 2000

    worker = fake_worker(figures)
    o = BenchOptions(lengths=(1024, 8192), memory_budget=500 * MiB, output_dir=str(tmp_path))
    md = run(o, log=lambda line: None, worker=worker).read_text()
    # no configuration is measured twice, and a recompute variant of a fitting one is skipped
    assert len(worker.calls) == len(set(worker.calls))
    assert (1024, "Megatron padded (mbs 1, full recompute)") not in worker.calls
    assert (8192, "Megatron padded (mbs 1, full recompute)") in worker.calls
    short, long = md.split("within a memory budget of 500 MiB")[1].split("maximum length 8192")
    for budget, n in ((short, 1024), (long, 8192)):  # the tuner's first, 0.8 s and 300 MiB
        assert f"| chunkflow | chunkflow (chunk {n}, K=1) | 1250 | 300 | 1.00x |" in budget
    # 1024: everything fits without recompute; 8192: only with it (1.3 s vs chunkflow's 0.8 s)
    assert "| Megatron packed | ideal: packed, no recompute | 1000 | 450 | 1.25x |" in short
    assert "| ideal | ideal: packed, no recompute | 1000 | 450 | 1.25x |" in short
    assert "| Megatron packed | Megatron packed, full recompute | 769 | 400 | 1.63x |" in long
    assert "| HF flattened | HF flattened (mbs 4, grad. checkpointing) | 769 | 400 | 1.63x |" \
        in long
    assert "| ideal | none fits 500 MiB (out of memory) |" in long


def test_budget_skips_recompute_when_the_plain_configuration_fits(tmp_path):
    worker = fake_worker(lambda n, label: (1.0, 100))
    run(BenchOptions(lengths=(512,), output_dir=str(tmp_path)), log=lambda line: None,
        worker=worker)
    labels = {label for _, label in worker.calls}
    assert "Megatron padded (mbs 1, full recompute)" not in labels  # not a table row, dominated
    assert "Megatron packed, full recompute" in labels  # a table row: always measured


def test_files_carry_hardware_and_date_and_every_method(tmp_path):
    worker = fake_worker(lambda n, label: (2.0, 50))
    o = BenchOptions(lengths=(256, 512), memory_budget=None, output_dir=str(tmp_path))
    md_path = run(o, log=lambda line: None, worker=worker)
    info = report.machine()
    stem = f"bench-{report.hardware_slug(info, 'cpu')}-{info['date']}"
    assert md_path.name == stem + ".md"
    assert (tmp_path / (stem + ".png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / (stem + ".json")).read_text())
    assert data["command"] == "chunkflow bench --lengths 256,512 --memory-budget none"
    assert len(data["measurements"]) == 2 * len(table_rows(o))
    md = md_path.read_text()
    for _, config in table_rows(o):
        assert md.count(f"| {config.label} |") == 2
    assert "within a memory budget" not in md


def test_hardware_slug():
    assert report.hardware_slug({"cpu": "AMD EPYC 7B13 64-Core Processor", "cpu_threads": 2},
                                "cpu") == "amd-epyc-7b13-2t"
    assert report.hardware_slug({"cpu": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
                                 "cpu_threads": 8}, "cpu") == "intel-xeon-platinum-8481c-8t"
    assert report.hardware_slug({"gpu": "NVIDIA H100 80GB HBM3"}, "cuda") == \
        "nvidia-h100-80gb-hbm3"


def test_chunkflow_budget_candidates_are_the_auto_tuners():
    """The bench's chunkflow candidates are --chunking.auto's best three, budget and static
    memory as the tuner sees them; a generous budget needs no chain at all."""
    from chunkflow.bench.workload import batch_lengths, get_model_config
    from chunkflow.plan.auto import choose_settings
    from chunkflow.plan.cost import CPU_PROFILE, ModelShape

    o = BenchOptions(memory_budget=48 << 20)
    shape = ModelShape.from_config(get_model_config("cpu"))
    batches = [batch_lengths(16384, 16, seed=i) for i in range(o.steps_at(16384))]
    best = choose_settings(shape, batches, profile=CPU_PROFILE, max_length=16384,
                           memory_budget=(48 << 20) + 16 * shape.num_params)[:3]
    got = budget_candidates(o, 16384)["chunkflow"]
    assert [(c.chunk_size, c.k, c.selective, c.recompute) for c in got] == [
        (b.settings.chunk_size, b.settings.k, b.settings.recompute == "selective",
         b.settings.activation_checkpointing) for b in best]
    assert budget_candidates(BenchOptions(memory_budget=8 << 30), 4096)["chunkflow"][0] == \
        MethodConfig("chunkflow", chunk_size=4096, k=1)
    assert budget_candidates(BenchOptions(memory_budget=1 << 20), 32768)["chunkflow"] == []


def test_worker_process_measures_and_reports_failures():
    spec = {"method": {"method": "packed", "recompute": True}, "model": "cpu", "max_len": 300,
            "num_sequences": 3, "steps": 2, "seed": 0, "device": "cpu", "dtype": "float32",
            "max_micro_batches": 1}
    result = _run_worker(spec)
    assert len(result["steps"]) == 2 and result["peak_bytes"] > 0
    row = report.summarise(result)
    assert row["work"] > 1.0 and row["loss"] > 0 and not row["sampled"]
    bad = _run_worker({**spec, "model": "huge"})
    assert bad["error"] == "ValueError: unknown benchmark model 'huge'; known: cpu, gpu"


def test_peak_memory_sees_a_large_allocation():
    import torch

    from chunkflow.bench.worker import PeakMemory

    meter = PeakMemory(torch.device("cpu"))
    meter.reset()
    x = torch.ones(64 * MiB // 4)  # 64 MiB, written
    del x
    assert meter.peak() >= 60 * MiB


@pytest.mark.parametrize("args, message", [
    (["--lengths", "4K,0"], "size '0' is not a positive whole number"),
    (["--memory-budget", "lots"], "cannot read size 'lots'"),
    (["--steps", "0"], "steps must be a positive integer"),
    (["--device", "tpu"], "device='tpu'; valid: cpu, cuda"),
    (["--extra"], "unexpected arguments --extra"),
])
def test_bad_options_are_clear_errors(args, message, capsys):
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["bench", "--device", "cuda"]) == 2
    assert "--device cuda: torch sees no CUDA device here" in capsys.readouterr().err


def test_command_line_reproduces_the_options():
    assert command_line(BenchOptions()) == "chunkflow bench"
    o = BenchOptions(lengths=(4096,), k=2, memory_budget=512 * MiB)
    assert command_line(o) == "chunkflow bench --lengths 4096 --k 2 --memory-budget 512MiB"


def test_worker_times_chunkflow_actions_through_the_engines_hook():
    method = {"method": "chunkflow", "chunk_size": 64, "k": 1, "selective": True,
              "recompute": True}
    spec = {"method": method, "model": "cpu", "max_len": 300, "num_sequences": 3, "steps": 1,
            "seed": 0, "device": "cpu", "dtype": "float32", "time_actions": True}
    result = _run_worker(spec)
    assert result["label"] == "chunkflow (chunk 64, K=1, selective, act. checkpointing)"
    assert set(result["action_seconds"]) == {"s", "F", "B", "r"}
    assert sum(result["action_seconds"].values()) < result["steps"][0]["seconds"]
    assert "action_seconds" not in _run_worker({**spec, "time_actions": False})
    with pytest.raises(ValueError, match="selective recompute is chunkflow's"):
        MethodConfig("packed", selective=True)
