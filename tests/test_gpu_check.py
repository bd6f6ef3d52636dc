"""The prepared device check runs: its --smoke mode takes the same code paths on CPU (tiny), so
a broken script is found here, not on the lent GPU's clock."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_smoke_runs_and_saves_a_table(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--smoke", "--output-dir", str(tmp_path)]) == 0
    (table,) = tmp_path.glob("gpu_check-smoke-*.md")
    text = table.read_text()
    assert "| bf16 step vs plain | ok |" in text
    assert "ideal (one packed varlen chunk)" in text and "HF flattened" in text
