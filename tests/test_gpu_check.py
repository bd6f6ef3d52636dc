"""The prepared device check: its --smoke mode takes the same code paths on CPU (tiny), so a
broken script is found here, not on the lent GPU's clock; and its pieces that decide what the
GPU run reports (the GPU-name table, the time guard, the out-of-memory guard, the memory
verdicts) are checked against hand-computed references."""

import importlib.util
import platform
import sys
from pathlib import Path

import pytest
import torch

from chunkflow.models import get_preset

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def run_smoke(gc, tmp_path, *extra):
    code = gc.main(["--smoke", "--output-dir", str(tmp_path), *extra])
    (table,) = tmp_path.glob("gpu_check-smoke-*.md")
    rows = {}
    for line in table.read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| check"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return code, rows


def test_gpu_check_smoke_runs_every_section_and_saves_a_table(gc, tmp_path):
    code, rows = run_smoke(gc, tmp_path)
    assert code == 0
    assert rows["bf16 step vs plain"][0] == "ok"
    assert rows["cpu-flash self-check"][0] == "ok"
    # the memory verdicts are judged in the smoke too (the CPU meter: no weights, exact bytes)
    assert rows["peak minus KV state 1K / 256"][0] == "ok"
    assert rows["peak vs memory model 256"][0] == "ok"
    assert rows["peak vs memory model 1K"][0] == "ok"
    for label in ("chunkflow 256 chunk 64 K=1", "chunkflow 1K chunk 64 K=2",
                  "chunkflow 128 chunk 64 K=1", "ideal (one packed varlen chunk) 128",
                  "HF flattened (mbs 4, SDPA, no flash-attn) 128",
                  "K=1 selective recompute, offload all 1K"):
        assert rows[label][0].endswith("tok/s"), (label, rows[label])
        assert "MFU unknown" in rows[label][2]  # a CPU is not in the table: no guess
    # the offloaded state moves (the smoke model has more layers than stay on the device)
    for label in ("K=1 full recompute, offload state 1K",
                  "K=1 selective recompute, offload all 1K"):
        moved = rows[label][3].rsplit(",", 1)[1].split()  # e.g. 4.22 MiB to host
        assert moved[2:] == ["to", "host"] and float(moved[0]) > 0, (label, moved)
    assert (tmp_path / next(tmp_path.glob("*.md")).name).with_suffix(".json").exists()


# ---- MFU's peak: exact product names


def test_peak_bf16_matches_exact_product_names(gc):
    sxm, pcie, nvl = (gc.peak_bf16(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
                                                "NVIDIA H100 NVL"))
    assert (sxm[0], pcie[0], nvl[0]) == (989.4e12, 756.5e12, 835.5e12)  # datasheets / 2
    assert all(source for _, source in (sxm, pcie, nvl))
    assert gc.peak_bf16("NVIDIA H200")[0] == 989.4e12
    for a100 in ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe"):
        assert gc.peak_bf16(a100)[0] == 312e12
    assert gc.peak_bf16("NVIDIA L40S")[0] == 362.05e12


@pytest.mark.parametrize("name", ["H100", "NVIDIA H100", "NVIDIA H100 80GB HBM3e (unreleased)",
                                  "Tesla V100-SXM2-16GB", "CPU x86_64", ""])
def test_peak_bf16_unknown_name_is_none(gc, name):
    assert gc.peak_bf16(name) is None


def test_mfu_row_uses_the_peak_and_says_unknown_without_one(gc, tmp_path):
    report = gc.Report(stem=tmp_path / "t", title="t", header="h")
    check = gc.Check(device=torch.device("cpu"), report=report, budget=gc.Budget(100),
                     peak=(1e12, "a datasheet"))
    check.timing_row("a", num_tokens=1000, seconds=2.0, peak=None, flops=5e11, kind="x")
    check.peak = None
    check.timing_row("b", num_tokens=1000, seconds=2.0, peak=None, flops=5e11, kind="x")
    assert report.rows[0][1:4] == ("500 tok/s", "peak n/a (CPU)", "MFU 25.0%, 2.00 s")
    assert report.rows[1][3] == "MFU unknown, 2.00 s"


# ---- the time guard


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_budget_estimates_from_measured_rates(gc):
    clock = FakeClock()
    budget = gc.Budget(100, clock=clock)
    assert budget.estimate("chunkflow", 1e12) is None  # nothing measured yet
    budget.record("chunkflow", 1e12, 2.0)
    budget.record("hf", 1e12, 8.0)
    assert budget.estimate("chunkflow", 3e12) == pytest.approx(6.0 * budget.MARGIN)
    assert budget.estimate("offload", 1e12) == pytest.approx(8.0 * budget.MARGIN)  # slowest
    clock.now = 30.0
    assert budget.left() == 70.0


def test_section_estimated_over_budget_is_skipped_and_reported(gc, tmp_path):
    clock = FakeClock()
    report = gc.Report(stem=tmp_path / "t", title="t", header="h")
    check = gc.Check(device=torch.device("cpu"), report=report,
                     budget=gc.Budget(60, clock=clock), peak=None)
    check.budget.record("chunkflow", 1e12, 10.0)
    clock.now = 20.0  # 40 s left; a 4e12-FLOP step is estimated at 40 s x 1.25
    ran = []
    assert check.section("big", lambda: ran.append(1), kind="chunkflow", flops=4e12) is None
    assert check.section("small", lambda: ran.append(1) or "v", kind="chunkflow",
                         flops=1e12) == "v"
    assert ran == [1]
    assert report.rows[0][:2] == ("big", gc.SKIPPED)
    assert report.rows[0][2] == "estimated 50 s, 40 s left"
    assert "skipped: would not finish within the budget" in (tmp_path / "t.md").read_text()
    clock.now = 61.0  # nothing left: even an unestimated section is skipped
    check.section("late", lambda: ran.append(2))
    assert ran == [1] and report.rows[-1][:2] == ("late", gc.SKIPPED)


def test_smoke_with_no_budget_skips_every_section(gc, tmp_path):
    code, rows = run_smoke(gc, tmp_path, "--budget-s", "0")
    assert code == 0
    skipped = [gc.SKIPPED, "not estimated, 0 s left", "", ""]
    cpu = f"CPU {platform.machine()}"
    assert rows == {"MFU peak": ["unknown", f"{cpu!r} is not in chunkflow.plan.gpus: MFU not reported",
                                 "", ""],
                    "gpu tests": skipped, "attention self-check": skipped}


# ---- the out-of-memory guard


def test_section_out_of_memory_is_a_row_and_the_run_goes_on(gc, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("injected")

    monkeypatch.setattr(gc, "hf_step", oom)
    monkeypatch.setattr(gc, "plain_step", oom)
    code, rows = run_smoke(gc, tmp_path)
    assert code == 0  # out of memory is reported, not a failure of the check
    assert rows["HF flattened (mbs 4, SDPA, no flash-attn) 128"][0] == "out of memory"
    assert rows["bf16 step vs plain"][0] == "out of memory"
    # the sections after each one ran
    assert rows["chunkflow 256 chunk 64 K=1"][0].endswith("tok/s")
    assert rows["K=1 selective recompute, offload all 1K"][0].endswith("tok/s")


def test_section_error_is_a_failed_row_and_the_run_goes_on(gc, tmp_path):
    report = gc.Report(stem=tmp_path / "t", title="t", header="h")
    check = gc.Check(device=torch.device("cpu"), report=report, budget=gc.Budget(60), peak=None)

    def broken():
        raise ValueError("bad | value\nsecond line")

    assert check.section("broken", broken) is None
    assert check.section("next", lambda: 3) == 3
    assert report.rows == [("broken", "FAILED: ValueError: bad / value", "", "", "")]
    assert report.failed()


# ---- the memory verdicts

QWEN = get_preset("qwen2.5-0.5b")


def test_kv_state_of_a_known_shape(gc):
    # Qwen2.5-0.5B: 24 layers, 2 KV heads of 64; bf16 keys and values (2 bytes) and their
    # float32 gradients (4): 2 x 24 x 2 x 64 x (2 + 4) = 36,864 bytes per position. Chunk 8K:
    # a 32K chain holds the 24,576 positions before its last chunk, a 128K one 122,880.
    assert gc.chain_state_positions([32768, 300, 5000], 8192) == 24576
    assert gc.chain_state_positions([131072, 20000], 8192) == 122880  # the longest chain's
    assert gc.chain_state_positions([3000, 5000], 8192) == 0  # no chain
    assert gc.kv_state(QWEN, [32768, 300], 8192) == 36864 * 24576  # 0.84 GiB
    assert gc.kv_state(QWEN, [131072, 300], 8192) == 36864 * 122880  # 4.22 GiB
    assert round(36864 * 24576 / 2**30, 2) == 0.84 and round(36864 * 122880 / 2**30, 2) == 4.22


def test_flat_verdict_judges_peak_minus_kv_state(gc):
    gib = 2**30
    kv = (int(0.84 * gib), int(4.22 * gib))
    # the numbers: the whole peak grows 1.17x, all of it the KV state: flat
    flat = 15 * gib
    verdict, ratio = gc.flat_verdict((flat + kv[0], flat + kv[1]), kv)
    assert verdict == "ok" and ratio == pytest.approx(1.0)
    assert (flat + kv[1]) / (flat + kv[0]) > 1.15  # what the old whole-peak check failed on
    # something else growing 1.2x with the length is caught
    verdict, ratio = gc.flat_verdict((flat + kv[0], int(1.2 * flat) + kv[1]), kv)
    assert verdict == "NOT FLAT" and ratio == pytest.approx(1.2)


def test_model_verdict_tolerance(gc):
    low, high = 100, 200
    assert gc.model_verdict(91, low, high) == "ok"  # within 10% below the bf16 estimate
    assert gc.model_verdict(219, low, high) == "ok"
    assert gc.model_verdict(89, low, high) == "OFF MODEL"
    assert gc.model_verdict(221, low, high) == "OFF MODEL"


def test_memory_range_drops_logits_the_fused_cross_entropy_never_holds(gc):
    # an 8K chunk's float32 logits at Qwen's 151,936-token vocabulary (4.6 GiB) exceed the
    # head's budget: the runtime takes the fused path, which keeps no log-probabilities
    assert gc.fused_logits_overcount(QWEN, 8192, 8192) == 8192 * 4 * 151936
    assert gc.fused_logits_overcount(QWEN, 256, 256) == 0  # 155 MiB: the plain path
    from chunkflow.plan import build_chunks
    from chunkflow.plan.memory import estimate_peak_memory

    lens = [32768, 300, 5000]
    est = estimate_peak_memory(QWEN, build_chunks(lens, chunk_size=8192), k=1, param_bytes=4,
                               activation_bytes=2, optimizer="sgd")
    low, _ = gc.memory_range(QWEN, lens, chunk_size=8192, k=1, static=True)
    assert low == est.total - 8192 * 4 * 151936
    low_meter, high_meter = gc.memory_range(QWEN, lens, chunk_size=8192, k=1, static=False)
    # float32 weights and gradients, and autocast's bf16 copies of the (tied) weights
    assert low - low_meter == 2 * 4 * QWEN.num_params + 2 * QWEN.num_params
    assert high_meter > low_meter
