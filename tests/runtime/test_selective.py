"""Selective recompute: a chain's ``r`` reuses the attention outputs its ``s`` kept.

Exactness over the float64 suite lives in test_equivalence.py (every CPU backend) and here for
transformers models; this file checks what the mode promises besides: no attention-kernel
forward inside ``r``, the schedule's text form, the validator's rules, the action hook, and the
memory the kept outputs cost.
"""

import pytest
import torch

from chunkflow import ChunkFlowEngine
from chunkflow.plan import (
    Action,
    ActionKind,
    ScheduleError,
    build_chunks,
    format_schedule,
    parse_schedule,
    schedule,
    state_aware_1f1b,
    validate_pipeline,
    validate_schedule,
)
from chunkflow.runtime.attention import get_kernel
from tests.conftest import grads, reference_loss, tiny_model
from tests.models.test_hf_adapter import FAMILIES, assert_grads_close, build, make_batch, plain_step


class CountingKernel:
    """A kernel that counts its forward and backward calls by the action running them."""

    def __init__(self, inner):
        self.inner, self.name, self.state_layout = inner, inner.name, inner.state_layout
        self.action = None
        self.forwards: dict[str, int] = {}
        self.backwards = 0

    def state_capacity(self, seq_len, chunk_size):
        return self.inner.state_capacity(seq_len, chunk_size)

    def forward(self, q, k, v, view):
        key = str(self.action)[0]
        self.forwards[key] = self.forwards.get(key, 0) + 1
        return self.inner.forward(q, k, v, view)

    def backward(self, *args):
        self.backwards += 1
        return self.inner.backward(*args)

    def hook(self, action, phase):
        self.action = action if phase == "start" else None


def _batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 53, (n,), generator=g)} for n in lengths]


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_selective_recompute_runs_no_attention_forward_inside_r(recompute):
    model = tiny_model()
    kernel = CountingKernel(get_kernel("cpu-flash", torch.device("cpu"), torch.float64))
    engine = ChunkFlowEngine(model, chunk_size=8, k=1, attention_backend=kernel,
                             recompute=recompute)
    engine.register_action_hook(kernel.hook)
    result = engine.forward_backward(_batch([64]))  # one chain of 8 chunks
    layers = model.config.num_hidden_layers
    if recompute == "selective":
        assert kernel.forwards == {"s": 7 * layers, "F": layers}  # no "r" at all
    else:
        assert kernel.forwards == {"S": 7 * layers, "F": layers, "R": 7 * layers}
    assert kernel.backwards == 8 * layers
    assert result.num_chunks == 8


def test_action_hook_sees_every_action_in_order_and_can_be_removed():
    model = tiny_model()
    engine = ChunkFlowEngine(model, chunk_size=8, k=1, recompute="selective")
    seen = []
    handle = engine.register_action_hook(lambda a, phase: seen.append((str(a), phase)))
    batch = _batch([20, 3])
    engine.forward_backward(batch)
    plan = build_chunks([20, 3], chunk_size=8)
    want = [str(a) for a in schedule(plan, k=1, recompute="selective")]
    assert [a for a, p in seen if p == "start"] == want
    assert [a for a, p in seen if p == "end"] == want
    assert seen[0] == (want[0], "start") and seen[1] == (want[0], "end")
    handle.remove()
    seen.clear()
    engine.forward_backward(batch)
    assert not seen


def test_the_kept_outputs_are_metered_until_their_recompute():
    """The CPU meter counts them: a selective step's peak is a full step's plus what the
    state forwards kept (chunk x heads x head_dim outputs + chunk x heads LSE, per layer)."""
    model = tiny_model()
    c = model.config
    peaks = {}
    for recompute in ("full", "selective"):
        engine = ChunkFlowEngine(model, chunk_size=16, k=1, recompute=recompute,
                                 attention_backend="math")
        peaks[recompute] = engine.forward_backward(_batch([64])).peak_memory_bytes
    per_chunk = c.num_hidden_layers * 16 * c.num_attention_heads * (c.head_dim + 1) * 8
    # 3 kept chunks are alive after the last F, when the full step peaks as well
    assert peaks["selective"] - peaks["full"] == 3 * per_chunk


def test_selective_schedules_print_parse_and_validate():
    plan = build_chunks([10, 3, 25], chunk_size=8)
    actions = schedule(plan, k=1, recompute="selective")
    text = format_schedule(actions)
    assert text == "s0 F1 B1 r0 B0 s2 s3 s4 F5 B5 r4 B4 r3 B3 r2 B2"
    assert parse_schedule(text) == actions
    validate_schedule(actions, plan, k=1)
    assert format_schedule(schedule(plan, k=1)) == text.replace("s", "S").replace("r", "R")
    stages = state_aware_1f1b(plan, 2, k=2, recompute="selective")
    validate_pipeline(stages, plan, k=2)
    assert all(a.selective == (a.kind in (ActionKind.STATE_FORWARD, ActionKind.RECOMPUTE))
               for acts in stages for a in acts)


@pytest.mark.parametrize("text, why", [
    ("s0 F1 B1 R0 B0", "s0 kept attention outputs for a selective recompute: use r0"),
    ("S0 F1 B1 r0 B0", "r0 needs s0 before it"),
])
def test_validator_pairs_s_with_r(text, why):
    plan = build_chunks([10], chunk_size=8)
    with pytest.raises(ScheduleError, match=why):
        validate_schedule(parse_schedule(text), plan, k=1)


def test_bad_modes_and_actions_are_refused():
    plan = build_chunks([10], chunk_size=8)
    with pytest.raises(ValueError, match="recompute='attention'; valid: full, selective"):
        schedule(plan, k=1, recompute="attention")
    with pytest.raises(ValueError, match="recompute='none'; valid: full, selective"):
        ChunkFlowEngine(tiny_model(), chunk_size=8, recompute="none")
    with pytest.raises(ValueError, match="only S and R actions can be selective"):
        Action(ActionKind.FORWARD, 0, selective=True)
    with pytest.raises(ValueError, match="cannot parse action 'f0'"):
        parse_schedule("f0 B0")


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_models_are_exact_with_selective_recompute(family):
    model = build(family)
    batch = make_batch(model.config.vocab_size)
    want_loss = plain_step(model, batch)
    want = grads(model)
    model.zero_grad(set_to_none=True)
    for k in (1, 2):
        result = ChunkFlowEngine(model, chunk_size=16, k=k,
                                 recompute="selective").forward_backward(batch)
        torch.testing.assert_close(result.loss, want_loss, rtol=1e-12, atol=0)
        assert_grads_close({n: p.grad.clone() for n, p in model.named_parameters()
                            if p.grad is not None}, want)
        model.zero_grad(set_to_none=True)


def test_selective_recompute_is_bitwise_the_full_recompute():
    """Same arithmetic, same order: the kept output is what the recompute would compute."""
    batch = _batch([45, 7, 3], seed=3)
    out = {}
    for recompute in ("full", "selective"):
        model = tiny_model(dtype=torch.float32)
        loss = ChunkFlowEngine(model, chunk_size=8, k=1,
                               recompute=recompute).forward_backward(batch).loss
        out[recompute] = (loss, grads(model))
    assert torch.equal(out["full"][0], out["selective"][0])
    for name, g in out["full"][1].items():
        assert torch.equal(g, out["selective"][1][name]), name
    assert float(reference_loss(tiny_model(dtype=torch.float32), batch).detach()) == pytest.approx(
        float(out["full"][0]), rel=1e-5)
