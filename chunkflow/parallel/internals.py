"""The private torch internals data parallelism still needs, each behind one function.

A chunked step runs many backwards per optimizer step, and DDP and FSDP2 must communicate once,
after the last of them (:mod:`chunkflow.parallel.data_parallel`). Their public APIs assume the
one-forward-one-backward shape, so two hooks into their internals remain:

* DDP: ``DistributedDataParallel.reducer.prepare_for_backward`` arms the reducer for one
  backward without a DDP forward (``torch.distributed.pipelining`` does the same for its last
  micro-batch);
* FSDP2: the post-backward of every parameter group (``FSDPState._fsdp_param_groups``, a single
  ``_fsdp_param_group`` before torch 2.12) and the root's
  ``_root_post_backward_final_callback``, which reduce-scatter the accumulated gradients and
  reshard, as FSDP2 itself does at the end of a backward.

Why the chunk does not simply run through the wrappers' ``__call__``: DDP's forward arms its
reducer for the next backward and FSDP2's root forward queues its post-backward, so either would
communicate after every chunk's backward, a different number of times on each replica. The
engine enters the FSDP2 root through a forward method registered with the public
``register_fsdp_forward_method`` (which one, the model's adapter says:
:meth:`chunkflow.models.adapter.ModelAdapter.fsdp_root_forward`), and DDP's forward not at all.

:func:`missing_internals` lists what the installed torch lacks; ``tests/parallel/test_internals.py``
fails, naming it, on a release that renamed one, and every call here raises the same message
instead of an AttributeError deep inside a step. ``pyproject.toml`` pins the torch range tested.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel


def _fsdp_state_class():
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    return FSDPState


def missing_internals() -> list[str]:
    """The private names this module uses that the installed torch does not have."""
    missing = []
    reducer = getattr(torch._C._distributed_c10d, "Reducer", None)
    if reducer is None or not hasattr(reducer, "prepare_for_backward"):
        missing.append("torch._C._distributed_c10d.Reducer.prepare_for_backward")
    try:
        state_class = _fsdp_state_class()
    except ImportError:
        return missing + ["torch.distributed.fsdp._fully_shard._fsdp_state.FSDPState"]
    if not hasattr(state_class, "_root_post_backward_final_callback"):
        missing.append("FSDPState._root_post_backward_final_callback")
    state = state_class()
    if not hasattr(state, "_state_ctx") or not hasattr(state._state_ctx, "all_states"):
        missing.append("FSDPState._state_ctx.all_states")
    if not (hasattr(state, "_fsdp_param_groups") or hasattr(state, "_fsdp_param_group")):
        missing.append("FSDPState._fsdp_param_groups (or _fsdp_param_group)")
    return missing


def _unsupported(name: str) -> RuntimeError:
    return RuntimeError(f"torch {torch.__version__} has no {name}, a private API chunkflow's "
                        f"data parallelism relies on (a newer release renamed it?); valid: the "
                        f"torch range in chunkflow's pyproject.toml")


def arm_ddp_for_backward(ddp: DistributedDataParallel) -> None:
    """Make the next backward all-reduce what ``.grad`` accumulated, without a DDP forward."""
    prepare = getattr(getattr(ddp, "reducer", None), "prepare_for_backward", None)
    if prepare is None:
        raise _unsupported("DistributedDataParallel.reducer.prepare_for_backward")
    prepare([])


def finish_fsdp_backward(root: nn.Module) -> None:
    """After the step's last backward: every FSDP2 parameter group of ``root``'s tree
    reduce-scatters its accumulated gradient and reshards, then the root's final callback runs
    (what FSDP2 does itself at the end of a backward it drove)."""
    state = fully_shard.state(root)
    ctx = getattr(state, "_state_ctx", None)
    if ctx is None or not hasattr(ctx, "all_states"):
        raise _unsupported("FSDPState._state_ctx.all_states")
    for module_state in ctx.all_states:
        if hasattr(module_state, "_fsdp_param_groups"):
            groups = module_state._fsdp_param_groups
        elif hasattr(module_state, "_fsdp_param_group"):  # torch < 2.12: one group or None
            group = module_state._fsdp_param_group
            groups = [group] if group is not None else []
        else:
            raise _unsupported("FSDPState._fsdp_param_groups")
        for group in groups:
            group.post_backward()
    final = getattr(state, "_root_post_backward_final_callback", None)
    if final is None:
        raise _unsupported("FSDPState._root_post_backward_final_callback")
    final()
