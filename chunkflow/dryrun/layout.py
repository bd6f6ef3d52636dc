"""A dry run of a whole layout: which rank roles to run, how (whole or extrapolated from
shorter steps), the step time of their pipeline, and the first of ``plan --auto``'s candidates
that fits by it.

Rank roles: each pipeline stage of the data-parallel replica with the most work (the cost model's
FLOPs, as :func:`chunkflow.plan.balance_chunks` places units), as tensor-parallel rank 0 (TP
ranks hold equal shards). A long stage and, on one GPU, a long chain are extrapolated from
shorter steps (:mod:`chunkflow.dryrun.fit`), checked, and run whole where the check fails.
"""

from __future__ import annotations

import dataclasses
import time

from chunkflow.dryrun.fit import PROBE_CHUNKS, PROBE_LAYERS, extrapolate, fitted, host_at
from chunkflow.dryrun.run import (RoleResult, batch_inputs, num_layers, run_role,
                                  target, uniform_layers)
from chunkflow.plan.gpus import GPUSpec
from chunkflow.train.build import build_meta_model


def busiest_replica(cfg, lengths: list[int], shape, dp: int) -> int:
    """The data-parallel rank whose units cost the most (as the engine places them)."""
    from chunkflow.plan import balance_chunks, build_chunks

    plan = build_chunks(lengths, chunk_size=cfg.chunking.chunk_size,
                        pack_chain_tails=cfg.chunking.pack_chain_tails)
    costs = balance_chunks(plan, dp, k=cfg.chunking.k, shape=shape).costs
    return max(range(dp), key=lambda r: (costs[r], -r))



def check_layout(cfg, gpus: int):
    """The (dp, pp, tp) layout of ``gpus`` GPUs under ``cfg.parallel``; a ValueError says what
    would divide."""
    from chunkflow.parallel.mesh import Layout
    from chunkflow.plan.chunks import check_positive_int

    gpus = check_positive_int("gpus", gpus)
    pp, tp = cfg.parallel.pp, cfg.parallel.tp
    if gpus % (pp * tp):
        raise ValueError(f"--gpus {gpus} is not a multiple of --parallel.pp={pp} x "
                         f"--parallel.tp={tp} = {pp * tp}; valid: a multiple of {pp * tp}")
    return Layout(dp=gpus // (pp * tp), pp=pp, tp=tp)


def stage_role(cfg, batch, gpu, *, layout, rank: int, name: str, full: bool = False,
               log=None, nonlinear: set | None = None) -> RoleResult:
    """:func:`run_role` of a pipeline stage: its step run as is, or, for a stage of more than
    :data:`PROBE_LAYERS`' layers of alike layers (unless ``full``), extrapolated from steps
    with fewer (:func:`extrapolate`); run as is where that is not linear (and, ``nonlinear``
    holding the rank, from then on: the set remembers)."""
    from chunkflow.parallel.pipeline import stage_layer_ranges

    stage = layout.coords(rank)[1]
    layers = len(stage_layer_ranges(num_layers(cfg), layout.pp)[stage])
    nonlinear = set() if nonlinear is None else nonlinear
    if (not full and rank not in nonlinear and layers > PROBE_LAYERS[-1]
            and uniform_layers(cfg)):
        probes = [run_role(cfg, batch, gpu, layout=layout, rank=rank, name=name,
                           layers=n * layout.pp) for n in PROBE_LAYERS]
        out, why = extrapolate(probes, PROBE_LAYERS, layers)
        if out is not None:
            return fitted(probes, out, layers_run=PROBE_LAYERS)
        nonlinear.add(rank)
        if log:
            log(f"dry run: {name}: the step is not linear in its layers ({why}); running all "
                f"{layers} layers")
    return run_role(cfg, batch, gpu, layout=layout, rank=rank, name=name)


def _long_chains(cfg, lengths: list[int]) -> tuple[int, int] | None:
    """(chunks, length) of the batch's long sequences when all of them are alike and longer
    than :data:`PROBE_CHUNKS`' chains; else None."""
    size = cfg.chunking.chunk_size
    long = {n for n in lengths if -(-n // size) > PROBE_CHUNKS[-1]}
    if len(long) != 1:
        return None
    n, = long
    return -(-n // size), n


def replica_role(cfg, lengths, gpu, *, layout, rank, name, full=False, log=None) -> RoleResult:
    """:func:`stage_role` of this batch; for one replica of one stage whose batch holds long
    chains of one length (the 1M-token case), extrapolated from steps whose long chains are
    :data:`PROBE_CHUNKS` chunks (each cut by whole chunks from its front, so its tail packs as
    before): bytes linear in the chunks, FLOPs, bytes moved and time quadratic."""
    chains = None if full or layout.dp_enabled or layout.pp_enabled else _long_chains(cfg, lengths)
    if chains is not None:
        chunks, length = chains
        size = cfg.chunking.chunk_size
        probes, nonlinear = [], set()
        for m in PROBE_CHUNKS:
            cut = [n - (chunks - m) * size if n == length else n for n in lengths]
            probes.append(stage_role(cfg, batch_inputs(cut), gpu, layout=layout, rank=rank,
                                     name=name, log=log, nonlinear=nonlinear))
        out, why = extrapolate(probes, PROBE_CHUNKS, chunks,
                               quadratic=("cost", "by_op", "host_copy"))
        if out is not None:
            result = fitted(probes, out, chunks_run=PROBE_CHUNKS)
            host = host_at(probes, PROBE_CHUNKS, chunks, pinned=target(cfg) == "cuda")
            if host is not None:
                result.host_pinned_bytes = host
            return result
        if log:
            log(f"dry run: {name}: the step is not polynomial in its chain's chunks ({why}); "
                f"running all {chunks}")
    return stage_role(cfg, batch_inputs(lengths), gpu, layout=layout, rank=rank, name=name,
                      full=full, log=log)


def dry_run(cfg, batches: list[list[int]], gpu: GPUSpec, *, gpus: int = 1, log=None,
            full: bool = False):
    """The dry run of ``cfg`` on each global batch (its sequence lengths) on ``gpus`` of
    ``gpu``: a :class:`~chunkflow.dryrun.report.DryRunReport` of the worst batch per role.
    ``full``: run every decoder layer and chunk (else long stages and long chains are
    extrapolated, see :func:`stage_role` and :func:`replica_role`)."""
    from chunkflow.dryrun.report import DryRunReport
    from chunkflow.models.families import model_shape

    layout = check_layout(cfg, gpus)
    shape = model_shape(build_meta_model(cfg).config)
    roles: dict[int, RoleResult] = {}
    steps = []
    for lengths in batches:
        dp_rank = busiest_replica(cfg, lengths, shape, layout.dp)
        results = []
        for stage in range(layout.pp):
            name = (f"stage {stage}" if layout.pp_enabled else "rank") + \
                   (f" (replica {dp_rank}, tp rank 0)" if layout.world_size > 1 else "")
            result = replica_role(cfg, lengths, gpu, layout=layout,
                                  rank=layout.rank(dp_rank, stage), name=name, full=full,
                                  log=log)
            if log:
                log(f"dry run: {name}: {result.wall_s:.1f}s")
            results.append(result)
            if stage not in roles or result.peak_device_bytes > roles[stage].peak_device_bytes:
                roles[stage] = result
        steps.append(_step_time(cfg, lengths, shape, layout, dp_rank, results))
    step_s, model_flops, executed = max(steps)
    return DryRunReport(cfg=cfg, gpu=gpu, layout=layout, roles=[roles[s] for s in sorted(roles)],
                        target=target(cfg),
                        predicted_step_s=step_s, model_flops=model_flops,
                        flops_per_step=executed, batches=len(batches))


def _step_time(cfg, lengths, shape, layout, dp_rank, results):
    """(roofline seconds of the step, its model FLOPs over all GPUs, the FLOPs it executes over
    all GPUs) for one batch: the busiest replica's time (its pipeline simulated with each
    action's roofline time); model FLOPs: forward + backward of every chunk once (6N per token
    plus causal attention), MFU's numerator."""
    from chunkflow.plan import balance_chunks, build_chunks, subplan
    from chunkflow.plan.zero_bubble import pipeline_schedule
    from chunkflow.plan.cost import chunk_segments, forward_flops
    from chunkflow.sim import simulate

    ch = cfg.chunking
    plan = build_chunks(lengths, chunk_size=ch.chunk_size, pack_chain_tails=ch.pack_chain_tails)
    sharding = balance_chunks(plan, layout.dp, k=ch.k, shape=shape)
    model_flops = 0.0
    for chunk in plan.chunks:
        segments, prefix = chunk_segments(chunk)
        model_flops += 3 * sum(forward_flops(shape, segments, prefix_len=prefix))
    replica = sum(r.cost.flops for r in results) * layout.tp
    mean = sum(sharding.costs) / len(sharding.costs)
    executed = replica * layout.dp * (mean / max(sharding.costs) if max(sharding.costs) else 1)
    if not layout.pp_enabled:
        return results[0].cost.roofline_s, model_flops, executed
    sub, _ = subplan(plan, sharding.chunk_ids[dp_rank])
    stages = pipeline_schedule(sub, layout.pp, k=ch.k, recompute=ch.recompute,
                               schedule=cfg.parallel.schedule)  # the lists the runtime runs
    sim = simulate(stages, duration=lambda s, a: results[s].action_s.get(
        (a.kind.name, a.chunk_id), 0.0))
    # what runs outside the actions (clipping, the optimizer step) after the pipeline drains
    rest = max(r.cost.roofline_s - sum(r.action_s.values()) for r in results)
    return sim.makespan + rest, model_flops, executed


def first_that_fits(cfg, candidates, batch: list[int], gpu: str, gpus: int, *, fsdp: bool):
    """``plan --auto --dry-run``: the first of ``plan --auto``'s candidates whose dry run
    (every rank role) fits, printing each one's (the pick, or the next ones, saying so)."""
    from chunkflow.plan.gpus import get_gpu_spec
    from chunkflow.plan.units import format_size

    spec = get_gpu_spec(gpu)
    for cand in candidates:
        run = dataclasses.replace(
            cfg, chunking=dataclasses.replace(cfg.chunking, chunk_size=cand.chunk_size,
                                              k=cand.k),
            parallel=dataclasses.replace(
                cfg.parallel, tp=cand.tp, pp=cand.pp, schedule=cand.schedule,
                data_parallel="fsdp" if fsdp and cand.schedule == "1f1b" else "ddp"))
        t0 = time.perf_counter()
        report = dry_run(run, [batch], spec, gpus=gpus)
        took = time.perf_counter() - t0
        verdict = "fits" if report.fits else "does NOT fit"
        print(f"dry run of chunk {cand.chunk_size}, K={cand.k}, {cand.layout}: peak "
              f"{format_size(report.peak_device_bytes)} per GPU {verdict} in "
              f"{format_size(spec.usable_bytes)} (predicted {format_size(cand.peak_memory_bytes)})"
              f"; step {report.predicted_step_s:.3g} s at the roofline; the dry run took "
              f"{took:.0f} s")
        if report.fits:
            return cand
        print("  next candidate")
    raise ValueError(f"none of the {len(candidates)} best candidates fits by a dry run on "
                     f"{spec.name}; valid: more GPUs, a larger --top, or a smaller --max-len")
