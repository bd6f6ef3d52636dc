"""A failing or stuck rank becomes an error on every rank, not a hang."""

import time

import pytest

from tests.parallel.workers import fail_a_checkpoint_write, fail_one_rank, spawn, start


@pytest.mark.parametrize("dp,pp,how,timeout_s", [
    (1, 2, "raise", 60.0),   # a pipeline peer dies: its partner's receive fails at once
    (2, 1, "raise", 60.0),   # a replica dies: the gradient all-reduce fails at once
    (1, 2, "hang", 5.0),     # a silent peer: the process group's timeout turns it into an error
])
def test_a_failing_rank_stops_every_rank(tmp_path, dp, pp, how, timeout_s):
    procs = start(fail_one_rank, 2, dp, pp, how, timeout_s=timeout_s, error_dir=tmp_path)
    t0 = time.monotonic()
    try:
        procs[0].join(timeout=90)
        waited = time.monotonic() - t0
        assert procs[0].exitcode is not None, "rank 0 hangs"
        assert procs[0].exitcode != 0
        error = (tmp_path / "rank0.txt").read_text()
        assert error, "rank 0 ended without an error"
        if how == "raise":
            procs[1].join(timeout=30)
            assert "injected failure" in (tmp_path / "rank1.txt").read_text()
        else:
            assert "timed out" in error.lower() or "timeout" in error.lower(), error
        assert waited < 60, waited
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()


def test_a_failed_checkpoint_write_on_one_rank_is_raised_on_every_rank(tmp_path):
    spawn(fail_a_checkpoint_write, 2, str(tmp_path))
