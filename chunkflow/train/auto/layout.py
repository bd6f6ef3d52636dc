"""``chunkflow plan --auto``: chunk settings and (dp, pp, tp) layout for a cluster.

* The model: ``--model NAME`` (the paper's Qwen2.5 shapes, chunkflow's presets), or the run's own
  ``--model.path``/``--model.preset``, priced as chunkflow runs it (its family's layouts, LoRA,
  sequence/vocabulary parallelism, FSDP2 or DDP).
* The batches: long-tailed lengths up to ``--max-len``, or the run's first global batches.
* The GPUs: ``--gpus``/``--gpu``, else this machine's CUDA devices.
* The ranking: :func:`chunkflow.sim.tune.autotune` (simulated iteration time within the memory
  budget); ``--dry-run`` takes the first candidate a dry run on fake tensors confirms.
* The answer: the candidates' table and the launch line (:mod:`.launch`).
"""

from __future__ import annotations

import argparse

from chunkflow.plan.cost import get_gpu
from chunkflow.plan.units import format_size, parse_size
from chunkflow.plan.zero_bubble import SCHEDULES
from chunkflow.sim.tune import autotune, format_candidates
from chunkflow.train.arguments import config_from_args
from chunkflow.train.auto.launch import fsdp_runs, launch_command, run_options
from chunkflow.train.build import configured_shape, model_label
from chunkflow.train.data.batching import first_batches


def plan_auto(args: argparse.Namespace, unknown: list[str]) -> int:
    """``plan --auto``: (chunk_size, K) and layout with the fastest predicted iteration.

    The model: ``--model NAME`` (the paper's shapes and chunkflow's presets), or the run's own
    ``--model.path`` / ``--model.preset``. The batches: ``--global-batch`` long-tailed lengths
    up to ``--max-len``, or, when the run's data is given (``--data.path`` or ``--config``), its
    first ``--batches`` global batches as the run will form them."""
    cfg = config_from_args(args, unknown)  # the run's options (same as chunkflow train)
    args.batches = 3 if args.batches is None else args.batches
    given = {name for name in vars(args) if "." in name}
    own_model = args.config is not None or given & {"model.path", "model.preset"}
    if own_model and args.model is not None:
        raise ValueError(f"--model {args.model} and the run's model ("
                         f"{cfg.model.path or cfg.model.preset}) both given; valid: one of them")
    devices = _target_gpus(args)
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
        _, first = first_batches(cfg, args.batches, vocab_size=shape.vocab_size)
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
    # chunkflow's pipeline schedules; a zero-bubble one does not run with activation
    # checkpointing
    options["schedules"] = (("1f1b",) if own_model and cfg.chunking.activation_checkpointing
                            else SCHEDULES)
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
        best = first_that_fits(run_cfg, candidates[:args.top], batch, args.gpu, args.gpus,
                               fsdp=fsdp)
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
