"""Command line: ``chunkflow demo`` (the built-in training run) and ``chunkflow plan``."""

from __future__ import annotations

import argparse
import random
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    import torch

    from chunkflow import ChunkFlowEngine
    from chunkflow.models import Transformer, get_preset
    from chunkflow.train.synthetic import MarkovSource, sample_lengths

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    config = get_preset("tiny")
    model = Transformer(config)
    engine = ChunkFlowEngine(model, chunk_size=args.chunk_size, k=args.k)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    source = MarkovSource(32, seed=args.seed)
    print(f"chunkflow demo: tiny model ({config.num_params / 1e6:.2f}M params), chunk_size="
          f"{args.chunk_size}, k={args.k}, {args.batch_size} sequences/step up to "
          f"{args.max_len} tokens; best possible loss {source.entropy_nats:.3f}")
    first = last = None
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        lengths = sample_lengths(rng, args.batch_size, max_len=args.max_len)
        if step == 1:
            lengths[0] = args.max_len  # make the long tail visible from the first step
        batch = [torch.tensor(source.sample(rng, n)) for n in lengths]
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        result = engine.forward_backward(batch)
        optimizer.step()
        dt = time.perf_counter() - t0
        loss = float(result.loss)
        first = loss if first is None else first
        last = loss
        print(f"step {step:3d}  loss {loss:.4f}  tokens {result.num_tokens:6d}  longest "
              f"{max(lengths):5d}  chunks {result.num_chunks:3d}  peak {result.peak_memory_bytes / 2**20:7.1f} MiB  "
              f"{result.num_tokens / dt:8.0f} tok/s", flush=True)
    print(f"loss {first:.3f} -> {last:.3f} in {args.steps} steps, "
          f"{time.perf_counter() - start:.0f} s")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from chunkflow.plan import build_chunks, format_schedule, schedule

    if args.lengths:
        try:
            lengths = [int(x) for x in args.lengths.split(",")]
        except ValueError:
            raise ValueError(f"--lengths {args.lengths!r}: expected comma-separated integers, "
                             f"like 9000,300,120") from None
    else:
        from chunkflow.train.synthetic import sample_lengths

        lengths = sample_lengths(random.Random(args.seed), args.num_sequences, max_len=args.max_len)
    plan = build_chunks(lengths, chunk_size=args.chunk_size,
                        pack_chain_tails=not args.no_tail_packing)
    print(plan.summary())
    for chunk in plan.chunks:
        kind = (f"chain {chunk.chain_id} chunk {chunk.chain_idx}" if chunk.is_dependent
                else "standalone")
        segs = " ".join(f"s{s.seq_id}[{s.start}:{s.end}]" for s in chunk.segments)
        print(f"  chunk {chunk.chunk_id:3d} {chunk.num_tokens:6d} tokens  {kind:20s} {segs}")
    print("schedule (k={}): {}".format(args.k, format_schedule(schedule(plan, k=args.k))))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chunkflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train the tiny model on built-in long-tail data (CPU)")
    demo.add_argument("--steps", type=int, default=60)
    demo.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    demo.add_argument("--max-len", type=int, default=4096, help="longest sequence")
    demo.add_argument("--chunk-size", type=int, default=512)
    demo.add_argument("--k", type=int, default=1)
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    plan = sub.add_parser("plan", help="print the chunk plan and schedule of a batch")
    plan.add_argument("--lengths", help="comma-separated sequence lengths (default: sampled)")
    plan.add_argument("--num-sequences", type=int, default=32)
    plan.add_argument("--max-len", type=int, default=32768)
    plan.add_argument("--chunk-size", type=int, default=4096)
    plan.add_argument("--k", type=int, default=1)
    plan.add_argument("--no-tail-packing", action="store_true",
                      help="do not pack short sequences into chains' last chunks")
    plan.add_argument("--seed", type=int, default=0)
    plan.set_defaults(func=_plan)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"chunkflow: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
