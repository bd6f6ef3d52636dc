"""Held-out evaluation (--eval.*): the loss equals the unchunked model's on the same records,
is computed chunk by chunk without backward, and reaches metrics.jsonl, the progress line,
TensorBoard and the report."""

import json
import math

import pytest
import torch

from chunkflow import ChunkFlowEngine
from chunkflow.cli import main
from chunkflow.models import load_hf_checkpoint
from tests.conftest import reference_loss, tiny_model
from chunkflow.train.config import load_config
from chunkflow.train.run.trainer import Trainer
from tests.train.run.test_trainer import SMALL, args, metrics, write_jsonl


def make_batch(lengths, *, vocab=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = ids.clone()
        if i % 2:
            labels[: n // 2] = -100  # a masked prompt
        batch.append({"input_ids": ids, "labels": labels})
    return batch


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 1000])
def test_evaluate_equals_unchunked_loss_one_chunk_at_a_time(chunk_size):
    model = tiny_model()
    batch = make_batch([37, 5, 12, 70, 3, 1])
    engine = ChunkFlowEngine(model, chunk_size=chunk_size)
    want = reference_loss(model, batch).item()
    seen = []
    hidden_states = model.hidden_states

    def spy(x, **kwargs):
        seen.append(x.shape[1])
        return hidden_states(x, **kwargs)

    model.hidden_states = spy
    result = engine.evaluate(batch)
    assert result.loss_sum / result.num_loss_tokens == pytest.approx(want, rel=1e-12)
    mask_counts = sum(int((b["labels"][1:] != -100).sum()) for b in batch)
    assert result.num_loss_tokens == mask_counts
    assert max(seen) <= chunk_size and len(seen) == result.num_chunks  # one chunk per forward
    assert all(p.grad is None for p in model.parameters())  # no backward


def test_eval_in_a_run_matches_the_checkpoint_on_the_held_out_records(tmp_path, capsys):
    held_out = write_jsonl(tmp_path / "eval.jsonl", 7)  # text records of 5..200 bytes
    run = tmp_path / "run"
    assert main(["train", *args(run, **{
        "train.steps": "4", "model.dtype": "float64", "eval.path": str(held_out),
        "eval.interval": "2", "data.batch_size": "3", "log.tensorboard": "true"})]) == 0
    out = capsys.readouterr().out
    records = metrics(run)
    evals = {r["step"]: r for r in records if "eval_loss" in r}
    assert sorted(evals) == [2, 4]
    assert all(r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals.values())
    assert "eval loss" in out and f"eval loss {evals[4]['eval_loss']:.4f}" in out.splitlines()[-1]

    # the unchunked final model on the same records (byte tokenizer, no EOS): the same loss
    model = load_hf_checkpoint(run / "step-00000004", dtype=torch.float64)
    texts = [json.loads(line)["text"] for line in held_out.read_text().splitlines()]
    batch = [torch.tensor(list(t.encode())) for t in texts]
    want = reference_loss(model, batch).item()
    assert evals[4]["eval_loss"] == pytest.approx(want, rel=1e-10)
    assert evals[4]["eval_tokens"] == sum(len(b) - 1 for b in batch)

    # at most --eval.max_batches global batches, from the start of the files
    run = tmp_path / "capped"
    assert main(["train", *args(run, **{
        "train.steps": "1", "model.dtype": "float64", "eval.path": str(held_out),
        "eval.max_batches": "2", "data.batch_size": "3"})]) == 0
    (last,) = [r for r in metrics(run) if "eval_loss" in r]
    model = load_hf_checkpoint(run / "step-00000001", dtype=torch.float64)
    assert last["eval_batches"] == 2
    assert last["eval_loss"] == pytest.approx(reference_loss(model, batch[:6]).item(), rel=1e-10)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval_loss")] == [2, 4]


def test_eval_errors_come_before_training_and_never_cost_a_step(tmp_path, capsys, monkeypatch):
    assert main(["train", *args(tmp_path / "r", **{"eval.path": str(tmp_path / "nope.jsonl")})]) == 2
    assert "--eval.path: " in capsys.readouterr().err and not (tmp_path / "r").exists()
    # a bad held-out record stops the run at its start, named, not at the first evaluation
    bad = write_jsonl(tmp_path / "bad.jsonl", 5, bad_line=3)
    assert main(["train", *args(tmp_path / "r", **{"eval.path": str(bad)})]) == 2
    assert f"{bad}:4: malformed JSON" in capsys.readouterr().err
    # an evaluation that fails mid-run: the step it followed is saved first
    good = write_jsonl(tmp_path / "good.jsonl", 5)
    trainer = Trainer(load_config(None, {**SMALL, "train.output_dir": str(tmp_path / "s"),
                                         "eval.path": str(good), "eval.interval": "2",
                                         "train.steps": "5", "checkpoint.interval": "0"}))

    def broken(batch):
        raise RuntimeError("out of memory (injected)")

    trainer.engine.evaluate = broken
    with pytest.raises(RuntimeError, match="injected"):
        trainer.run()
    assert (tmp_path / "s" / "step-00000002").is_dir()
    assert [r["step"] for r in metrics(tmp_path / "s")] == [1, 2]


def test_held_out_records_are_never_truncated(tmp_path):
    held_out = write_jsonl(tmp_path / "eval.jsonl", 7)
    run = tmp_path / "run"
    assert main(["train", *args(run, **{"train.steps": "1", "eval.path": str(held_out),
                                        "data.max_length": "20"})]) == 0
    (last,) = [r for r in metrics(run) if "eval_loss" in r]
    lengths = [len(json.loads(line)["text"]) for line in held_out.read_text().splitlines()]
    assert max(lengths) > 20 and last["eval_tokens"] == sum(n - 1 for n in lengths)
