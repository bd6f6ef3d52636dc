"""Code that runs inside the spawned ranks of the multi-process tests (CPU, gloo)."""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from chunkflow.parallel import ParallelEngine, init_distributed
from tests.conftest import grads, reference_loss, tiny_model
from tests.parallel.rendezvous import RendezvousTransport

# Chains (37, 70, 25 at chunk 16) and packed short sequences; prompts masked on some.
LENGTHS = (37, 5, 12, 70, 3, 16, 9, 25, 2, 14)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; re-raise any failure."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


def start(fn, world_size: int, *args, timeout_s: float, error_dir: Path) -> list:
    """Like :func:`spawn`, but returns the processes unjoined (nobody kills the others when one
    fails) and each rank writes the error it ended with to ``error_dir/rank<r>.txt``."""
    port, context = free_port(), mp.get_context("spawn")
    procs = [context.Process(target=_entry, args=(r, world_size, port, fn, args, timeout_s,
                                                   str(error_dir)))
             for r in range(world_size)]
    for p in procs:
        p.start()
    return procs


def _entry(rank, world_size, port, fn, args, timeout_s=60.0, error_dir=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world_size, *args)
        if error_dir is None:
            # Every rank done before any closes its connections: gloo aborts a process
            # ("terminate called without an active exception") whose peer tore a pair down
            # under a pending operation.
            dist.barrier()
    except BaseException as e:
        traceback.print_exc()
        if error_dir is not None:
            Path(error_dir, f"rank{rank}.txt").write_text(f"{type(e).__name__}: {e}")
        raise
    finally:
        if error_dir is None:  # a failed peer would make this wait
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


def nccl_rules(engine) -> None:
    """Pipeline stages exchange messages under NCCL's rendezvous (a send waits for its receive,
    posts run in order) and replay each step's recorded op order under NCCL's rules
    (``P2PStageIO.check_recorded``, which the engine calls after every step)."""
    if engine.ctx.pp > 1:
        engine.io.transport = RendezvousTransport(engine.ctx.pp_group)
        engine.io.record()


def check_gradients(rank, world_size, cases):
    """Each case: one (or two) ParallelEngine steps vs plain unchunked training in float64
    (``dtype``: the distributed model's; float32 is compared to 1e-5)."""
    for case in cases:
        dp, pp, k = case["dp"], case["pp"], case["k"]
        mode, norm = case.get("data_parallel", "ddp"), case.get("normalization", "token")
        lengths = case.get("lengths", LENGTHS)
        dtype = case.get("dtype", torch.float64)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        ctx = init_distributed(dp=dp, pp=pp, tp=case.get("tp", 1), device=torch.device("cpu"))
        shape = dict(num_hidden_layers=4, dtype=dtype, **case.get("model", {}))
        model = tiny_model(**shape)
        engine = ParallelEngine(model, ctx, chunk_size=16, k=k, data_parallel=mode,
                                sequence_parallel=case.get("sp", True),
                                vocab_parallel=case.get("vp", True),
                                loss_normalization=norm,
                                recompute=case.get("recompute", "full"),
                                activation_checkpointing=case.get("ac", False),
                                **({"logits_budget": case["logits_budget"]}
                                   if "logits_budget" in case else {}),
                                offload=case.get("offload", "none"),
                                compile=case.get("compile", False),
                                schedule=case.get("schedule", "1f1b"))
        check_vocab_split(engine, case)
        if not case.get("own_transport"):  # else the engine's own (batches, or channels)
            nccl_rules(engine)
        rows = []  # rows of the chunk each decoder layer ran: 1/tp of them, sequence parallel
        first = next(iter(engine.model.model.layers.values()))
        first.register_forward_hook(lambda m, i, out: rows.append(out.shape[1]))
        for step in range(case.get("steps", 1)):
            batch = make_batch(lengths, seed=step + 1)
            ref = tiny_model(**shape).double()  # the same weights
            want_loss = reference_loss(ref, batch, norm)
            want_loss.backward()
            want = grads(ref)
            for p in engine.model.parameters():
                p.grad = None
            result = engine.forward_backward(batch)
            where = f"{case} step {step} rank {rank}"
            assert abs(result.loss - want_loss.item()) <= tol * abs(want_loss.item()), \
                (where, result.loss, want_loss.item())
            names = []
            for name, p in engine.model.named_parameters():
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                rel = float((g.double() - want[name]).norm() / want[name].norm())
                assert rel < tol, (where, name, rel)
                names.append(name)
            every = [None] * world_size
            dist.all_gather_object(every, names)
            assert set().union(*every) == set(want), (where, set(want) - set().union(*every))
            assert result.sharding.num_ranks == dp, where
            if engine.ctx.tp > 1 and max(rows) > 1:  # (an empty replica runs one token)
                tp = engine.ctx.tp
                assert max(rows) == (16 // tp if case.get("sp", True) else 16), (where, rows)
            want_norm = sum(float(g.pow(2).sum()) for g in want.values()) ** 0.5
            grad_norm = engine.clip_grad_norm(float("inf"))  # the whole model's, every rank's
            assert abs(grad_norm - want_norm) <= tol * want_norm, (where, grad_norm, want_norm)
            if step == 0:  # forward-only evaluation over the same layout: the token mean
                ev = engine.evaluate(batch)
                token_mean = reference_loss(ref, batch, "token").item()
                assert abs(ev.loss_sum / ev.num_loss_tokens - token_mean) <= tol * token_mean, \
                    (where, ev, token_mean)


def fail_one_rank(rank, world_size, dp, pp, how):
    """Rank 1 raises (or hangs) in its third chunk forward; the others must not wait forever."""
    ctx = init_distributed(dp=dp, pp=pp, device=torch.device("cpu"))
    engine = ParallelEngine(tiny_model(num_hidden_layers=4), ctx, chunk_size=16, k=1)
    if rank == 1:
        calls, forward = 0, engine.engine._forward

        def broken(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == 3:
                if how == "raise":
                    raise RuntimeError("injected failure on rank 1")
                time.sleep(600)  # a stuck rank: alive, silent
            return forward(*args, **kwargs)

        engine.engine._forward = broken
    engine.forward_backward(make_batch(LENGTHS))


def eager_order_on_gloo(rank, world_size, timeout_s):
    """The stage I/O's earlier order (every send posted at once, each receive alone): a step
    passes on gloo, which buffers sends; under the rendezvous transport (NCCL's rules) the next
    one must fail within ``timeout_s`` with the transport's message."""
    from types import MethodType

    from tests.parallel.stage_messages import eager_send

    ctx = init_distributed(dp=1, pp=2, device=torch.device("cpu"))
    engine = ParallelEngine(tiny_model(num_hidden_layers=2), ctx, chunk_size=16, k=1)
    engine.io._send = MethodType(eager_send, engine.io)
    engine.forward_backward(make_batch(LENGTHS))
    dist.barrier()
    engine.io.transport = RendezvousTransport(ctx.pp_group, timeout_s=timeout_s)
    engine.forward_backward(make_batch(LENGTHS))


def check_autocast(rank, world_size):
    """bf16 autocast at TP=2, as GPUs run it (with sequence parallelism and without; the
    vocabulary-parallel loss in blocks): the loss and the gradient norm within bf16 rounding of
    one process's under the same autocast."""
    from chunkflow.parallel import LocalContext

    ctx = init_distributed(dp=1, pp=1, tp=2, device=torch.device("cpu"))
    batch = make_batch(LENGTHS)
    shape = dict(num_hidden_layers=2, dtype=torch.float32)
    one = ParallelEngine(tiny_model(**shape), LocalContext(torch.device("cpu")), chunk_size=16,
                         k=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = one.forward_backward(batch).loss
    want_norm = one.clip_grad_norm(float("inf"))
    for sp in (True, False):
        engine = ParallelEngine(tiny_model(**shape), ctx, chunk_size=16, k=1,
                                logits_budget=27 * 4 * 3, sequence_parallel=sp)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = engine.forward_backward(batch).loss
        norm = engine.clip_grad_norm(float("inf"))
        assert abs(got - want) <= 2e-2 * abs(want), (sp, got, want)
        assert abs(norm - want_norm) <= 5e-2 * want_norm, (sp, norm, want_norm)


def check_vocab_loss_weight_gradient(rank, world_size):
    """The vocabulary-parallel loss at TP=2 under bf16 autocast with a float32 head, one row per
    block: each rank's weight-gradient rows equal the float64 reference of the same bf16 inputs
    and bf16 logits to float32 accumulation error. Rounding each block's partial to bf16 before
    the sum (or the sum on its way back to the float32 weight) is off by ~2e-3."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from chunkflow.parallel.vocab import vocab_parallel_head_loss

    ctx = init_distributed(dp=1, pp=1, tp=2, device=torch.device("cpu"))
    torch.manual_seed(0)
    num_tokens, vocab, hidden_size = 1024, 64, 32
    head = nn.Linear(hidden_size, vocab, bias=False)
    full = head.weight.detach().clone()
    head.weight = nn.Parameter(distribute_tensor(full, ctx.mesh["tp"], [Shard(0)]))
    hidden = torch.randn(num_tokens, hidden_size)
    targets = torch.randint(0, vocab, (num_tokens,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = vocab_parallel_head_loss(hidden, head, targets, torch.ones(num_tokens), ctx=ctx,
                                        sequence_parallel=False,
                                        logits_budget=vocab // 2 * 4)  # one row per block
    loss.backward()
    h = hidden.bfloat16().double()
    logits = (h @ full.bfloat16().double().T).bfloat16().double()
    g = torch.softmax(logits, -1)
    g[torch.arange(num_tokens), targets] -= 1
    rows = slice(rank * vocab // 2, (rank + 1) * vocab // 2)
    want = (g.T @ h)[rows]
    got = head.weight.grad.to_local()
    assert got.dtype == torch.float32
    error = float((got.double() - want).norm() / want.norm())
    assert error < 1e-5, error  # float32 accumulation over 1024 blocks: ~1e-6


def check_vocab_split(engine, case) -> None:
    """Under TP the embedding and head weights are split by vocabulary rows (unless vp=False)."""
    from chunkflow.parallel.vocab import embedding_and_head

    if engine.ctx.tp == 1:
        return
    for module in embedding_and_head(engine.model):
        if module is not None:
            weight = module.weight
            local = weight.to_local() if hasattr(weight, "to_local") else weight
            split = local.shape[0] < weight.shape[0]
            assert split == case.get("vp", True), (case, tuple(local.shape))


def check_hf(rank, world_size, cases):
    """A transformers model on a (dp, pp, tp) layout: loss, every gradient (full tensors of the
    tensor-parallel shards, each stage its own layers) and the clipped norm equal plain
    single-process HF training."""
    from tests.models.test_hf_adapter import build, make_batch as hf_batch, plain_step

    for case in cases:
        family, dp, tp, k = case["family"], case["dp"], case.get("tp", 1), case["k"]
        pp = case.get("pp", 1)
        ctx = init_distributed(dp=dp, pp=pp, tp=tp, device=torch.device("cpu"))
        ref = build(family, **case.get("config", {}))
        batch = hf_batch(ref.config.vocab_size)
        want_loss = plain_step(ref, batch).item()
        config = case.get("config", {})
        engine = ParallelEngine(build(family, **config), ctx, chunk_size=16, k=k,
                                data_parallel=case.get("data_parallel", "ddp"),
                                sequence_parallel=case.get("sp", True),
                                vocab_parallel=case.get("vp", True),
                                schedule=case.get("schedule", "1f1b"))
        check_vocab_split(engine, case)
        nccl_rules(engine)
        rows = []  # rows of the chunk each decoder layer ran: 1/tp of them, sequence parallel
        next(iter(engine.model.get_decoder().layers)).register_forward_hook(
            lambda m, i, out: rows.append((out[0] if isinstance(out, tuple) else out).shape[1]))
        result = engine.forward_backward(batch)
        where = f"{case} rank {rank}"
        if tp > 1:
            assert max(rows) == (16 // tp if case.get("sp", True) else 16), (where, rows)
        assert abs(result.loss - want_loss) <= 1e-10 * abs(want_loss), \
            (where, result.loss, want_loss)
        want = dict(ref.named_parameters())
        names = []
        for name, p in engine.model.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            rel = float((g - want[name].grad).norm() / want[name].grad.norm())
            assert rel < 1e-10, (where, name, rel)
            names.append(name)
        every = [None] * world_size
        dist.all_gather_object(every, names)  # the stages hold the whole model between them
        assert set().union(*every) == set(want), (where, set(want) - set().union(*every))
        want_norm = sum(float(p.grad.pow(2).sum()) for p in want.values()) ** 0.5
        norm = engine.clip_grad_norm(float("inf"))
        assert abs(norm - want_norm) <= 1e-10 * want_norm, (where, norm, want_norm)
        ev = engine.evaluate(batch)  # forward only, on the same layout: the token mean
        assert abs(ev.loss_sum / ev.num_loss_tokens - want_loss) <= 1e-10 * want_loss, \
            (where, ev, want_loss)


def train_lora(rank, world_size, run_dir: str, model_path: str, data: str, steps: int,
               resume: bool, options: dict | None = None):
    """A LoRA run of the trainer on these ranks (as torchrun would run it): DDP, or the layout
    ``options`` give."""
    from chunkflow.train.config import load_config
    from chunkflow.train.run.trainer import Trainer
    from tests.train.checkpoint.test_resume import hf_args

    options = dict(a[2:].split("=", 1) for a in hf_args(run_dir, model_path, data, **{
        "model.dtype": "float64", "lora.rank": "4", "train.steps": str(steps),
        "lora.modules_to_save": "embed_tokens", "lora.dropout": "0.1",
        "checkpoint.resume": str(resume).lower(), **(options or {})}))
    Trainer(load_config(None, options)).run()


def fail_a_checkpoint_write(rank, world_size, run_dir: str):
    """Rank 1 runs out of disk space writing its shard, then another rank hits a plain error:
    every rank must raise the same error, and no partial checkpoint may be left."""
    import errno

    from chunkflow.train import CheckpointSpaceError
    from chunkflow.train.checkpoint.store import list_checkpoints, save_distributed_checkpoint

    ctx = init_distributed(dp=world_size, pp=1, device=torch.device("cpu"))
    run = Path(run_dir)

    def write_shard(error):
        def write(tmp):
            (tmp / f"part-{rank}").write_bytes(b"x" * 100)
            if rank == 1:
                raise error
            return [f"part-{rank}"]
        return write

    common = dict(step=1, ctx=ctx, write_main=lambda tmp: None, trainer_state={"config": {}},
                  keep_last=3, needed_bytes=1 << 40)
    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        save_distributed_checkpoint(run, write_shard=write_shard(full), **common)
        raise AssertionError("the full disk was not reported")
    except CheckpointSpaceError as e:
        assert "no space left on the device for checkpoint step-00000001" in str(e), e
    try:
        save_distributed_checkpoint(run, write_shard=write_shard(PermissionError(13, "denied")),
                                    **common)
        raise AssertionError("the failure was not reported")
    except RuntimeError as e:
        assert "rank 1: PermissionError" in str(e) and "was not saved" in str(e), e
    assert not list_checkpoints(run) and not list(run.glob(".step-*"))
    ctx.barrier()  # every rank has looked before rank 0 makes the next temporary directory
    final, _ = save_distributed_checkpoint(run, write_shard=lambda tmp: [], **common)
    assert [p for _, p in list_checkpoints(run)] == [final]
