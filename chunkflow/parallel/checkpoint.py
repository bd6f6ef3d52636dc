"""The torch.distributed half of a checkpoint: one rank's stage, as state dicts keyed by the
whole model's parameter names (those one process uses), whatever wraps the stage (nothing,
DDP, FSDP2, tensor-parallel DTensors). So a checkpoint never depends on the layout that wrote it.

* :func:`full_weights` / :func:`read_weights` + :func:`load_weights`: the weights as *full*
  tensors (collective over the tensor-parallel and FSDP groups), each stage's a shard of one
  Hugging Face checkpoint, read back by name into whatever stage, shard or replica holds them;
* :func:`save_optimizer` / :func:`load_optimizer`: the optimizer state *sharded* with
  ``torch.distributed.checkpoint``: every rank writes its own shards (one copy of what is
  replicated) and ``dcp.load`` reshards them; flattened per parameter name
  (``flatten_optimizer_state_dict``, as torchtitan does), so pipeline stages never collide;
* :func:`save_master_weights` / :func:`load_master_weights`: float32 master weights of a
  bfloat16 model (``master_weights/``), sharded like the optimizer state, loaded bit for bit.

The trainer's side (which files, the manifest, resuming) is :mod:`chunkflow.train.checkpoint`.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

OPTIMIZER_DIR = "optimizer"
"""The optimizer's ``torch.distributed.checkpoint`` directory inside a checkpoint."""
MASTER_DIR = "master_weights"
"""The master weights' ``torch.distributed.checkpoint`` directory (when the saved weights are in
a narrower dtype than the trained ones)."""

_TIED = ("model.embed_tokens.weight", "lm_head.weight")
_FULL = StateDictOptions(full_state_dict=True)
_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)


def full_weights(module: torch.nn.Module, *, tied: bool) -> dict[str, torch.Tensor]:
    """This rank's stage's weights as full CPU tensors by parameter name (collective over the
    stage's tensor-parallel and FSDP groups). ``tied``: the output head is the embedding, stored
    once, as Hugging Face does."""
    state = {k: v.detach().cpu().contiguous()
             for k, v in get_model_state_dict(module, options=_FULL).items()}
    if tied:
        state.pop("lm_head.weight", None)
    return state


def _local_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The stage's state by whole-model name, as this rank holds it (DTensor shards: no
    gathering; their ``shape`` is the full one)."""
    return get_model_state_dict(module)


def weight_names(module: torch.nn.Module) -> list[str]:
    """The parameter names this rank's stage holds (what :func:`load_weights` needs)."""
    return sorted(_local_state(module))


def read_weights(path: Path, names: list[str], *, tied: bool) -> dict[str, torch.Tensor]:
    """``names`` from checkpoint ``path``'s ``model.safetensors`` or its sharded index, whatever
    layout wrote them. A name the checkpoint lacks is an error that names it."""
    from safetensors import safe_open

    from chunkflow.models.hf_checkpoint import weight_files

    weight_map = {}
    for file in weight_files(path):  # headers only: which file holds which tensor
        with safe_open(str(file), framework="pt") as f:
            weight_map.update(dict.fromkeys(f.keys(), file.name))
    wanted = dict(zip(names, names))
    if tied:  # one tensor under either name (safetensors' save_model keeps the first in order)
        present = [n for n in _TIED if n in weight_map]
        wanted.update({n: present[0] for n in _TIED if n in wanted and present})
    missing = sorted(n for n, source in wanted.items() if source not in weight_map)
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} does not match the model: it lacks "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    out: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for name, source in wanted.items():
        by_file.setdefault(weight_map[source], []).append(name)
    for file, file_names in sorted(by_file.items()):
        with safe_open(str(path / file), framework="pt") as f:
            for name in file_names:
                out[name] = f.get_tensor(wanted[name])
    return out


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Full tensors by name into this rank's stage (each parameter takes its shard)."""
    expected = set(_local_state(module))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not match this stage's model: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    shapes = _local_state(module)
    wrong = [f"{n}: {tuple(state[n].shape)} in the checkpoint, {tuple(t.shape)} in the model"
             for n, t in shapes.items() if tuple(state[n].shape) != tuple(t.shape)]
    if wrong:
        raise ValueError(f"the checkpoint does not match the model: {'; '.join(wrong[:3])}")
    set_model_state_dict(module, state, options=_FULL)


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _one_process_quietly():
    """dcp warns on every call without a process group, which is how one process runs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_optimizer(module: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path,
                   *, rank: int) -> list[str]:
    """Collective over every rank: the optimizer state into ``directory`` with
    ``torch.distributed.checkpoint``. Returns the files this rank wrote, relative to the
    directory's parent (the checkpoint), for its manifest."""
    return _dcp_save(get_optimizer_state_dict(module, optimizer, options=_OPTIM), directory,
                     rank=rank)


def save_master_weights(module: torch.nn.Module, directory: Path, *, rank: int) -> list[str]:
    """Collective: this rank's shards of the weights as they are held (float32 master
    weights), with ``torch.distributed.checkpoint``; returns the files, as
    :func:`save_optimizer` does."""
    return _dcp_save(_local_state(module), directory, rank=rank)


def load_master_weights(module: torch.nn.Module, directory: Path) -> None:
    """Collective: the weights :func:`save_master_weights` wrote, on any layout, bit for bit."""
    check_metadata(directory)
    state = _local_state(module)
    _dcp_load(state, directory, "the master weights do not match this model")
    set_model_state_dict(module, state)


def _dcp_save(state: dict, directory: Path, *, rank: int) -> list[str]:
    try:
        with _one_process_quietly():
            dcp.save(state, checkpoint_id=str(directory), no_dist=_no_dist())
    except CheckpointException as e:  # a BaseException: the caller's handlers would miss it
        raise _first_failure(e) from None
    mine = sorted(directory.glob(f"__{rank}_*"))
    if rank == 0:
        mine.append(directory / ".metadata")
    return [p.relative_to(directory.parent).as_posix() for p in mine]


def _dcp_load(state: dict, directory: Path, mismatch: str) -> None:
    """``dcp.load`` into ``state``; any failure is one ValueError: ``directory: mismatch (the
    first rank's error)``."""
    try:
        with _one_process_quietly():
            dcp.load(state, checkpoint_id=str(directory), no_dist=_no_dist())
    except (Exception, CheckpointException) as e:
        e = _first_failure(e) if isinstance(e, CheckpointException) else e
        raise ValueError(f"{directory}: {mismatch} ({type(e).__name__}: {_first_line(e)})"
                         ) from None


def load_optimizer(module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   directory: Path) -> None:
    """Collective: the state :func:`save_optimizer` wrote, on any layout, into ``optimizer``
    (built over this rank's parameters, still without state)."""
    # The template holds this layout's shards; get_optimizer_state_dict gives a stateless
    # optimizer its (zero) state first, so every entry exists for dcp.load to fill. It skips
    # that when any parameter holds a gradient, leaving nothing to load: set them aside.
    check_metadata(directory)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        state = get_optimizer_state_dict(module, optimizer, options=_OPTIM)
    finally:
        for p, g in zip(params, grads):
            p.grad = g
    assert len(optimizer.state) == len(params), "the optimizer state was not initialised"
    _dcp_load(state, directory, "the optimizer state does not match this model and optimizer")
    set_optimizer_state_dict(module, optimizer, state, options=_OPTIM)


# What torch.distributed.checkpoint's ``.metadata`` pickle may build: its plain records, dtypes,
# sizes and paths. dcp reads the file with pickle.load, which can run any code a file names, so a
# checkpoint is checked against this list first (the weights and tensors load weights_only).
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = name in _METADATA_CLASSES.get(module, ()) or module == "torch" and (
            name == "Size" or isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a checkpoint's "
                                         f"metadata never holds")
        return super().find_class(module, name)


def check_metadata(directory: Path) -> None:
    """Refuse a ``torch.distributed.checkpoint`` directory whose ``.metadata`` would build
    anything but checkpoint records (pickle runs what a file names)."""
    file = directory / ".metadata"
    try:
        with open(file, "rb") as f:
            _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise ValueError(f"{directory} is not a torch.distributed.checkpoint directory (no "
                         f".metadata)") from None
    except Exception as e:
        raise ValueError(f"{file}: refused ({type(e).__name__}: {e}); valid: the metadata "
                         f"torch.distributed.checkpoint writes") from None


def load_full_optimizer(module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict) -> None:
    """A stage's optimizer state as full tensors by name (checkpoints from before
    ``optimizer/``), on the layout that saved it."""
    set_optimizer_state_dict(module, optimizer, state, options=_FULL)


def _first_failure(e: CheckpointException) -> Exception:
    """The lowest rank's exception of a CheckpointException (which holds every failed rank's
    exception and traceback), so OSErrors such as a full disk keep their errno."""
    failures = getattr(e, "failures", None) or {}
    for rank in sorted(failures):
        failure = failures[rank]
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, Exception):
            return exc
    return RuntimeError(str(e))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def gather_stages(obj, ctx):
    """``obj`` of every pipeline stage of this replica, by stage, on its first stage (None on
    the others). Called by every stage of the replica (collective over its "pp" group)."""
    if not ctx.pp_enabled:
        return [obj]
    out = [None] * ctx.pp if ctx.stage == 0 else None
    dist.gather_object(obj, out, dst=dist.get_global_rank(ctx.pp_group, 0), group=ctx.pp_group)
    return out
