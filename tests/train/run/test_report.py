"""write_report: a PNG of loss, throughput and peak memory from metrics.jsonl; errors named."""

import json
import math
import struct
from pathlib import Path

import pytest

from chunkflow.train.run.report import read_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(step: int, **overrides) -> dict:
    record = {
        "step": step, "loss": 5.0 * math.exp(-step / 10), "lr": 1e-3, "grad_norm": 0.5,
        "tokens": 4096, "supervised_tokens": 4000, "chunks": 9, "packing_efficiency": 0.9,
        "peak_memory_bytes": (200 + step) * 2**20, "max_rss_bytes": (900 + step) * 2**20,
        "step_time_s": 0.5, "tokens_per_s": 8192.0 + step,
    }
    record.update(overrides)
    return record


def _write(run_dir: Path, lines) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines)
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"  # the first chunk of every PNG
    return struct.unpack(">II", data[16:24])


def test_report_is_a_png_of_sensible_size(tmp_path):
    run_dir = _write(tmp_path / "run-a", [_record(s) for s in range(1, 41)])
    out = write_report(run_dir)
    assert out == run_dir / "report.png" and out.is_file()
    width, height = _png_size(out)
    assert (width, height) == (800, 1300)  # figsize (8, 13) at 100 dpi: five panels
    assert 10_000 < out.stat().st_size < 2_000_000  # drawn, not blank


def test_custom_output_and_string_run_dir(tmp_path):
    run_dir = _write(tmp_path / "run-b", [_record(1), _record(2)])
    out = write_report(str(run_dir), output=tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    assert _png_size(out) == (800, 1300)
    with pytest.raises(ValueError, match="curves.svg.*PNG"):
        write_report(run_dir, output=tmp_path / "curves.svg")


def test_duplicate_steps_keep_the_last_occurrence(tmp_path):
    # A run killed after step 5 and resumed from its step-3 checkpoint logs steps 4-5 again.
    first = [_record(s) for s in range(1, 6)]
    redone = [_record(s, loss=1.0 + s, tokens_per_s=100.0 * s) for s in (4, 5, 6)]
    records = read_metrics(_write(tmp_path / "resumed" / "run", first + redone))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records[3:]] == [5.0, 6.0, 7.0]
    assert records[:3] == first[:3]
    # The figure is that of the deduplicated log, pixel for pixel.
    clean = _write(tmp_path / "clean" / "run", first[:3] + redone)
    dup_png = write_report(tmp_path / "resumed" / "run").read_bytes()
    assert dup_png == write_report(clean).read_bytes()


def test_panels_for_lr_grad_norm_and_eval_with_whole_step_ticks(tmp_path, monkeypatch):
    """Issue 13.9: no learning-rate / gradient-norm panel, and fractional step ticks (a
    3-step run showed 1.00, 1.25, ...). An evaluation logged after the last step is merged."""
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    lines = [_record(s, lr=1e-3 * s, grad_norm=2.0 / s) for s in (1, 2, 3)]
    lines += [{"step": 3, "eval_loss": 1.5, "eval_ppl": 4.48, "eval_tokens": 10}]
    run_dir = _write(tmp_path / "run", lines)
    assert read_metrics(run_dir)[-1]["eval_loss"] == 1.5 and read_metrics(run_dir)[-1]["loss"]
    drawn = {}
    savefig = Figure.savefig

    def capture(fig, *args, **kwargs):
        drawn["fig"] = fig
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    write_report(run_dir)
    fig = drawn["fig"]
    axes = [a for a in fig.axes if isinstance(a, Axes)]
    titles = [a.get_title(loc="left") for a in axes]
    assert titles[:4] == ["Loss", "Learning rate and gradient norm", "Throughput", "Peak memory"]
    labels = {line.get_label(): list(line.get_ydata()) for a in axes for line in a.get_lines()}
    assert labels["eval loss"] == [1.5]
    assert labels["learning rate"] == [1e-3, 2e-3, 3e-3] and labels["gradient norm"] == [2.0, 1.0, 2 / 3]
    ticks = [t for t in axes[3].get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_steps_out_of_order_are_sorted_and_blank_lines_skipped(tmp_path):
    run_dir = _write(tmp_path / "run", [_record(3), "", _record(1), "   ", _record(2)])
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


def test_missing_metrics_and_nulls_still_draw(tmp_path):
    """A log without throughput (or with a null loss, say a skipped step) still draws."""
    lines = [{"step": s, "loss": None if s == 2 else 1.0 / s, "peak_memory_bytes": 2**20}
             for s in range(1, 5)]
    out = write_report(_write(tmp_path / "sparse", lines))
    assert _png_size(out) == (800, 1300)


def test_missing_run_dir(tmp_path):
    with pytest.raises(ValueError, match="run directory .*nope.* does not exist"):
        write_report(tmp_path / "nope")


def test_missing_metrics_file(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match=r"metrics\.jsonl not found"):
        write_report(tmp_path / "run")


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_metrics_file(tmp_path, text):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(text)
    with pytest.raises(ValueError, match=r"metrics\.jsonl is empty"):
        write_report(tmp_path / "run")


@pytest.mark.parametrize("bad,match", [
    ('{"step": 3, "loss": 1.', "malformed JSON"),  # a line cut off mid-write
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"loss": 1.0}', "'step' must be an integer, got None"),
    ('{"step": "3"}', "'step' must be an integer, got '3'"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, match):
    run_dir = _write(tmp_path / "run", [_record(1), _record(2), bad, _record(4)])
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: " + match):
        write_report(run_dir)


def test_non_numeric_metric_is_named(tmp_path):
    run_dir = _write(tmp_path / "run", [_record(1), _record(2, tokens_per_s="fast")])
    with pytest.raises(ValueError, match="step 2: 'tokens_per_s' must be a number, got 'fast'"):
        write_report(run_dir)


def test_memory_on_its_own_axes_epochs_marked_dp_balance_and_layout(tmp_path, monkeypatch):
    """Issue 25 §5: peak memory was flattened against the RSS on one axis; no epoch markers,
    no data-parallel panel, no layout."""
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    lines = [_record(s, epoch=0.4 * s, dp_imbalance=1.0 + 0.1 * s, dp_chunks=[3, 2])
             for s in range(1, 7)]  # a new pass begins at steps 3 and 5
    run_dir = _write(tmp_path / "run", lines)
    (run_dir / "config.toml").write_text('[parallel]\npp = 2\ntp = 1\n'
                                         'data_parallel = "fsdp"\n')
    drawn = {}
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig",
                        lambda fig, *a, **kw: (drawn.setdefault("fig", fig), savefig(fig, *a,
                                                                                     **kw))[1])
    write_report(run_dir)
    fig = drawn["fig"]
    axes = [a for a in fig.axes if isinstance(a, Axes)]
    assert [a.get_title(loc="left") for a in axes[:5]] == [
        "Loss", "Learning rate and gradient norm", "Throughput", "Peak memory",
        "Data-parallel balance"]
    lines_of = {line.get_label(): (a, list(line.get_ydata())) for a in axes
                for line in a.get_lines()}
    peak_axes, rss_axes = lines_of["peak memory"][0], lines_of["process max RSS"][0]
    assert peak_axes is not rss_axes  # each on its own y axis
    assert lines_of["imbalance"][1] == [1.0 + 0.1 * s for s in range(1, 7)]
    marks = [line.get_xdata()[0] for line in axes[0].get_lines()
             if line.get_linestyle() == ":"]
    assert marks == [3, 5]
    assert [t.get_text() for t in axes[0].texts] == ["epoch 2", "epoch 3"]
    assert fig.get_suptitle().endswith("; layout dp=2 x pp=2 x tp=1 (fsdp)")
