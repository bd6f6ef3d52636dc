"""A dry run's accounting against what a real CPU step holds (issue 24, section 2).

The same configuration and data, ``--train.device=cpu --batches 1``: the dry run's activations
and KV state at its peak against the ``peak_memory_bytes`` the trainer records for its first
step (its meter counts the saved tensors and the chain state), within 10%; weights, gradients
and optimizer state exact against the real run's tensors, rounded as the caching allocator
rounds each one.
"""

import json

import pytest

from chunkflow.cli import main
from chunkflow.dryrun.tracker import allocator_bytes
from chunkflow.train.config import load_config
from chunkflow.train.run.trainer import Trainer

# sequences of 2000-3000 tokens in chunks of 1024 (chains of 2-3 chunks), two chunks kept: the
# step's peak is in the backward, where activations dominate
JOB = {"train.device": "cpu", "data.synthetic_max_len": "3000", "data.synthetic_min_len": "2000",
       "data.batch_size": "3", "chunking.chunk_size": "1024", "chunking.k": "2",
       "log.progress": "false", "train.steps": "1"}


def _flags(options: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in options.items()]


def _rounded(tensors) -> int:
    return sum(allocator_bytes(t.untyped_storage().nbytes()) for t in tensors)


@pytest.mark.parametrize("extra", [{}, {"chunking.recompute": "selective"},
                                   {"chunking.offload": "state"},
                                   {"chunking.offload": "all", "chunking.recompute": "selective"}],
                         ids=["plain", "selective", "offload-state", "offload-all"])
def test_dry_run_matches_the_first_real_cpu_step(tmp_path, capsys, extra):
    options = {**JOB, **extra}
    out = tmp_path / "dry.json"
    flags = [k for k in options if k not in ("train.steps", "log.progress")]
    assert main(["plan", "--dry-run", "--batches", "1", "--json", str(out),
                 *_flags({k: options[k] for k in flags})]) == 0
    role, = json.loads(out.read_text())["ranks"]

    trainer = Trainer(load_config(None, {**options, "train.output_dir": str(tmp_path / "run")}))
    trainer.run()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])

    measured = record["peak_memory_bytes"]
    at_peak = role["breakdown"]["activations"] + role["breakdown"]["kv_state"]
    assert at_peak == pytest.approx(measured, rel=0.10)
    assert role["step_memory_peak_bytes"] == pytest.approx(measured, rel=0.10)

    params = trainer.params
    model = trainer.engine.model
    assert role["breakdown"]["weights"] == _rounded([*model.parameters(), *model.buffers()])
    assert role["most_bytes"]["gradients"] == _rounded(p for p in params if p.requires_grad)
    state = [v for s in trainer.optimizer.state.values() for v in s.values()]
    assert role["breakdown"]["optimizer"] == _rounded(state)
