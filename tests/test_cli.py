"""The command line: plan output, a short demo run, and errors for bad input."""

import re

from chunkflow.cli import main


def test_plan_prints_chunks_and_schedule(capsys):
    assert main(["plan", "--lengths", "10,3,25", "--chunk-size", "8", "--k", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 sequences, 38 tokens -> 6 chunks of 8 (lower bound 5), 2 chains" in out
    assert "s0[8:10] s1[0:3]" in out  # the short sequence packed into chain 0's tail
    assert "schedule (k=1): S0 F1 B1 R0 B0 S2 S3 S4 F5 B5 R4 B4 R3 B3 R2 B2" in out


def test_demo_trains(capsys):
    assert main(["demo", "--steps", "3", "--batch-size", "4", "--max-len", "300",
                 "--chunk-size", "64"]) == 0
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)  tokens", out)]
    assert len(losses) == 3 and all(0 < x < 6 for x in losses)
    assert "peak" in out and "tok/s" in out


def test_bad_input_is_a_clear_error(capsys):
    assert main(["plan", "--lengths", "10,0", "--chunk-size", "8"]) == 2
    assert "seq_lens[1] must be a positive integer" in capsys.readouterr().err
    assert main(["plan", "--lengths", "5,x"]) == 2
    assert "--lengths '5,x': expected comma-separated integers" in capsys.readouterr().err
    assert main(["demo", "--steps", "1", "--chunk-size", "0"]) == 2
    assert "chunk_size must be a positive integer, got 0" in capsys.readouterr().err
