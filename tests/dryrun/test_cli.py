"""``--lengths`` with LENGTHxCOUNT, and ``plan --auto --dry-run`` confirming its pick."""

import pytest

from chunkflow import cli
from chunkflow.plan.lengths import parse_lengths
from tests.dryrun.helpers import first_dry_run_too_big


def test_lengths_take_counts():
    assert parse_lengths("9000, 300x3,120") == [9000, 300, 300, 300, 120]
    for bad in ("", "12,ax3", "0x2", "5x0", "5x-1", "1e3"):
        with pytest.raises(ValueError, match="LENGTHxCOUNT"):
            parse_lengths(bad)


def test_auto_confirms_its_pick_by_a_dry_run(capsys):
    argv = ["plan", "--auto", "--model=tiny", "--gpus=2", "--max-len=4K", "--global-batch=8",
            "--top=2", "--dry-run"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "dry run of chunk 2048, K=1" in out and "fits in" in out and "took" in out
    assert "next candidate" not in out


def test_auto_takes_the_next_candidate_the_dry_run_fits(monkeypatch, capsys):
    calls = first_dry_run_too_big(monkeypatch)
    argv = ["plan", "--auto", "--model=tiny", "--gpus=2", "--max-len=4K", "--global-batch=8",
            "--top=2", "--dry-run"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert len(calls) == 2 and "does NOT fit" in out and "next candidate" in out
    assert f"--chunking.chunk_size={calls[1]}" in out.splitlines()[-1]
