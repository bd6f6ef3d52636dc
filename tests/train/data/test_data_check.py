"""``chunkflow data check``: every bad record of the data with its file and line (the first N,
then counts by kind), tokens and lengths of the rest; exit 2 when any is bad."""

import json

from chunkflow.cli import main


def test_data_check_lists_every_bad_record_then_counts_the_rest(tmp_path, capsys):
    lines = []
    for i in range(40):
        if i % 8 == 3:
            lines.append("{broken " + str(i))  # malformed JSON: lines 4, 12, 20, 28, 36
        elif i % 8 == 6:
            lines.append(json.dumps({"input_ids": [1, 2, 300 + i]}))  # outside the vocabulary
        else:
            lines.append(json.dumps({"text": "x" * (10 + i)}))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text(json.dumps({"conversations": [{"from": "human", "value": "q"},
                                                      {"from": "gpt", "value": "a"}]}) + "\n")
    assert main(["data", "check", f"--data.path={data}", f"--eval.path={held_out}",
                 "--data.max_length=40", "--show=3"]) == 2
    out = capsys.readouterr().out
    assert "40 records, 10 bad" in out
    assert "usable: 30 (30 text); " in out
    # text records: 10 + i bytes (the byte tokenizer has no EOS), all but the first predicted
    usable = [10 + i for i in range(40) if i % 8 not in (3, 6)]
    supervised = sum(usable) - len(usable)
    assert (f"{sum(usable):,} tokens, {supervised:,} supervised "
            f"({supervised / sum(usable):.1%})") in out
    assert f"min {min(usable)}, " in out and f"max {max(usable)};" in out
    assert f"--data.max_length=40: {sum(n > 40 for n in usable)} record(s) would be truncated" \
        in out
    assert f"{data}:4: malformed JSON" in out and f"{data}:7: token id 306 at position 2" in out
    assert f"{data}:12: malformed JSON" in out and f"{data}:15:" not in out  # only 3 shown
    assert ("... and 7 more bad record(s): 4 token id N at position N of … is outside the "
            "vocabulary [N, N); 3 malformed JSON") in out
    assert "--eval.path" in out and "1 records, 0 bad" in out and "usable: 1 (1 chat)" in out
    assert "10 bad record(s): fix them, or train with --data.skip_invalid=true" in out

    good = tmp_path / "good.jsonl"
    good.write_text("".join(line + "\n" for line in lines if "broken" not in line
                            and "input_ids" not in line))
    assert main(["data", "check", f"--data.path={good}"]) == 0
    assert "every record is usable" in capsys.readouterr().out
    assert main(["data", "check"]) == 2  # no files: nothing to check
    assert "chunkflow data check reads --data.path" in capsys.readouterr().err
