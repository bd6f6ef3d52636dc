"""Code that runs inside the spawned ranks of the multi-process tests (CPU, gloo)."""

from __future__ import annotations

import datetime
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from chunkflow.parallel import ParallelEngine, init_distributed
from tests.conftest import grads, reference_loss, tiny_model

# Chains (37, 70, 25 at chunk 16) and packed short sequences; prompts masked on some.
LENGTHS = (37, 5, 12, 70, 3, 16, 9, 25, 2, 14)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; re-raise any failure."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


def _entry(rank, world_size, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def make_batch(lengths, *, seed: int = 1, vocab: int = 53) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = ids.clone()
        if i % 3 == 1:
            labels[: n // 2] = -100  # a masked prompt
        batch.append({"input_ids": ids, "labels": labels})
    return batch


def check_gradients(rank, world_size, cases):
    """Each case: one (or two) ParallelEngine steps vs plain unchunked training, float64."""
    for case in cases:
        dp, pp, k = case["dp"], case["pp"], case["k"]
        mode, norm = case.get("data_parallel", "ddp"), case.get("normalization", "token")
        lengths = case.get("lengths", LENGTHS)
        ctx = init_distributed(dp=dp, pp=pp, device=torch.device("cpu"))
        model = tiny_model(num_hidden_layers=4)
        engine = ParallelEngine(model, ctx, chunk_size=16, k=k, data_parallel=mode,
                                loss_normalization=norm)
        for step in range(case.get("steps", 1)):
            batch = make_batch(lengths, seed=step + 1)
            ref = tiny_model(num_hidden_layers=4)
            want_loss = reference_loss(ref, batch, norm)
            want_loss.backward()
            want = grads(ref)
            for p in engine.model.parameters():
                p.grad = None
            result = engine.forward_backward(batch)
            where = f"{case} step {step} rank {rank}"
            assert abs(result.loss - want_loss.item()) <= 1e-10 * abs(want_loss.item()), \
                (where, result.loss, want_loss.item())
            names = []
            for name, p in engine.model.named_parameters():
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                rel = float((g - want[name]).norm() / want[name].norm())
                assert rel < 1e-10, (where, name, rel)
                names.append(name)
            every = [None] * world_size
            dist.all_gather_object(every, names)
            assert set().union(*every) == set(want), (where, set(want) - set().union(*every))
            assert result.sharding.num_ranks == dp, where
