"""Typed configuration: TOML, overrides, --help, and clear errors for unknown or bad values."""

import dataclasses

import pytest

from chunkflow.cli import main
from chunkflow.train.config import FIELDS, TrainConfig, load_config, read_toml


def test_precedence_defaults_then_file_then_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "run.toml"
    path.write_text('[chunking]\nchunk_size = 1024\nk = 2\n[data]\nmax_length = 9000\n'
                    'path = "a.jsonl,b/*.parquet"\n')
    cfg = load_config(path, {"chunking.k": "3", "data.skip_invalid": "true",
                             "data.max_length": "none", "optim.lr": "1e-4"})
    assert cfg.chunking.chunk_size == 1024  # from the file
    assert cfg.chunking.k == 3  # the command line wins
    assert cfg.data.skip_invalid is True and cfg.data.max_length is None
    # paths are stored absolute (relative to the working directory), globs kept
    assert cfg.data.path == f"{tmp_path}/a.jsonl,{tmp_path}/b/*.parquet" and cfg.optim.lr == 1e-4
    assert cfg.train.steps == TrainConfig().train.steps  # untouched default


def test_saved_config_reads_back_equal(tmp_path):
    cfg = load_config(None, {"data.batch_tokens": "4096", "train.output_dir": "runs/x",
                             "chunking.loss_normalization": "sequence", "model.dtype": "float64"})
    cfg.save(tmp_path / "config.toml")
    assert read_toml(tmp_path / "config.toml") == cfg


@pytest.mark.parametrize("overrides, message", [
    ({"chunking.chunksize": "3"}, "unknown option 'chunking.chunksize'; did you mean "
                                  "chunking.chunk_size"),
    ({"chunking.chunk_size": "0"}, "--chunking.chunk_size=0: must be a positive integer"),
    ({"chunking.chunk_size": "12.5"}, "--chunking.chunk_size='12.5': expected an integer"),
    ({"train.device": "tpu"}, "--train.device='tpu': valid values are 'auto', 'cpu', 'cuda'"),
    ({"data.skip_invalid": "maybe"}, "--data.skip_invalid='maybe': expected true or false"),
    ({"optim.lr": "fast"}, "--optim.lr='fast': expected a number"),
    ({"optim.lr": "0"}, "--optim.lr=0.0: must be positive"),
    ({"model.preset": "gpt5"}, "--model.preset='gpt5': known presets are tiny"),
    ({"data.synthetic_min_len": "100", "data.synthetic_max_len": "50"},
     "--data.synthetic_min_len=100 exceeds --data.synthetic_max_len=50"),
])
def test_bad_values_name_the_option_and_what_is_valid(overrides, message):
    with pytest.raises(ValueError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[chunking]\nchunk_sise = 8\n")
    with pytest.raises(ValueError, match=r"bad.toml: unknown option 'chunking.chunk_sise'; did "
                                         r"you mean chunking.chunk_size"):
        read_toml(path)
    path.write_text("[chunkin]\nk = 1\n")
    with pytest.raises(ValueError, match=r"unknown section \[chunkin\]; did you mean chunking"):
        read_toml(path)
    path.write_text("[chunking]\nk = \n")
    with pytest.raises(ValueError, match=r"bad.toml: invalid TOML"):
        read_toml(path)
    path.write_text('[chunking]\nk = "two"\n')
    with pytest.raises(ValueError, match=r"bad.toml: --chunking.k='two': expected an integer"):
        read_toml(path)
    with pytest.raises(ValueError, match=r"config file '.*missing.toml' does not exist"):
        read_toml(tmp_path / "missing.toml")


def test_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for name, (_, field, _) in FIELDS.items():
        assert f"--{name}" in out
        assert f"(default: {field.default})" in out, name
    assert "--config" in out and "--resume" in out
    assert len(FIELDS) == sum(len(dataclasses.fields(s)) for s in
                              (type(getattr(TrainConfig(), f.name))
                               for f in dataclasses.fields(TrainConfig)))


def test_command_line_errors_exit_2(capsys):
    # no abbreviations: a prefix of a real option is an error, not a silent match
    assert main(["train", "--chunking.chunk=64"]) == 2
    assert "unknown option '--chunking.chunk=64'; did you mean chunking.chunk_size" in (
        capsys.readouterr().err)
    assert main(["train", "--chunking.chunk_size=0"]) == 2
    assert "--chunking.chunk_size=0: must be a positive integer" in capsys.readouterr().err


def test_a_pipeline_schedule_is_chosen_by_name_and_needs_pipeline_stages(tmp_path, capsys):
    assert main(["train", "--parallel.schedule=zb-h3"]) == 2
    err = capsys.readouterr().err
    assert "zb-h3" in err and "1f1b" in err and "zb-h1" in err and "zb-h2" in err
    run = tmp_path / "run"
    assert main(["train", "--parallel.schedule=zb-h1", f"--train.output_dir={run}",
                 "--train.steps=1"]) == 2
    assert ("--parallel.schedule=zb-h1 with pp=1: one stage has no bubbles to fill. Valid: "
            "1f1b, or pp > 1") in capsys.readouterr().err
    assert not run.exists()
