"""The private torch internals a dry run needs, each behind one function.

A dry run (:mod:`chunkflow.dryrun`) runs the real training step on tensors that carry shapes,
dtypes and devices but no data, so it needs four things torch only offers privately:

* ``torch._subclasses.fake_tensor.FakeTensorMode``: tensors without data (:func:`fake_mode`);
* the ``fake`` process-group backend of ``torch.testing._internal.distributed.fake_pg``: every
  collective returns at once, so FSDP2, DTensor and TP code runs one rank of any world size in
  one process (:func:`fake_process_group`);
* ``unset_fake_temporarily`` of the same module, to keep device meshes' rank tensors real
  (:func:`real_device_meshes`);
* ``torch.nn.parallel.distributed._verify_param_shape_across_processes``, which DDP's
  constructor calls to compare ranks' parameters by reading them (:func:`ddp_without_verification`
  skips it).

:func:`missing_internals` lists what the installed torch lacks; ``tests/dryrun/test_fake.py``
fails, naming it, on a release that moved one, and every function here raises the same message
instead of an ImportError deep inside a dry run. Neither is on a training step's path.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

_FAKE_TENSOR = "torch._subclasses.fake_tensor.FakeTensorMode"
_FAKE_PG = "torch.testing._internal.distributed.fake_pg.FakeStore"


def _fake_tensor_module():
    from torch._subclasses import fake_tensor

    return fake_tensor


def _fake_pg_module():
    from torch.testing._internal.distributed import fake_pg  # registers the "fake" backend

    return fake_pg


def missing_internals() -> list[str]:
    """The private names this module uses that the installed torch does not have."""
    missing = []
    try:
        module = _fake_tensor_module()
        for name in ("FakeTensorMode", "FakeTensor", "unset_fake_temporarily"):
            if not hasattr(module, name):
                missing.append(f"torch._subclasses.fake_tensor.{name}")
    except ImportError:
        missing.append(_FAKE_TENSOR)
    try:
        if not hasattr(_fake_pg_module(), "FakeStore"):
            missing.append(_FAKE_PG)
    except ImportError:
        missing.append(_FAKE_PG)
    import importlib

    if not hasattr(importlib.import_module(_DDP_MODULE), _DDP_VERIFY):
        missing.append(f"{_DDP_MODULE}.{_DDP_VERIFY}")
    return missing


def _unsupported(name: str) -> RuntimeError:
    return RuntimeError(f"torch {torch.__version__} has no {name}, a private API chunkflow's "
                        f"dry run relies on (a newer release moved it?); valid: the torch range "
                        f"in chunkflow's pyproject.toml")


def fake_mode():
    """A mode in which new tensors have no data; real tensors that meet them become fake."""
    try:
        return _fake_tensor_module().FakeTensorMode(allow_non_fake_inputs=True)
    except (ImportError, AttributeError):
        raise _unsupported(_FAKE_TENSOR) from None


def is_fake(tensor: torch.Tensor) -> bool:
    try:
        return isinstance(tensor, _fake_tensor_module().FakeTensor)
    except (ImportError, AttributeError):
        raise _unsupported(_FAKE_TENSOR) from None


@contextlib.contextmanager
def fake_process_group(*, rank: int, world_size: int):
    """While inside, the default process group: ``world_size`` ranks of which this process is
    ``rank``, whose collectives complete at once without communicating."""
    import torch.distributed as dist

    try:
        store = _fake_pg_module().FakeStore()
    except (ImportError, AttributeError):
        raise _unsupported(_FAKE_PG) from None
    dist.init_process_group("fake", store=store, rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


_DDP_MODULE = "torch.nn.parallel.distributed"
_DDP_VERIFY = "_verify_param_shape_across_processes"


@contextlib.contextmanager
def ddp_without_verification():
    """DDP's constructor checks every rank's parameter shapes by reading the tensors in C++,
    which a fake tensor cannot give; the ranks of a fake world are one process, identical by
    construction, so the check is skipped while inside."""
    import importlib

    module = importlib.import_module(_DDP_MODULE)
    original = getattr(module, _DDP_VERIFY, None)
    if original is None:
        raise _unsupported(f"{_DDP_MODULE}.{_DDP_VERIFY}")
    setattr(module, _DDP_VERIFY, lambda process_group, tensors, logger=None: None)
    try:
        yield
    finally:
        setattr(module, _DDP_VERIFY, original)


@contextlib.contextmanager
def real_device_meshes():
    """A ``DeviceMesh`` keeps its ranks in a tensor and slices, flattens and concatenates it
    (FSDP2 over a tensor-parallel mesh does): under the fake mode those tensors would have no
    data to read. While inside, every method of ``DeviceMesh`` runs with the fake mode set
    aside, on real rank tensors (bookkeeping of a few integers)."""
    from torch.distributed.device_mesh import DeviceMesh

    unset = getattr(_fake_tensor_module(), "unset_fake_temporarily", None)
    if unset is None:
        raise _unsupported("torch._subclasses.fake_tensor.unset_fake_temporarily")

    def real(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with unset():
                return fn(*args, **kwargs)
        return wrapper

    saved = {}
    for name, attr in list(vars(DeviceMesh).items()):
        if isinstance(attr, staticmethod):
            new = staticmethod(real(attr.__func__))
        elif isinstance(attr, property):
            new = property(real(attr.fget), attr.fset, attr.fdel, attr.__doc__)
        elif inspect.isfunction(attr):
            new = real(attr)
        else:
            continue
        saved[name] = attr
        setattr(DeviceMesh, name, new)
    try:
        yield
    finally:
        for name, attr in saved.items():
            setattr(DeviceMesh, name, attr)
