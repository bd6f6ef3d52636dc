"""A run directory on a shared cluster: one run at a time (a lock), ``--resume=auto`` for
requeued jobs, a clear error for a directory that cannot be written, and a bad record met
mid-stream that keeps the steps taken before it."""

import os
import signal
import socket
import subprocess
import sys

from chunkflow.cli import main
from chunkflow.train.run.lock import LOCK_NAME
from tests.train.run.test_trainer import (
    _wait_for,
    args,
    assert_bitwise_equal,
    metrics,
    weights,
    write_jsonl,
)


def test_a_second_run_on_a_directory_in_use_is_refused_and_a_dead_runs_lock_taken_over(
        tmp_path, capsys):
    run = tmp_path / "run"
    steps = {"train.steps": "400", "checkpoint.interval": "1000"}
    proc = subprocess.Popen([sys.executable, "-m", "chunkflow", "train", *args(run, **steps)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run / "metrics.jsonl", proc)
        # a requeued copy of the job, and a fresh start on the same directory: both refused,
        # neither touches the running one's files
        partial = run / ".step-00000009.tmp-running"  # what the running one may be writing
        partial.mkdir()
        for extra in (["--resume=auto"], []):
            assert main(["train", *args(run, **steps), *extra]) == 2
            err = capsys.readouterr().err
            assert (f"is in use by a run (process {proc.pid} on {socket.gethostname()}, "
                    f"{LOCK_NAME})") in err
            assert err.count("\n") == 1  # one line
        assert partial.is_dir() and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    # killed without releasing the lock: the next run takes it over, saying whose it was
    assert main(["train", *args(run, **{"train.steps": "2"}), "--resume=auto"]) == 0
    out = capsys.readouterr().out
    assert (f"warning: taking over the lock {run / LOCK_NAME} of process {proc.pid} on "
            f"{socket.gethostname()}, which ended without releasing it") in out
    assert "--resume=auto: starting (no checkpoint in" in out
    assert (run / LOCK_NAME).read_text() == ""  # released at the end: no stale holder


def test_resume_auto_starts_then_resumes_with_one_command(tmp_path, capsys):
    """A requeue script runs the same command every time: the first start trains from step 0,
    a later one continues the newest checkpoint, ending where an uninterrupted run ends."""
    # a constant learning rate after warmup: 3 steps of a 3-step run are those of a 6-step one
    steps = {"train.steps": "6", "checkpoint.interval": "2", "optim.min_lr_ratio": "1.0"}
    assert main(["train", *args(tmp_path / "full", **steps)]) == 0
    run = tmp_path / "run"
    assert main(["train", *args(run, **{**steps, "train.steps": "3"}), "--resume=auto"]) == 0
    assert "--resume=auto: starting (no checkpoint in" in capsys.readouterr().out
    assert main(["train", *args(run, **steps), "--resume=auto"]) == 0
    out = capsys.readouterr().out
    assert f"--resume=auto: resuming (step-00000003 is the newest checkpoint in {run})" in out
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert_bitwise_equal(weights(run / "step-00000006"),
                         weights(tmp_path / "full" / "step-00000006"))
    # the same from a config file's [checkpoint] resume = "auto"
    assert main(["train", *args(run, **{**steps, "checkpoint.resume": "auto"})]) == 0
    assert "nothing to do: the checkpoint is at step 6" in capsys.readouterr().out
    assert main(["train", *args(run, **steps), "--resume=maybe"]) == 2
    assert ("--checkpoint.resume='maybe': valid values are true, false, 'auto'"
            in capsys.readouterr().err)


def test_an_output_directory_that_cannot_be_written_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for bad in (blocker / "run", "/proc/chunkflow-run"):
        assert main(["train", *args(bad, **{"train.steps": "1"})]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"chunkflow: error: --train.output_dir='{bad}': cannot create "
                              f"it (") and err.count("\n") == 1, err
        assert "a directory this user can write" in err
    if os.geteuid() != 0:  # root writes into read-only directories
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert main(["train", *args(ro, **{"train.steps": "1"})]) == 2
        assert "cannot create .chunkflow.lock there" in capsys.readouterr().err


def test_a_bad_record_mid_stream_saves_the_steps_before_it(tmp_path, capsys):
    """10 records per step without a checkpoint: the malformed line 45 stops the 5th step;
    the 4 steps before it are saved, and a resume that skips it goes on from step 4."""
    data = write_jsonl(tmp_path / "data.jsonl", 60, bad_line=44)
    options = {"data.path": str(data), "data.batch_size": "10", "data.shuffle_buffer": "0",
               "train.steps": "6", "checkpoint.interval": "100"}
    run = tmp_path / "run"
    assert main(["train", *args(run, **options)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:45" in err
    assert f"(the 4 steps since the last checkpoint are saved in {run / 'step-00000004'}" in err
    assert f"continue with: chunkflow train --train.output_dir {run} --resume)" in err
    assert sorted(p.name for p in run.glob("step-*")) == ["step-00000004"]
    assert main(["train", *args(run, **options), "--resume",
                 "--data.skip_invalid=true"]) == 0
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert metrics(run)[-1]["skipped"] == 1


def test_without_flock_the_lock_files_holder_decides(tmp_path, monkeypatch):
    """Some network file systems have no flock: a live process on this host, or one on
    another host (which cannot be checked from here), holds the directory; a dead one not."""
    import errno
    import fcntl

    import pytest

    from chunkflow.train.run.lock import RunDirLocked, RunLock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock_file = tmp_path / LOCK_NAME
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    for holder, refused in ((f"{host} {os.getppid()}", True), (f"other-node {os.getpid()}", True),
                            (f"{host} {dead}", False), ("", False)):
        lock_file.write_text(holder)
        if refused:
            with pytest.raises(RunDirLocked, match=f"process {holder.split()[1]} on "
                                                   f"{holder.split()[0]}"):
                RunLock(tmp_path).acquire()
            assert lock_file.read_text() == holder
            continue
        lock = RunLock(tmp_path).acquire()
        assert (lock.warning is not None) == bool(holder)
        assert lock_file.read_text() == f"{host} {os.getpid()}"
        lock.release()
        assert lock_file.read_text() == ""


def test_the_full_disk_advice_suggests_fewer_kept_checkpoints_only_where_it_helps(tmp_path):
    from chunkflow.train.checkpoint.store import space_error

    (tmp_path / "step-00000001").mkdir()
    alone = str(space_error(tmp_path, 2, 10**15, keep_last=3))
    assert "step-00000001, is intact" in alone and "keep_last" not in alone  # nothing to drop
    (tmp_path / "step-00000002").mkdir()
    assert "keep_last" not in str(space_error(tmp_path, 3, 10**15, keep_last=1))
    assert ("(or raise --checkpoint.interval, lower --checkpoint.keep_last)"
            in str(space_error(tmp_path, 3, 10**15, keep_last=2)))


def test_data_smaller_than_a_batch_is_warned_about_once(tmp_path, capsys):
    data = write_jsonl(tmp_path / "tiny.jsonl", 3)
    assert main(["train", *args(tmp_path / "run", **{"data.path": str(data),
                                                      "data.batch_size": "8",
                                                      "train.steps": "3"})]) == 0
    out = capsys.readouterr().out
    assert out.count("warning: the data holds 3 usable record(s), fewer than one global batch "
                     "takes (--data.batch_size=8): every batch repeats records") == 1
    assert "complete (" not in out  # no epoch line per step
