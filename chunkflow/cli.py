"""Command line: ``chunkflow train | plan | report``.

``train`` and ``plan`` take the same configuration: ``--config FILE.toml`` and
``--section.field=value`` overrides (see ``chunkflow train --help`` for every field).
User errors print ``chunkflow: error: ...`` and exit with status 2; a diverged run exits with 1,
an interrupted one (Ctrl-C, after saving a checkpoint) with 130.
"""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace, unknown: list[str]) -> int:
    from chunkflow.train.config import config_from_args
    from chunkflow.train.trainer import train

    summary = train(config_from_args(args, unknown))
    return 130 if summary.interrupted else 0


def _plan(args: argparse.Namespace, unknown: list[str]) -> int:
    from chunkflow.plan import build_chunks, format_schedule, schedule
    from chunkflow.plan.memory import estimate_peak_memory
    from chunkflow.train.config import config_from_args

    if args.batches < 1:
        raise ValueError(f"--batches={args.batches}: must be a positive integer")
    cfg = config_from_args(args, unknown)
    chunking = cfg.chunking
    model_config = cfg.model.model_config()
    param_bytes = {"float32": 4, "bfloat16": 2, "float64": 8}[cfg.model.dtype]
    # bf16 autocast stores activations in bf16 (plan does not probe for a GPU: "auto" counts as
    # autocast only when the device is named cuda).
    autocast = cfg.train.autocast == "bf16" or (cfg.train.autocast == "auto"
                                                and cfg.train.device == "cuda")
    activation_bytes = 2 if autocast and cfg.model.dtype != "float64" else param_bytes

    def describe(lengths: list[int]) -> str:
        plan = build_chunks(lengths, chunk_size=chunking.chunk_size,
                            pack_chain_tails=chunking.pack_chain_tails)
        estimate = estimate_peak_memory(model_config, plan, k=chunking.k,
                                        param_bytes=param_bytes,
                                        activation_bytes=activation_bytes)
        return (f"{plan.summary()}; longest sequence {max(lengths)} tokens\n"
                f"  estimated peak memory ({cfg.model.preset}, {cfg.model.dtype}"
                f"{', bf16 autocast' if activation_bytes == 2 != param_bytes else ''}, "
                f"k={chunking.k}): {estimate.summary()}"), plan

    if args.lengths:
        try:
            lengths = [int(x) for x in args.lengths.split(",")]
        except ValueError:
            raise ValueError(f"--lengths {args.lengths!r}: expected comma-separated integers, "
                             f"like 9000,300,120") from None
        text, plan = describe(lengths)
        print(text)
        for chunk in plan.chunks:
            kind = (f"chain {chunk.chain_id} chunk {chunk.chain_idx}" if chunk.is_dependent
                    else "standalone")
            segs = " ".join(f"s{s.seq_id}[{s.start}:{s.end}]" for s in chunk.segments)
            print(f"  chunk {chunk.chunk_id:3d} {chunk.num_tokens:6d} tokens  {kind:20s} {segs}")
        print(f"schedule (k={chunking.k}): {format_schedule(schedule(plan, k=chunking.k))}")
        return 0

    from chunkflow.train.data import DataPosition, DataStats, build_dataset, global_batches

    dataset = build_dataset(cfg.data, vocab_size=model_config.vocab_size, seed=cfg.train.seed)
    stats = DataStats()
    print(f"data: {dataset.describe()}; chunk_size={chunking.chunk_size}, k={chunking.k}")
    batches = global_batches(dataset, cfg.data, DataPosition(), stats)
    for i in range(args.batches):
        batch, _, batch_stats = next(batches)
        text, _ = describe([len(ex) for ex in batch])
        print(f"global batch {i + 1}: {text}")
    print(f"data so far: {batch_stats.summary(max_length=cfg.data.max_length)}")
    return 0


def _report(args: argparse.Namespace, unknown: list[str]) -> int:
    from chunkflow.train.report import write_report

    if unknown:
        raise ValueError(f"unexpected arguments {' '.join(unknown)}; usage: chunkflow report "
                         f"RUN_DIR [--output FILE.png]")
    print(write_report(args.run_dir, output=args.output))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from chunkflow.train.config import add_config_arguments

    parser = argparse.ArgumentParser(prog="chunkflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", allow_abbrev=False, help="train a model (default: the built-in tiny model on "
        "built-in long-tail data, on CPU)",
        description="Train with ChunkFlow. Every option below can also be set in a TOML file "
                    "(--config) as [section] field = value; the command line wins.")
    add_config_arguments(train)
    train.set_defaults(func=_train)

    plan = sub.add_parser(
        "plan", allow_abbrev=False, help="chunk statistics and estimated peak memory of the "
        "configured data's first global batches",
        description="Chunk statistics of the first global batches of the configured data (or "
                    "of --lengths), with an estimate of peak memory. Takes the same "
                    "configuration as `chunkflow train`.")
    plan.add_argument("--batches", type=int, default=3, help="global batches to show (default 3)")
    plan.add_argument("--lengths", help="comma-separated sequence lengths of one batch instead "
                                        "of the configured data; prints each chunk and the "
                                        "schedule")
    add_config_arguments(plan, resume=False)
    plan.set_defaults(func=_plan)

    report = sub.add_parser("report", help="plot loss, throughput and peak memory of a run "
                                           "to a PNG")
    report.add_argument("run_dir", help="a run's output_dir (holding metrics.jsonl)")
    report.add_argument("--output", help="PNG path (default: RUN_DIR/report.png)")
    report.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    from chunkflow.train import TrainingError

    try:
        return args.func(args, unknown)
    except ValueError as e:
        print(f"chunkflow: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"chunkflow: training stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: stop without saving
        print("chunkflow: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
