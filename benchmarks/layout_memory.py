"""Bytes each rank holds, per layout: parameters, gradients and AdamW state at rest, and during a
step, next to one process.

    python benchmarks/layout_memory.py [--hidden 256] [--layers 8] [--vocab 8192]

Runs one optimizer step of the same reference model on the same global batch (a chain of four
chunks, packed short sequences) at each layout, on CPU gloo ranks, and reports per rank (the
largest over the ranks):

* at rest: the parameter, gradient and AdamW bytes the rank stores between steps (its DTensor
  shards under tensor parallelism and FSDP2);
* during the step: the weights it holds (FSDP2 gathers its stage's parameters for the step and
  keeps them gathered: ZeRO-2), the gradients it accumulates (full-size until FSDP2's
  reduce-scatter), and the activations plus chain KV state the engine measured
  (:class:`chunkflow.runtime.memory.MemoryMeter`: what autograd saves, not operator
  temporaries). "step peak" adds the three.

The numbers are counted, not timed, so they do not depend on this machine's noise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from common import free_port, machine, save  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from chunkflow.models import ModelConfig, Transformer  # noqa: E402
from chunkflow.parallel import ParallelEngine, init_distributed  # noqa: E402

LAYOUTS = [  # (name, dp, pp, tp, data_parallel, sequence_parallel, vocab_parallel)
    ("1 process", 1, 1, 1, "ddp", True, True),
    ("DP=2 (DDP)", 2, 1, 1, "ddp", True, True),
    ("DP=2 (FSDP2)", 2, 1, 1, "fsdp", True, True),
    ("PP=2", 1, 2, 1, "ddp", True, True),
    ("TP=2, no SP or VP", 1, 1, 2, "ddp", False, False),
    ("TP=2, SP only", 1, 1, 2, "ddp", True, False),
    ("TP=2", 1, 1, 2, "ddp", True, True),
    ("TP=4, no SP or VP", 1, 1, 4, "ddp", False, False),
    ("TP=4", 1, 1, 4, "ddp", True, True),
    ("TP=2 x PP=2", 1, 2, 2, "ddp", True, True),
    ("DP=2 x TP=2 (FSDP2)", 2, 1, 2, "fsdp", True, True),
]
LENGTHS = (2048, 700, 300, 180, 120, 90, 60, 40)
CHUNK = 512


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors) -> int:
    return sum(_local(t).numel() * t.element_size() for t in tensors)


def _step_bytes(p: torch.Tensor, tp: int) -> int:
    """What a rank holds of ``p`` during a step: everything but its tensor-parallel shard's
    complement (FSDP2 gathers the data-parallel shards)."""
    mesh = getattr(p, "device_mesh", None)
    if mesh is None:
        return p.numel() * p.element_size()
    names = mesh.mesh_dim_names or ()
    tp_sharded = "tp" in names and p.placements[names.index("tp")].is_shard()
    return p.numel() * p.element_size() // (tp if tp_sharded else 1)


def _rank(rank, world, port, cfg, layout, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    _, dp, pp, tp, data_parallel, sequence_parallel, vocab_parallel = layout
    ctx = init_distributed(dp=dp, pp=pp, tp=tp, device=torch.device("cpu"))
    torch.manual_seed(0)
    engine = ParallelEngine(Transformer(cfg), ctx, chunk_size=CHUNK, k=1,
                            data_parallel=data_parallel, sequence_parallel=sequence_parallel,
                            vocab_parallel=vocab_parallel)
    params = engine.parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    batch = [{"input_ids": torch.randint(0, cfg.vocab_size, (n,), generator=g)}
             for n in LENGTHS]
    result = engine.forward_backward(batch)
    engine.clip_grad_norm(1.0)
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values()
             if isinstance(t, torch.Tensor) and t.dim() > 0]
    held = sum(_step_bytes(p, tp) for p in params)
    row = {"params": _bytes(params), "grads": _bytes(p.grad for p in params),
           "adamw": _bytes(state), "step_weights": held, "step_grads": held,
           "activations": result.local.peak_memory_bytes}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def measure(cfg: ModelConfig, layout, workdir: Path) -> dict:
    _, dp, pp, tp, data_parallel, sp, vp = layout
    world = dp * pp * tp
    out = workdir / f"{world}-{dp}-{pp}-{tp}-{data_parallel}-{sp}-{vp}.pt"
    mp.spawn(_rank, args=(world, free_port(), cfg, layout, str(out)), nprocs=world, join=True)
    rows = torch.load(out)
    worst = {key: max(r[key] for r in rows) for key in rows[0]}
    worst["step_peak"] = max(r["step_weights"] + r["step_grads"] + r["activations"]
                             for r in rows)
    worst["at_rest"] = max(r["params"] + r["grads"] + r["adamw"] for r in rows)
    return worst


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=8192)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"layout_memory-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for layout in LAYOUTS:
        row = measure(cfg, layout, workdir)
        results.append({"layout": layout[0], **row})
        print(f"{layout[0]:<22} at rest {_mib(row['at_rest']):>7} MiB, step peak "
              f"{_mib(row['step_peak']):>7} MiB", flush=True)
    one = results[0]
    lines = [f"# Bytes per rank by layout ({machine()['date']})", "",
             f"Reference model: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, 8 "
             f"query / 4 key-value heads, MLP {cfg.intermediate_size}, vocabulary "
             f"{cfg.vocab_size}, float32; one global batch of {len(LENGTHS)} sequences "
             f"({sum(LENGTHS)} tokens, the longest {max(LENGTHS)}: a chain of "
             f"{-(-max(LENGTHS) // CHUNK)} chunks), chunk {CHUNK}, K=1. Largest rank; MiB. "
             f"Command: `python benchmarks/layout_memory.py`.", "",
             "| layout | params | grads | AdamW | at rest | vs 1 | step: weights | step: grads "
             "| step: activations + KV | step peak | vs 1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['layout']} | {_mib(r['params'])} | {_mib(r['grads'])} | {_mib(r['adamw'])} "
            f"| {_mib(r['at_rest'])} | {r['at_rest'] / one['at_rest']:.2f} "
            f"| {_mib(r['step_weights'])} | {_mib(r['step_grads'])} "
            f"| {_mib(r['activations'])} | {_mib(r['step_peak'])} "
            f"| {r['step_peak'] / one['step_peak']:.2f} |")
    lines += ["", "TP layouts run sequence parallelism (SP) and a vocabulary-parallel "
              "embedding and head (VP) unless marked. SP: each TP rank runs the norms, "
              "residual stream, head and loss on its rows of the chunk, so those activations "
              "shrink by tp too. VP: the embedding and head weights (and their gradients and "
              "AdamW state) are split by vocabulary rows, and no rank holds a full-vocabulary "
              "logit. Without VP they are whole on every TP rank. FSDP2 shards everything at "
              "rest but gathers its stage for the step (ZeRO-2)."]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    save("layout_memory", {"machine": machine(), "config": vars(args), "lengths": LENGTHS,
                           "chunk_size": CHUNK, "results": results}, markdown)


if __name__ == "__main__":
    main()
