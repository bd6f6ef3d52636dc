"""Command line: ``chunkflow train | data check | plan | simulate | bench | report``.

``train`` and ``plan`` take the same configuration: ``--config FILE.toml`` and
``--section.field=value`` overrides (see ``chunkflow train --help`` for every field).
Exit status: 0 done; 2 a user error (``chunkflow: error: ...``: a bad option, file or record,
named); 1 training stopped (a diverged loss, too many empty batches); 3 a checkpoint did not fit
on the disk (one line with the directory and the bytes needed; older checkpoints are intact);
128 + the signal's number when a signal stopped the run after saving a checkpoint: 130 Ctrl-C
(SIGINT), 143 SIGTERM, 138 SIGUSR1 (a second signal during a step aborts without saving:
130).

chunkflow never downloads anything: Hugging Face libraries run offline (``HF_HUB_OFFLINE=1``
unless set otherwise), and model and tokenizer paths must be local directories.
"""

from __future__ import annotations

import argparse
import os
import sys


EXIT_USER_ERROR, EXIT_STOPPED, EXIT_DISK_FULL, EXIT_INTERRUPTED = 2, 1, 3, 130


def _train(args: argparse.Namespace, unknown: list[str]) -> int:
    from chunkflow.train.arguments import config_from_args
    from chunkflow.train.run.process import exit_code
    from chunkflow.train.run.trainer import train

    # Under torchrun every rank parses the same arguments; rank 0 speaks for them.
    log = print if os.environ.get("RANK", "0") == "0" else None
    summary = train(config_from_args(args, unknown, log=log))
    return exit_code(summary.stop_signal) if summary.interrupted else 0


def _data_check(args: argparse.Namespace, unknown: list[str]) -> int:
    from chunkflow.train.arguments import config_from_args
    from chunkflow.train.data.check import check_data

    if args.show < 0:
        raise ValueError(f"--show={args.show}: must be 0 or more")
    return check_data(config_from_args(args, unknown), show=args.show)


def _plan(args: argparse.Namespace, unknown: list[str]) -> int:
    from chunkflow.plan.lengths import parse_lengths
    from chunkflow.train.arguments import config_from_args
    from chunkflow.train.preview import preview_data, preview_lengths

    if args.auto:
        from chunkflow.train.auto.layout import plan_auto

        return plan_auto(args, unknown)
    if args.dry_run:
        return _dry_run(args, unknown)
    if args.json or args.full_step:
        flag = "--json FILE" if args.json else "--full-step"
        raise ValueError(f"{flag} is a dry run's option; valid: with --dry-run")
    ignored = [f"--{name.replace('_', '-')}" for name, default in _AUTO_DEFAULTS.items()
               if getattr(args, name) != default]
    if ignored:
        print(f"chunkflow: warning: {', '.join(ignored)} only apply with --auto; ignored",
              file=sys.stderr)
    args.batches = 3 if args.batches is None else args.batches
    if args.batches < 1:
        raise ValueError(f"--batches={args.batches}: must be a positive integer")
    cfg = config_from_args(args, unknown)
    print(preview_lengths(cfg, parse_lengths(args.lengths)) if args.lengths else
          preview_data(cfg, args.batches))
    return 0


def _dry_run(args: argparse.Namespace, unknown: list[str]) -> int:
    """plan --dry-run: the real step on fake tensors, per rank role (:mod:`chunkflow.dryrun`)."""
    import time

    from chunkflow.dryrun.layout import check_layout, dry_run
    from chunkflow.plan.gpus import get_gpu_spec
    from chunkflow.plan.lengths import parse_lengths
    from chunkflow.train.arguments import config_from_args
    from chunkflow.train.data.batching import first_batches

    cfg = config_from_args(args, unknown)
    gpu = get_gpu_spec(args.gpu or "h100-80gb")
    gpus = args.gpus if args.gpus is not None else cfg.parallel.pp * cfg.parallel.tp
    check_layout(cfg, gpus)
    if args.lengths:
        batches = [parse_lengths(args.lengths)]
    else:
        num = 1 if args.batches is None else args.batches
        if num < 1:
            raise ValueError(f"--batches={num}: must be a positive integer")
        _, first = first_batches(cfg, num)
        batches = [[len(ex) for ex in batch] for batch, _ in first]
    t0 = time.perf_counter()
    report = dry_run(cfg, batches, gpu, gpus=gpus, full=args.full_step,
                     log=lambda line: print(line, file=sys.stderr))
    print(report.format())
    print(f"(the dry run took {time.perf_counter() - t0:.1f} s on this machine)")
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}")
    return 0


# plan --auto's options and defaults (other plan runs warn when one of them is changed)
_AUTO_DEFAULTS = {"model": None, "gpu": None, "gpus": None, "max_len": "256K",
                  "memory_budget": "80GiB", "global_batch": 256, "top": 5}


def _bench(args: argparse.Namespace, unknown: list[str]) -> int:
    """Train the same model on the same data with chunkflow and the baselines; write tables."""
    from chunkflow.bench.options import BenchOptions
    from chunkflow.bench.sweep import run
    from chunkflow.plan.units import parse_size

    if unknown:
        raise ValueError(f"unexpected arguments {' '.join(unknown)}; see chunkflow bench --help")
    budget = (None if args.memory_budget.strip().lower() == "none"
              else parse_size(args.memory_budget))
    lengths = tuple(parse_size(x) for x in args.lengths.split(","))
    options = BenchOptions(
        lengths=lengths, num_sequences=args.num_sequences, steps=args.steps,
        chunk_size=args.chunk_size, k=args.k, hf_micro_batch=args.hf_micro_batch,
        pad_micro_batches=args.pad_micro_batches, memory_budget=budget, model=args.model,
        device=args.device, dtype=args.dtype, seed=args.seed, output_dir=args.output_dir)
    run(options, log=lambda line: print(line, flush=True))
    return 0


def _report(args: argparse.Namespace, unknown: list[str]) -> int:
    from chunkflow.train.run.report import write_report

    if unknown:
        raise ValueError(f"unexpected arguments {' '.join(unknown)}; usage: chunkflow report "
                         f"RUN_DIR [--output FILE.png]")
    print(write_report(args.run_dir, output=args.output))
    return 0


def _simulate(args: argparse.Namespace, unknown: list[str]) -> int:
    """Pipeline schedule of one batch and its simulated bubbles (time proportional to tokens)."""
    if unknown:
        raise ValueError(f"unexpected arguments {' '.join(unknown)}")
    if args.paper:
        from chunkflow.sim.paper import main_paper

        main_paper()
        return 0
    from chunkflow.plan.chunks import check_positive_int

    for name in ("chunk_size", "k", "stages"):  # before anything is printed
        check_positive_int(name, getattr(args, name))
    import json

    from chunkflow.plan import ActionKind, build_chunks, format_pipeline, one_f_one_b
    from chunkflow.plan.zero_bubble import pipeline_schedule
    from chunkflow.sim import chrome_trace, simulate
    from chunkflow.sim.search import best_order

    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        raise ValueError(f"--lengths {args.lengths!r}: expected comma-separated integers, "
                         f"like 4096,2048,1024") from None
    plan = build_chunks(lengths, chunk_size=args.chunk_size)

    def by_tokens(sizes):  # a forward 1, a backward 2 (its I and W halves 1 each)
        return lambda stage, a: sizes[a.chunk_id] * (2 if a.kind is ActionKind.BACKWARD else 1)

    chunk_tokens = [c.num_tokens for c in plan.chunks]
    baseline = simulate(one_f_one_b(len(lengths), args.stages), duration=by_tokens(lengths))
    print(f"plain 1F1B, one sequence per micro-batch: {baseline.summary()}")
    order = None  # plan order: chains first
    if args.order == "standalone-first":  # the paper's figure
        order = ([c.chunk_id for c in plan.chunks if c.chain_id is None]
                 + [c for chain in plan.chains for c in chain.chunk_ids])
    elif args.order == "search":
        name, order, _ = best_order(plan, args.stages, k=args.k, duration=by_tokens(chunk_tokens))
        print(f"order search: best is {name!r}")
    stages = pipeline_schedule(plan, args.stages, k=args.k, order=order,
                               schedule=args.schedule, duration=by_tokens(chunk_tokens))
    result = simulate(stages, duration=by_tokens(chunk_tokens))
    name = {"1f1b": "state-aware 1F1B", "zb-h1": "state-aware zero-bubble ZB-H1",
            "zb-h2": "state-aware zero-bubble ZB-H2"}[args.schedule]
    print(f"{plan.summary()}\n{name} (k={args.k}, {args.order} order): "
          f"{result.summary()}\n"
          f"{format_pipeline(stages)}")
    if args.trace:
        with open(args.trace, "w") as f:
            json.dump(chrome_trace(result), f)
        print(f"Chrome trace: {args.trace} (open in chrome://tracing or ui.perfetto.dev)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from chunkflow.train.arguments import add_config_arguments

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

    data = sub.add_parser(
        "data", help="check the training data before a run (chunkflow data check ...)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser(
        "check", allow_abbrev=False,
        help="read all of --data.path (and --eval.path) once: every bad record with its file "
             "and line, tokens and length statistics; exit 2 if any record is bad",
        description="Read every record of --data.path (and --eval.path) as chunkflow train "
                    "would, streamed; list the bad ones (file and line) and the tokens and "
                    "lengths of the rest. Takes chunkflow train's options.")
    check.add_argument("--show", type=int, default=20, metavar="N",
                       help="bad records listed one by one before the rest are counted "
                            "(default: 20)")
    add_config_arguments(check, resume=False)
    check.set_defaults(func=_data_check)

    plan = sub.add_parser(
        "plan", allow_abbrev=False, help="chunk statistics and estimated peak memory of the "
        "configured data's first global batches",
        description="Chunk statistics of the first global batches of the configured data (or "
                    "of --lengths), with an estimate of peak memory. Takes the same "
                    "configuration as `chunkflow train`.")
    plan.add_argument("--batches", type=int, default=None, help="global batches to show, or (with "
                      "--auto and the run's data) to tune on (default 3), or to dry-run "
                      "(default 1)")
    plan.add_argument("--lengths", help="comma-separated sequence lengths of one batch instead "
                                        "of the configured data; prints each chunk and the "
                                        "schedule")
    dry = plan.add_argument_group("dry run (--dry-run)")
    dry.add_argument("--dry-run", action="store_true", help="run the real step on fake tensors "
                     "(no GPU, no weights) on --gpus of --gpu, once per rank role: peak memory "
                     "by category, host pinned memory, FLOPs, roofline step time, MFU, fits; "
                     "with --auto: confirm the pick so, else take the next candidate that fits")
    dry.add_argument("--json", metavar="FILE", help="also write the dry run's findings here")
    dry.add_argument("--full-step", action="store_true", help="run every decoder layer and "
                     "chunk (by default a stage of more than 4 alike layers is extrapolated "
                     "from its steps with 2, 3 and 4, and on one GPU a chain of more than 6 "
                     "chunks from chains of 3 to 6, where the step is polynomial in them, "
                     "which the extra probe checks)")
    auto = plan.add_argument_group("auto-tuning (--auto)")
    d = _AUTO_DEFAULTS
    auto.add_argument("--auto", action="store_true", help="choose (chunk_size, K) and the "
                      "parallel layout with the fastest predicted iteration within the budget")
    auto.add_argument("--model", default=d["model"], help="qwen2.5-7b (default)|14b|32b|72b or "
                      "a preset (tiny, qwen2.5-0.5b); or give the run's --model.path")
    auto.add_argument("--gpu", default=d["gpu"], help="h100-80gb or a100-80gb (--dry-run: "
                      "any GPU of chunkflow.plan.gpus, e.g. H200)")
    auto.add_argument("--gpus", type=int, default=d["gpus"], help="GPUs in all (default: "
                      "this machine's CUDA devices; needed on a machine without any; "
                      "--dry-run: pp x tp)")
    auto.add_argument("--max-len", default=d["max_len"], help="longest sequence, e.g. 256K")
    auto.add_argument("--memory-budget", default=d["memory_budget"], help="per GPU, e.g. 80GiB")
    auto.add_argument("--global-batch", type=int, default=d["global_batch"])
    auto.add_argument("--seed", type=int, default=0)
    auto.add_argument("--top", type=int, default=d["top"], help="candidates to print")
    add_config_arguments(plan, resume=False)
    plan.set_defaults(func=_plan)

    simulate = sub.add_parser(
        "simulate", help="simulate the pipeline schedule of a batch (time proportional to "
        "tokens, backward = 2 x forward), or the paper's comparison (--paper)")
    simulate.add_argument("--lengths", default="4,2,1,1", help="comma-separated sequence "
                          "lengths (default 4,2,1,1: the paper's figure)")
    simulate.add_argument("--chunk-size", type=int, default=2)
    simulate.add_argument("--k", type=int, default=2)
    simulate.add_argument("--stages", type=int, default=4)
    simulate.add_argument("--order", choices=("plan", "standalone-first", "search"),
                          default="plan", help="forward order of the chunks: plan (chains "
                          "first, the default), standalone-first (the paper's figure), or "
                          "search (simulate candidates, keep the fastest)")
    simulate.add_argument("--schedule", choices=("1f1b", "zb-h1", "zb-h2"), default="1f1b",
                          help="pipeline schedule: 1f1b (state-aware 1F1B, the default), "
                          "zb-h1 (zero-bubble: backward split into I and W, W filling the "
                          "bubbles, 1F1B's in-flight activations) or zb-h2 (zero-bubble with "
                          "twice the warm-up, more memory)")
    simulate.add_argument("--trace", help="write a Chrome trace (JSON) here")
    simulate.add_argument("--paper", action="store_true", help="Megatron-LM vs chunkflow at "
                          "the paper's scale, from the cost model")
    simulate.set_defaults(func=_simulate)

    from chunkflow.bench.options import BenchOptions

    b = BenchOptions()
    bench = sub.add_parser(
        "bench", help="chunkflow against Megatron-style padding and packing, HF flattened "
        "batches and the ideal: throughput and peak memory over a sweep of maximum lengths",
        description="Trains the same model on the same LMSys-like global batches with each "
                    "method, one process per configuration, and writes a markdown table, JSON "
                    "and PNG plots named after the hardware and date. The defaults reproduce "
                    "the README's CPU table (about 12 minutes on 2 cores).")
    bench.add_argument("--lengths", default=",".join(str(n) for n in b.lengths),
                       help="maximum lengths to sweep, comma-separated (e.g. 4K,16K,32K)")
    bench.add_argument("--num-sequences", type=int, default=b.num_sequences,
                       help="sequences per global batch (one has the maximum length)")
    bench.add_argument("--steps", type=int, default=b.steps,
                       help="measured steps at the longest length, each on a new global "
                            "batch; a length L gets steps x (longest // L)")
    bench.add_argument("--chunk-size", type=int, default=b.chunk_size, help="chunkflow's")
    bench.add_argument("--k", type=int, default=b.k, help="chunkflow's K")
    bench.add_argument("--hf-micro-batch", type=int, default=b.hf_micro_batch,
                       help="examples per HF micro-batch, flattened into one row")
    bench.add_argument("--pad-micro-batches", type=int, default=b.pad_micro_batches,
                       help="padded micro-batches run per step; all have one shape, the rest "
                            "are counted at their mean time")
    bench.add_argument("--memory-budget", default="768MiB",
                       help="peak step memory for the budget table (e.g. 768MiB), or none")
    bench.add_argument("--model", default=b.model, help="cpu or gpu (chunkflow.bench.workload)")
    bench.add_argument("--device", default=b.device, help="cpu or cuda")
    bench.add_argument("--dtype", default=b.dtype, help="float32, or bfloat16 autocast")
    bench.add_argument("--seed", type=int, default=b.seed)
    bench.add_argument("--output-dir", default=b.output_dir)
    bench.set_defaults(func=_bench)

    report = sub.add_parser("report", help="plot loss, throughput and peak memory of a run "
                                           "to a PNG")
    report.add_argument("run_dir", help="a run's output_dir (holding metrics.jsonl)")
    report.add_argument("--output", help="PNG path (default: RUN_DIR/report.png)")
    report.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before transformers or huggingface_hub are imported: they read it once, at import.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args, unknown = build_parser().parse_known_args(argv)
    from chunkflow.train import CheckpointSpaceError, TrainingError

    rank = int(os.environ.get("RANK", "0"))
    try:
        return args.func(args, unknown)
    except ValueError as e:
        # Under torchrun every rank runs the same command on the same files and data, so a bad
        # option, file or record is the same error on each: rank 0 says it once.
        if rank == 0:
            print(f"chunkflow: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except CheckpointSpaceError as e:
        print(f"chunkflow: checkpoint not saved: {e}", file=sys.stderr)
        return EXIT_DISK_FULL
    except TrainingError as e:
        print(f"chunkflow: training stopped: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:  # a second Ctrl-C: stop without saving
        print("chunkflow: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
