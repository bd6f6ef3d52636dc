"""The private torch APIs a dry run uses: present, and named when a release moves one."""

import pytest

from chunkflow.parallel import fake


def test_this_torch_has_every_internal_the_dry_run_uses():
    assert fake.missing_internals() == []


def test_a_moved_internal_is_named(monkeypatch):
    class Empty:
        pass

    monkeypatch.setattr(fake, "_fake_tensor_module", lambda: Empty)
    assert "torch._subclasses.fake_tensor.FakeTensorMode" in fake.missing_internals()
    with pytest.raises(RuntimeError, match="has no torch._subclasses.fake_tensor.FakeTensorMode"):
        fake.fake_mode()


def test_a_moved_ddp_check_is_named(monkeypatch):
    import torch.nn.parallel.distributed as ddp

    monkeypatch.delattr(ddp, "_verify_param_shape_across_processes")
    assert any("_verify_param_shape_across_processes" in m for m in fake.missing_internals())
    with pytest.raises(RuntimeError, match="_verify_param_shape_across_processes"):
        with fake.ddp_without_verification():
            pass
