"""--log.wandb against the documented contract of the wandb package (``wandb.init(project=,
name=, id=, resume=, dir=, config=, mode=)``, ``run.log(data, step=)``, ``run.finish()``,
``wandb.util.generate_id()``), recorded by a stand-in module: wandb is an optional dependency
this machine does not install."""

import sys
import types

import pytest

from chunkflow.cli import main
from tests.train.run.test_trainer import args, metrics


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.runs = []
        self.util = types.SimpleNamespace(generate_id=lambda: f"id{len(self.runs)}")

    def init(self, *, project, name, id, resume, dir, config, **options):
        run = types.SimpleNamespace(kwargs=dict(project=project, name=name, id=id,
                                                resume=resume, dir=dir, config=config,
                                                **options),
                                    logged=[], finished=False)
        run.log = lambda data, step: run.logged.append((step, dict(data)))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run


def test_steps_go_to_one_wandb_run_that_a_resume_continues(tmp_path, monkeypatch, capsys):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    run = tmp_path / "run"
    steps = {"train.steps": "4", "checkpoint.interval": "2", "log.wandb": "true",
             "log.wandb_mode": "offline", "log.wandb_project": "sft"}
    assert main(["train", *args(run, **{**steps, "train.steps": "2"})]) == 0
    assert main(["train", *args(run, **steps), "--resume"]) == 0
    first, second = wandb.runs
    assert first.kwargs["id"] == second.kwargs["id"] == (run / "wandb-run-id").read_text().strip()
    assert first.kwargs == {**first.kwargs, "project": "sft", "name": "run", "resume": "allow",
                            "dir": str(run), "mode": "offline"}
    assert first.kwargs["config"]["optim"]["lr"] == 2e-3
    assert first.finished and second.finished
    logged = first.logged + second.logged
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    for (step, data), record in zip(logged, metrics(run)):
        assert data["loss"] == record["loss"] and "step" not in data
        assert all(isinstance(v, (int, float)) for v in data.values())  # no lists (dp_chunks)


def test_without_the_package_it_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    assert main(["train", *args(tmp_path / "run", **{"train.steps": "1",
                                                      "log.wandb": "true"})]) == 2
    assert ("--log.wandb=true needs the wandb package (pip install wandb)"
            in capsys.readouterr().err)
    assert not (tmp_path / "run").exists()  # a failed start leaves nothing behind
    with pytest.raises(ValueError, match="valid values are 'auto', 'online', 'offline'"):
        main_args = args(tmp_path / "x", **{"log.wandb_mode": "cloud"})
        from chunkflow.train.config import load_config

        load_config(None, dict(a[2:].split("=", 1) for a in main_args))
