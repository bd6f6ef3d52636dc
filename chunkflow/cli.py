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

from chunkflow.launch import fsdp_runs, launch_command, run_options

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
    from chunkflow.plan import build_chunks, format_schedule, schedule
    from chunkflow.plan.lengths import parse_lengths
    from chunkflow.plan.memory import estimate_peak_memory, state_extra_rows
    from chunkflow.train.build import (configured_shape, describe_dtypes, model_label,
                                       trainable_params)
    from chunkflow.plan.units import BYTES_PER_ELEMENT
    from chunkflow.train.arguments import config_from_args

    if args.auto:
        return _autotune(args, unknown)
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
    chunking = cfg.chunking
    shape = configured_shape(cfg)
    trainable = trainable_params(cfg)
    param_dtype = cfg.param_dtype()
    param_bytes = BYTES_PER_ELEMENT[param_dtype]
    # bf16 autocast stores activations in bf16 (plan does not probe for a GPU: "auto" counts as
    # autocast only when the device is named cuda).
    autocast = cfg.train.autocast == "bf16" or (cfg.train.autocast == "auto"
                                                and cfg.train.device == "cuda")
    activation_bytes = 2 if autocast and param_dtype != "float64" else param_bytes

    configured = dict(recompute=chunking.recompute, offload=chunking.offload,
                      activation_checkpointing=chunking.activation_checkpointing)
    # offload runs on CUDA, where 16-bit runs' states hold a chunk more rows (varlen's layout)
    extra_rows = state_extra_rows(chunking.attention_backend, "cuda", activation_bytes,
                                  chunking.chunk_size)

    def describe(lengths: list[int]) -> str:
        plan = build_chunks(lengths, chunk_size=chunking.chunk_size,
                            pack_chain_tails=chunking.pack_chain_tails)

        def estimate(**options):
            return estimate_peak_memory(shape, plan, k=chunking.k, param_bytes=param_bytes,
                                        activation_bytes=activation_bytes,
                                        state_extra_rows=extra_rows,
                                        trainable_params=trainable,
                                        **{**configured, **options})

        mine = estimate()
        settings = ", ".join(f"{name}={value}" for name, value in configured.items()
                             if value not in ("full", "none", False))
        return (f"{plan.summary()}; longest sequence {max(lengths)} tokens\n"
                f"  estimated peak memory ({model_label(cfg)}, {describe_dtypes(cfg)}"
                f"{', bf16 autocast' if activation_bytes == 2 != param_bytes else ''}"
                f"{f', LoRA ({trainable:,} trained parameters)' if trainable else ''}, "
                f"k={chunking.k}{', ' + settings if settings else ''}): {mine.summary()}\n"
                f"  {_alternatives(estimate, mine, configured)}"), plan

    if args.lengths:
        lengths = parse_lengths(args.lengths)
        text, plan = describe(lengths)
        print(text)
        for chunk in plan.chunks:
            kind = (f"chain {chunk.chain_id} chunk {chunk.chain_idx}" if chunk.is_dependent
                    else "standalone")
            segs = " ".join(f"s{s.seq_id}[{s.start}:{s.end}]" for s in chunk.segments)
            print(f"  chunk {chunk.chunk_id:3d} {chunk.num_tokens:6d} tokens  {kind:20s} {segs}")
        actions = schedule(plan, k=chunking.k, recompute=chunking.recompute)
        print(f"schedule (k={chunking.k}): {format_schedule(actions)}")
        return 0

    dataset, first = _data_batches(cfg, args.batches)
    print(f"data: {dataset.describe()}; chunk_size={chunking.chunk_size}, k={chunking.k}")
    for i, (batch, _) in enumerate(first):
        text, _ = describe([len(ex) for ex in batch])
        print(f"global batch {i + 1}: {text}")
    print(f"data so far: {first[-1][1].summary(max_length=cfg.data.max_length)}")
    return 0


def _alternatives(estimate, mine, configured: dict) -> str:
    """The peak under each other recompute/offload/checkpointing setting (``chunkflow plan``):
    what selective recompute costs, what offload (CUDA) and checkpointing save."""
    from chunkflow.plan.units import format_size

    changes = [dict(recompute="selective" if configured["recompute"] == "full" else "full"),
               dict(offload="state"), dict(recompute="selective", offload="all"),
               dict(offload="none"),
               dict(activation_checkpointing=not configured["activation_checkpointing"])]
    parts = []
    for change in changes:  # one setting changed (offload="all" needs selective recompute)
        option = {**configured, **change}
        if option == configured or (option["offload"] == "all"
                                    and option["recompute"] != "selective"):
            continue
        other = estimate(**option)
        if other.total == mine.total and not other.host:
            continue
        delta = other.total - mine.total
        name = ", ".join(f"{k}={str(v).lower()}" for k, v in option.items()
                         if v != configured[k])
        host = f", {format_size(other.host)} in host memory" if other.host else ""
        parts.append(f"{name}: {format_size(other.total)} "
                     f"({'+' if delta >= 0 else '-'}{format_size(abs(delta))}{host})")
    return "other settings: " + ("; ".join(parts) if parts else "the same peak")


def _dry_run(args: argparse.Namespace, unknown: list[str]) -> int:
    """plan --dry-run: the real step on fake tensors, per rank role (:mod:`chunkflow.dryrun`)."""
    import time

    from chunkflow.dryrun.layout import check_layout, dry_run
    from chunkflow.plan.gpus import get_gpu_spec
    from chunkflow.plan.lengths import parse_lengths
    from chunkflow.train.arguments import config_from_args

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
        _, first = _data_batches(cfg, num)
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


def _data_batches(cfg, num_batches: int, *, vocab_size: int | None = None):
    """The configured data set (with the run's tokenizer) and its first global batches, each
    with the data counters after it. ``vocab_size``: the model's (default: the configured
    model's)."""
    from chunkflow.train.data.batching import global_batches
    from chunkflow.train.build import build_tokenizer, configured_shape
    from chunkflow.train.data.dataset import DataPosition, DataStats, build_dataset

    vocab_size = configured_shape(cfg).vocab_size if vocab_size is None else vocab_size
    dataset = build_dataset(cfg.data, vocab_size=vocab_size,
                            seed=cfg.train.seed, tokenizer=build_tokenizer(cfg),
                            model_path=cfg.model.path)
    batches = global_batches(dataset, cfg.data, DataPosition(), DataStats())
    return dataset, [(batch, stats) for (batch, _, stats), _ in zip(batches, range(num_batches))]


# plan --auto's options and defaults (other plan runs warn when one of them is changed)
_AUTO_DEFAULTS = {"model": None, "gpu": None, "gpus": None, "max_len": "256K",
                  "memory_budget": "80GiB", "global_batch": 256, "top": 5}


def _autotune(args: argparse.Namespace, unknown: list[str]) -> int:
    """``plan --auto``: (chunk_size, K) and layout with the fastest predicted iteration.

    The model: ``--model NAME`` (the paper's shapes and chunkflow's presets), or the run's own
    ``--model.path`` / ``--model.preset``. The batches: ``--global-batch`` long-tailed lengths
    up to ``--max-len``, or, when the run's data is given (``--data.path`` or ``--config``), its
    first ``--batches`` global batches as the run will form them."""
    from chunkflow.plan.cost import get_gpu
    from chunkflow.plan.units import format_size, parse_size
    from chunkflow.sim.tune import autotune, format_candidates
    from chunkflow.train.arguments import config_from_args

    cfg = config_from_args(args, unknown)  # the run's options (same as chunkflow train)
    args.batches = 3 if args.batches is None else args.batches
    given = {name for name in vars(args) if "." in name}
    own_model = args.config is not None or given & {"model.path", "model.preset"}
    if own_model and args.model is not None:
        raise ValueError(f"--model {args.model} and the run's model ("
                         f"{cfg.model.path or cfg.model.preset}) both given; valid: one of them")
    devices = _target_gpus(args)
    from chunkflow.train.build import configured_shape, model_label

    shape, name = ((configured_shape(cfg), model_label(cfg)) if own_model
                   else (_named_shape(args.model or "qwen2.5-7b"), args.model or "qwen2.5-7b"))
    gpu, budget = get_gpu(args.gpu), parse_size(args.memory_budget)
    # The run's own model or data: priced as chunkflow runs TP (sequence and vocabulary
    # parallel, gathered inputs kept); the paper's shapes alone: as Megatron does.
    options = {"runtime": "chunkflow" if own_model else "megatron"}
    if args.config is not None or "data.path" in given:
        # The run's own data: its first global batches, as the trainer will form them. The
        # layouts are those chunkflow runs (no pipeline stages with tied embeddings), priced
        # as its runtime runs tensor parallelism.
        if args.batches < 1:
            raise ValueError(f"--batches={args.batches}: must be a positive integer")
        _, first = _data_batches(cfg, args.batches, vocab_size=shape.vocab_size)
        options["batches"] = [[len(ex) for ex in batch] for batch, _ in first]
        max_len = max(max(b) for b in options["batches"])
        longest = max(128, 1 << (max_len - 1).bit_length())  # the powers of two up to it
        options["chunk_sizes"] = [1 << p for p in range(7, 16) if 1 << p <= longest]
        options["runtime"] = "chunkflow"
        data = cfg.data.path or "the built-in data"
        source = (f"the first {len(first)} global batch(es) of {data} (longest sequence "
                  f"{max_len} tokens)")
    else:
        max_len = parse_size(args.max_len)
        source = f"max length {args.max_len}, global batch {args.global_batch}"
    print(f"auto-tune: {name} on {args.gpus} x {gpu.name}, {source}, memory budget "
          f"{args.memory_budget} (predicted by chunkflow.plan.cost + chunkflow.sim; the GPUs: "
          f"{devices})")
    fsdp = not own_model or fsdp_runs(cfg)
    if options["runtime"] == "chunkflow" and shape.tie_word_embeddings:
        options["max_pp"] = 1  # the embedding and the head would be on two stages
    family = cfg.model.hf_family() if own_model else None
    if own_model and family is not None and not family.parallel:
        options["max_tp"] = options["max_pp"] = 1  # these families: data parallel only
    elif own_model and cfg.lora.rank > 0:
        options["max_tp"] = 1  # tensor parallelism refuses LoRA; pipeline stages run it
    if options["runtime"] == "chunkflow":  # the run's own settings: SP, and FSDP2 or DDP
        options["cost_options"] = {"sp": None if cfg.parallel.sequence_parallel else 1,
                                   "vocab_parallel": cfg.parallel.vocab_parallel,
                                   "distributed_optimizer": fsdp}
    candidates = autotune(shape, gpu, max_len=max_len, num_gpus=args.gpus,
                          memory_budget=budget, global_batch=args.global_batch, seed=args.seed,
                          **options)
    print(format_candidates(candidates, top=args.top))
    best = candidates[0]
    if args.dry_run:
        import dataclasses
        import random

        from chunkflow.dryrun.layout import first_that_fits
        from chunkflow.plan.lengths import sample_lengths

        batch = (options["batches"][0] if "batches" in options else
                 sample_lengths(random.Random(args.seed), args.global_batch, max_len=max_len))
        run_cfg = cfg if own_model else dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, preset=args.model or "qwen2.5-7b"))
        best = first_that_fits(run_cfg, candidates[:args.top], batch, args.gpu, args.gpus, fsdp=fsdp)
    run = run_options(args.config, {name: getattr(args, name) for name in given}) \
        if own_model else " ..."
    if own_model and cfg.train.output_dir is not None:
        # the run's directory may hold checkpoints already (a --config of a run's
        # config.toml): the line continues it then, and starts it otherwise
        run += " --resume=auto"
    launch = launch_command(best, gpus=args.gpus, run=run, fsdp=fsdp,
                            vocab_parallel=(cfg.parallel.vocab_parallel
                                            or options["runtime"] != "chunkflow"),
                            explicit=args.config is not None)
    print(f"launch it: {launch}  (predicted peak {format_size(best.peak_memory_bytes)} per GPU"
          + ("" if options["runtime"] == "chunkflow" else "; priced as Megatron's tensor "
             "parallelism, which gathers the layers' inputs again in backward where chunkflow "
             "keeps them: plan with the run's --model.* or --config for its own") + ")")
    return 0


def _target_gpus(args: argparse.Namespace) -> str:
    """Fill in ``args.gpus``/``args.gpu`` for ``plan --auto``: as given, else this machine's
    CUDA devices; a machine without any needs ``--gpus`` (the cluster the run will use).
    Returns where the figures came from."""
    if args.gpus is not None:
        named = args.gpu is not None
        args.gpu = args.gpu or "h100-80gb"
        return "as given" if named else "--gpus as given, --gpu h100-80gb by default"
    import torch

    if not torch.cuda.is_available():
        raise ValueError("plan --auto plans a GPU layout and this machine has no CUDA device; "
                         "valid: --gpus N (and --gpu h100-80gb or a100-80gb) for the cluster "
                         "the run will use")
    args.gpus = torch.cuda.device_count()
    if args.gpu is None:
        device = torch.cuda.get_device_name(0)
        args.gpu = next((key for key in ("h100-80gb", "a100-80gb")
                         if key.split("-")[0].upper() in device.upper()), None)
        if args.gpu is None:
            raise ValueError(f"plan --auto has no cost profile for this machine's {device!r}; "
                             f"valid: --gpu h100-80gb or a100-80gb, the closer one")
    return "this machine's CUDA devices"


def _named_shape(name: str):
    """``--model``: a shape of the paper's table (qwen2.5-7b..72b) or a chunkflow preset."""
    from chunkflow.plan.cost import MODEL_SHAPES, get_model_shape

    if name.lower() in MODEL_SHAPES:
        return get_model_shape(name)
    from chunkflow.models.config import PRESETS
    from chunkflow.models.families import model_shape

    if name.lower() in PRESETS:
        return model_shape(PRESETS[name.lower()])
    raise ValueError(f"--model {name!r}: known are {', '.join([*MODEL_SHAPES, *PRESETS])}, or "
                     f"pass the run's --model.path")


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
    from chunkflow.plan import state_aware_1f1b
    from chunkflow.sim import chrome_trace, simulate
    from chunkflow.sim.search import best_order

    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        raise ValueError(f"--lengths {args.lengths!r}: expected comma-separated integers, "
                         f"like 4096,2048,1024") from None
    plan = build_chunks(lengths, chunk_size=args.chunk_size)

    def by_tokens(sizes):
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
    stages = state_aware_1f1b(plan, args.stages, k=args.k, order=order)
    result = simulate(stages, duration=by_tokens(chunk_tokens))
    print(f"{plan.summary()}\nstate-aware 1F1B (k={args.k}, {args.order} order): "
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
