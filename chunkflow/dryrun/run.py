"""One rank's real training step on fake tensors, at real scale.

:func:`run_role` builds what ``chunkflow train`` builds (the model from its config, with no
weights read; ``parallelize``: TP, the pipeline stage, FSDP2/DDP under a fake process group of
the layout's world size; the engine; AdamW with its state) and runs one global batch through
the engine's forward and backward, the gradient clipping and the optimizer step, inside
:class:`~chunkflow.dryrun.tracker.StepTracker`. It runs what CUDA would run: the varlen
attention kernel (its fake implementation), bf16 autocast where the run would use it, the same
loss. The device it runs on is a fake CPU (this CPU build of torch cannot index fake CUDA
tensors, and FSDP2 asks the CUDA runtime for streams); the accounting does not depend on it.

Which ranks to run, and how their steps make the layout's figures:
:mod:`chunkflow.dryrun.layout`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from chunkflow.parallel.fake import (ddp_without_verification, fake_mode, fake_process_group,
                                    real_device_meshes)
from chunkflow.dryrun.tracker import CATEGORIES, CountingKernel, OpCost, StepTracker
from chunkflow.plan.gpus import GPUSpec
from chunkflow.train.build import build_meta_model

_DEVICE = torch.device("cpu")


@dataclass
class RoleResult:
    """One rank role's step."""

    name: str
    rank: int
    peak_device_bytes: int
    breakdown: dict
    host_pinned_bytes: int
    cost: OpCost
    host_copy_bytes: int
    action_s: dict = field(default_factory=dict)
    """(action kind, chunk id) -> roofline seconds, for the pipeline simulation."""
    wall_s: float = 0.0
    most: dict = field(default_factory=dict)
    """category -> the most it held at any time of the step."""
    step_memory_peak_bytes: int = 0
    """The most activations + KV state held at once (what the trainer's
    ``peak_memory_bytes`` measures on CPU)."""
    host_requested_bytes: int = 0
    """``host_pinned_bytes`` before the pinned allocator rounds each piece up."""
    host_calls: list = field(default_factory=list)
    """The bytes of each host buffer an offloaded state asked for, per allocation call."""
    layers_run: tuple = ()
    """Decoder layers per stage of the steps this one is extrapolated from; () if run as is."""
    chunks_run: tuple = ()
    """Chunks of the long chains of the steps this one is extrapolated from; () if as is."""


# ---- the model, with no weights ----------------------------------------------------------------

def materialize(model: nn.Module, device: torch.device) -> nn.Module:
    """``model``'s meta parameters and buffers as (fake) tensors on ``device``, ties kept."""
    made: dict[int, torch.Tensor] = {}

    def make(t: torch.Tensor, param: bool) -> torch.Tensor:
        if id(t) not in made:
            new = torch.empty_like(t, device=device)
            made[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if param else new
        return made[id(t)]

    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = make(p, True)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = make(b, False)
    return model.train()


def num_layers(cfg) -> int:
    return build_meta_model(cfg).config.num_hidden_layers


def uniform_layers(cfg) -> bool:
    """Whether every decoder layer is alike (one attention kind), so that a step's per-layer
    bytes and FLOPs are the same for each."""
    config = build_meta_model(cfg).config
    kinds = set(getattr(config, "layer_types", None) or ())
    return len(kinds) <= 1 and not getattr(config, "use_sliding_window", False)


# ---- what the step runs -------------------------------------------------------------------------

def target(cfg) -> str:
    """The device type the dry run predicts: CUDA, unless ``--train.device=cpu``."""
    return "cpu" if cfg.train.device == "cpu" else "cuda"


def uses_autocast(cfg) -> bool:
    """Whether ``chunkflow train`` on the target device runs this config under bf16 autocast
    (``--train.autocast=auto``: on CUDA)."""
    return cfg.param_dtype() != "float64" and (
        cfg.train.autocast == "bf16" or (cfg.train.autocast == "auto" and target(cfg) == "cuda"))


def target_kernel(cfg, model_config):
    """The attention kernel ``--chunking.attention_backend`` picks for this run on the target
    device (on CUDA, ``auto`` is ``varlen`` where it applies: its self-check is assumed to
    pass, as it does where the kernel is correct)."""
    from chunkflow.runtime.attention.select import _FLASH_MAX_HEAD_DIM, get_kernel, model_heads
    from chunkflow.runtime.attention.tiled import TiledMathKernel
    from chunkflow.runtime.attention.varlen import VarlenKernel, torch_varlen_ops

    name = cfg.chunking.attention_backend
    if target(cfg) == "cpu":
        return get_kernel(name, _DEVICE, getattr(torch, cfg.param_dtype()),
                          heads=model_heads(model_config))
    sixteen = uses_autocast(cfg) or cfg.param_dtype() == "bfloat16"
    heads = model_heads(model_config)
    fits = heads is None or (heads[2] % 8 == 0 and heads[2] <= _FLASH_MAX_HEAD_DIM)
    ops = torch_varlen_ops()
    if name == "varlen" or (name == "auto" and sixteen and fits and not isinstance(ops, str)):
        if isinstance(ops, str):
            raise ValueError(f"--chunking.attention_backend=varlen: {ops}")
        return VarlenKernel(ops)
    if name in ("cpu-flash", "sdpa"):
        raise ValueError(f"--chunking.attention_backend={name} runs on CPU only; a dry run "
                         f"predicts a GPU; valid: auto, varlen, math")
    return TiledMathKernel()


def batch_inputs(lengths: list[int]) -> list[dict]:
    """A batch of these lengths (token 0 everywhere: a dry run sees shapes, not tokens)."""
    return [{"input_ids": torch.zeros(n, dtype=torch.long),
             "labels": torch.zeros(n, dtype=torch.long)} for n in lengths]


def _process_group(layout, rank: int):
    if layout.world_size == 1:
        return contextlib.nullcontext()
    return fake_process_group(rank=rank, world_size=layout.world_size)


def _fake_world(ctx):
    """``ctx`` whose reductions of Python values (the engine's loss sums, its checks that every
    rank agrees) treat every rank as this one: a fake process group carries no data, and a
    tensor built under the fake mode has none to read."""
    from chunkflow.parallel.mesh import ParallelContext

    class FakeWorldContext(ParallelContext):
        def all_sum(self, values):
            return [float(v) for v in values]

        def all_max(self, value):
            return value

        def broadcast_object(self, obj=None):
            return obj

        def all_gather_object(self, obj):
            return [obj] * self.layout.world_size

    return FakeWorldContext(ctx.layout, ctx.mesh, ctx.device)


def run_role(cfg, batch: list[dict], gpu: GPUSpec, *, layout, rank: int, name: str,
             layers: int | None = None) -> RoleResult:
    """One rank's step of ``cfg`` on ``batch`` (a global batch), tracked; with ``layers``
    decoder layers in the whole model instead of its own, when given."""
    from chunkflow.parallel import LocalContext, init_distributed

    t0 = time.perf_counter()
    tracker = StepTracker(peak_flops=gpu.peak_bf16_flops, memory_bytes_per_s=gpu.memory_bytes_per_s)
    model = build_meta_model(cfg, layers)
    with _process_group(layout, rank):
        # the mesh outside the fake mode: building it reads real rank tensors
        ctx = (LocalContext(_DEVICE) if layout.world_size == 1 else
               _fake_world(init_distributed(pp=layout.pp, tp=layout.tp, dp=layout.dp,
                                            device=_DEVICE)))
        result = _in_thread(_tracked_step, cfg, batch, model, ctx, tracker)
    return RoleResult(name=name, rank=rank, peak_device_bytes=tracker.peak,
                      breakdown={c: tracker.peak_breakdown[c] for c in CATEGORIES},
                      host_pinned_bytes=tracker.host_peak, cost=tracker.cost,
                      host_copy_bytes=tracker.host_copy_bytes, action_s=result,
                      wall_s=time.perf_counter() - t0, most=dict(tracker.most),
                      step_memory_peak_bytes=tracker.step_peak,
                      host_requested_bytes=tracker.host_requested_peak,
                      host_calls=tracker.host_calls)


def _in_thread(fn, *args):
    """``fn(*args)`` in a new thread. DTensor caches its sharding plans per thread, keyed by
    meshes that compare equal across process groups (and by thread): a role run in the thread
    of an earlier role would reuse that role's meshes, whose groups are gone."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # re-raised in the caller
            out["error"] = e

    thread = threading.Thread(target=run, name="chunkflow-dry-run")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _tracked_step(cfg, batch, model, ctx, tracker) -> dict:
    with fake_mode(), tracker, tracker.resizes(), ddp_without_verification(), \
            real_device_meshes(), _recording_host_buffers(tracker):
        return _step(cfg, batch, model, ctx, tracker)


@contextlib.contextmanager
def _recording_host_buffers(tracker):
    """Record the bytes of each host buffer an offloaded state asks for, per call (the pieces
    they are laid out in are what the tracker sees)."""
    from chunkflow.runtime import kv_state

    original = kv_state.host_buffers

    def host_buffers(copier, specs):
        tracker.host_calls.append([dtype.itemsize * math.prod(shape) for _, shape, dtype in specs])
        return original(copier, specs)

    tracker.host_calls = []
    kv_state.host_buffers = host_buffers
    try:
        yield
    finally:
        kv_state.host_buffers = original


def _instrument(engine, model: nn.Module, tracker: StepTracker) -> None:
    """Point a ChunkFlowEngine's memory meter and offload copier at ``tracker``; count
    ``model``'s parameters and buffers as weights and its gradients as they appear."""
    engine.meter = tracker.meter()
    copier = engine.copier(_DEVICE)
    copier.host_empty = tracker.host_allocator(copier.host_empty)
    tracker.tag_module(model)
    tracker.watch_parameters(model)


def _step(cfg, batch, model, ctx, tracker) -> dict:
    """One step under the fake mode and the tracker; (action kind, chunk id) -> roofline s."""
    from chunkflow.parallel.engine import ParallelEngine

    action_s: dict = {}
    with tracker.phase("weights"):
        model = materialize(model, _DEVICE)
    options = cfg.chunking.options()
    kernel = CountingKernel(target_kernel(cfg, model.config), tracker)
    options = dataclasses.replace(options, attention_backend=kernel)
    par = cfg.parallel
    with tracker.phase("communication"):
        engine = ParallelEngine(model, ctx, options, data_parallel=par.data_parallel,
                                sequence_parallel=par.sequence_parallel,
                                vocab_parallel=par.vocab_parallel,
                                mixed_precision=uses_autocast(cfg), schedule=par.schedule)
    inner = engine.engine
    _instrument(inner, engine.model, tracker)
    params = engine.parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    with tracker.phase("optimizer"):  # the state a second step starts with
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tracker.tag_optimizer(optimizer)
    tracker.start_step()

    started: dict = {}

    def on_action(action, phase):
        key = (action.kind.name, action.chunk_id)
        if phase == "start":
            tracker.sweep()
            started[key] = tracker.cost.roofline_s
        else:
            action_s[key] = action_s.get(key, 0.0) + tracker.cost.roofline_s - started[key]

    handle = inner.register_action_hook(on_action)
    with torch.autocast(_DEVICE.type, dtype=torch.bfloat16, enabled=uses_autocast(cfg)):
        engine.forward_backward(batch)
    handle.remove()
    tracker.tag_grads(params)
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
    engine.clip_grad_norm(max_norm)
    optimizer.step()
    return action_s


def predict_engine_step(model_config, lengths: list[int], gpu: GPUSpec, *, autocast: bool = True,
                        **options) -> tuple[int, float]:
    """(peak device bytes, roofline seconds) of one ``ChunkFlowEngine(model,
    **options).forward_backward`` of chunkflow's reference model of ``model_config`` (float32
    weights, bf16 autocast when ``autocast``) on a batch of ``lengths``, on CUDA: what ``make
    gpu-check`` measures, predicted on fake tensors. ``options["attention_backend"]``: a name
    (``varlen``, ``math``, ``auto``)."""
    from chunkflow.models import Transformer
    from chunkflow.runtime.engine import ChunkFlowEngine
    from chunkflow.train.config import load_config

    with torch.device("meta"):
        model = Transformer(model_config)
    cfg = load_config(None, {"chunking.attention_backend": options.pop("attention_backend",
                                                                        "auto"),
                             "train.autocast": "bf16" if autocast else "none"})
    tracker = StepTracker(peak_flops=gpu.peak_bf16_flops, memory_bytes_per_s=gpu.memory_bytes_per_s)

    def step():
        with fake_mode(), tracker, _recording_host_buffers(tracker):
            with tracker.phase("weights"):
                fake = materialize(model, _DEVICE)
            kernel = CountingKernel(target_kernel(cfg, fake.config), tracker)
            engine = ChunkFlowEngine(fake, attention_backend=kernel, **options)
            _instrument(engine, fake, tracker)
            tracker.start_step()
            with torch.autocast(_DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
                engine.forward_backward(batch_inputs(lengths))

    _in_thread(step)
    return tracker.peak, tracker.cost.roofline_s
