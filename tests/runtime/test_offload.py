"""State offload (``offload="state"|"all"``): the chains' key/value state, and the attention
outputs selective recompute keeps, live in host memory and come to the device a layer at a time.

On CPU the "device" and the host store are both host memory, but separate tensors: every
transfer is a real copy, logged by the engine's :class:`~chunkflow.runtime.kv_state.Copier`, so
the bookkeeping (what is where, when it is fetched, written back and freed) is checked here;
the overlap on a CUDA side stream is measured by ``make gpu-check``.
"""

import pytest
import torch

from chunkflow import ChunkFlowEngine
from chunkflow.runtime.kv_state import Copier, OffloadedChainState
from tests.conftest import grads, reference_loss, tiny_model
from tests.runtime.test_equivalence import BACKENDS, LENGTHS, _batch

LAYERS = 4  # more layers than the two an offloaded state keeps on the device


def _model():
    return tiny_model(num_hidden_layers=LAYERS)


@pytest.mark.parametrize("backend", ["cpu-flash", "math", "varlen"])
@pytest.mark.parametrize("recompute, offload", [("full", "state"), ("selective", "state"),
                                                ("selective", "all")])
def test_offloaded_training_equals_unchunked(backend, recompute, offload):
    model = _model()
    batch = _batch(LENGTHS, mask_prob=0.3, seed=9)
    reference_loss(model, batch).backward()
    want = grads(model)
    scale = max(g.abs().max() for g in want.values())
    for k in (1, 2):
        model.zero_grad(set_to_none=True)
        engine = ChunkFlowEngine(model, chunk_size=7, k=k, attention_backend=BACKENDS[backend],
                                 recompute=recompute, offload=offload)
        engine.forward_backward(batch)
        for name, g in grads(model).items():
            assert (g - want[name]).abs().max() / scale <= 1e-10, (k, name)
        log = engine.copier(torch.device("cpu")).log
        assert any(d == "to_host" and w == "grad_k" for d, w, _, _ in log)  # really moved


def _track(monkeypatch):
    """Record each offloaded state's device-resident bytes and layers after every change."""
    seen = []
    count = OffloadedChainState._count

    def tracking(self, nbytes):
        count(self, nbytes)
        seen.append((self, self.device_bytes, len(self._dev)))

    monkeypatch.setattr(OffloadedChainState, "_count", tracking)
    return seen


def test_at_most_two_layers_of_state_are_on_the_device(monkeypatch):
    seen = _track(monkeypatch)
    model = _model()
    engine = ChunkFlowEngine(model, chunk_size=8, k=1, offload="state")
    engine.forward_backward(_batch([64], mask_prob=0.0, seed=1))  # one chain of 8 chunks
    c = model.config
    seq_len = 56  # positions before the last chunk
    per_layer = 2 * c.num_key_value_heads * c.head_dim * seq_len * (8 + 8)  # k, v + grads
    assert seen and max(n for _, _, n in seen) <= 2
    assert max(b for _, b, _ in seen) <= 2 * per_layer
    state = seen[-1][0]
    assert state.device_bytes == 0 and state.host_bytes == 0  # freed with the chain


def test_what_moves_and_when():
    """Keys/values go back to the host when their layer leaves the device and come back
    before a kernel reads them; gradients likewise; nothing moves that is still all zeros."""
    model = _model()
    engine = ChunkFlowEngine(model, chunk_size=8, k=1, offload="state")
    engine.forward_backward(_batch([24], mask_prob=0.0, seed=2))  # 3 chunks: s0 s1 F2 B2 ...
    log = engine.copier(torch.device("cpu")).log
    for layer in range(LAYERS):
        mine = [(d, w) for d, w, lay, _ in log if lay == layer]
        # the first thing to move is a write-back: no fetch of a never-written layer
        assert mine[0] == ("to_host", "k"), mine
        for what in ("k", "grad_k"):
            moves = [d for d, w in mine if w == what]
            # every fetch follows a write-back of the same buffer
            for i, d in enumerate(moves):
                if d == "to_device":
                    assert "to_host" in moves[:i], (layer, what, moves)
        assert ("to_device", "k") in mine and ("to_host", "grad_k") in mine


def test_kept_attention_outputs_offload_to_the_host():
    model = _model()
    batch = _batch([64], mask_prob=0.0, seed=3)
    peaks, logs = {}, {}
    for offload in ("state", "all"):
        engine = ChunkFlowEngine(model, chunk_size=8, k=1, recompute="selective",
                                 offload=offload, attention_backend="math")
        peaks[offload] = engine.forward_backward(batch).peak_memory_bytes
        logs[offload] = engine.copier(torch.device("cpu")).log
    c = model.config
    kept = [(d, lay) for d, w, lay, _ in logs["all"] if w == "attention_out"]
    # each of the 7 recomputed chunks: out to the host per layer, back once for its recompute
    assert sorted(kept) == sorted([("to_host", lay) for lay in range(LAYERS)] * 7
                                  + [("to_device", lay) for lay in range(LAYERS)] * 7)
    assert not any(w == "attention_out" for _, w, _, _ in logs["state"])
    per_chunk = LAYERS * 8 * c.num_attention_heads * (c.head_dim + 1) * 8
    assert peaks["state"] - peaks["all"] >= 6 * per_chunk  # most of 7 chunks' outputs


def test_offload_saves_device_memory_on_a_long_chain():
    model = _model()
    batch = _batch([128], mask_prob=0.0, seed=4)
    peak = {off: ChunkFlowEngine(model, chunk_size=16, k=1, offload=off)
            .forward_backward(batch).peak_memory_bytes for off in ("none", "state")}
    c = model.config
    state_bytes = LAYERS * 2 * c.num_key_value_heads * c.head_dim * 112 * 16
    assert peak["none"] - peak["state"] >= state_bytes // 2  # half the layers stay on the host


def test_offload_modes_are_checked():
    model = _model()
    with pytest.raises(ValueError, match="offload='disk'; valid: none, state, all"):
        ChunkFlowEngine(model, chunk_size=8, offload="disk")
    with pytest.raises(ValueError, match="recompute='full' keeps none"):
        ChunkFlowEngine(model, chunk_size=8, offload="all")


@pytest.mark.parametrize("backend", ["cpu-flash", "varlen"])
def test_uninitialised_host_buffers_are_never_read(backend, monkeypatch):
    """The host buffers are not zero-filled (a memset no reader needs): filled with NaN here,
    as garbage, the gradients are still those of unchunked training."""
    empty = Copier.host_empty

    def garbage(self, shape, dtype):  # all-ones bytes: NaN in every float view of them
        return empty(self, shape, dtype).fill_(255 if dtype == torch.uint8 else float("nan"))

    monkeypatch.setattr(Copier, "host_empty", garbage)
    model = _model()
    batch = _batch(LENGTHS, mask_prob=0.3, seed=5)
    reference_loss(model, batch).backward()
    want = grads(model)
    scale = max(g.abs().max() for g in want.values())
    model.zero_grad(set_to_none=True)
    ChunkFlowEngine(model, chunk_size=7, k=1, attention_backend=BACKENDS[backend],
                    offload="state").forward_backward(batch)
    for name, g in grads(model).items():
        assert (g - want[name]).abs().max() / scale <= 1e-10, name


@pytest.mark.parametrize("backend", ["cpu-flash", "varlen"])
def test_only_rows_in_use_move(backend, monkeypatch):
    """A fetch moves the rows the host holds that are still read, not the buffer's capacity:
    keys/values written so far, gradients added so far, none from the start of the lowest
    chunk whose backward has read its gradients (nothing reads those again)."""
    written, live, checked = {}, {}, []
    write, own_grads = OffloadedChainState.write, OffloadedChainState.own_grads
    to_device = Copier.to_device

    def spy_write(self, layer, start, k, v):
        write(self, layer, start, k, v)  # (its fetch sees the rows written before)
        written[layer] = max(written.get(layer, 0), min(start + k.shape[2], self.capacity))

    def spy_own_grads(self, layer, start, n):
        out = own_grads(self, layer, start, n)
        live[layer] = min(live.get(layer, self.capacity), start)
        return out

    def spy_to_device(self, host, what, layer, **kwargs):
        if what in ("k", "v"):
            c = model.config
            rows = host.nbytes // (c.num_key_value_heads * c.head_dim * host.element_size())
            want = min(written[layer], live.get(layer, written[layer]))
            checked.append((layer, rows, want))
        return to_device(self, host, what, layer, **kwargs)

    monkeypatch.setattr(OffloadedChainState, "write", spy_write)
    monkeypatch.setattr(OffloadedChainState, "own_grads", spy_own_grads)
    monkeypatch.setattr(Copier, "to_device", spy_to_device)
    model = _model()
    engine = ChunkFlowEngine(model, chunk_size=8, k=1, offload="state",
                             attention_backend=BACKENDS[backend])
    engine.forward_backward(_batch([32], mask_prob=0.0, seed=6))  # one chain of 4 chunks
    assert checked and all(rows == want for _, rows, want in checked), checked
    # the first fetch of every layer's keys is chunk 0's 8 rows, not the buffer's capacity
    first = {}
    for layer, rows, _ in checked:
        first.setdefault(layer, rows)
    assert first == dict.fromkeys(range(LAYERS), 8)
