"""The command line of ``chunkflow train`` and ``plan``: one ``--section.field`` option per
configuration field, ``--config FILE.toml`` and ``--resume``.

A resume without ``--config`` starts from the resumed run's own configuration (see
:func:`resume_base`), so the README's ``chunkflow train --train.output_dir=RUN --resume``
continues the run as it was configured, whatever directory it is typed in.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any, Literal

from chunkflow.train.config import (FIELDS, SECTIONS, TrainConfig, config_from_dict,
                                    load_config, read_toml, suggest)

_TRUE = ("true", "1", "yes", "on")


def resume_base(overrides: dict[str, Any]) -> tuple[TrainConfig | None, str | None]:
    """The configuration a resume without ``--config`` starts from, and where it came from.

    ``--resume``: the run's own ``<output_dir>/config.toml``; ``--checkpoint.resume_from=DIR``:
    the configuration saved in that checkpoint (its model, data and settings; the run directory
    and checkpoint options are this run's). So the README's ``chunkflow train
    --train.output_dir=RUN --resume`` continues the run as it was configured, and any option
    given on the command line changes it (and is checked like any other resumed setting)."""
    resume = str(overrides.get("checkpoint.resume", "false")).lower() in (*_TRUE, "auto")
    output_dir, resume_from = (overrides.get("train.output_dir"),
                               overrides.get("checkpoint.resume_from"))
    if resume and output_dir is not None and resume_from is None:
        path = Path(os.path.expanduser(output_dir)) / "config.toml"
        if path.is_file():
            return read_toml(path), os.path.abspath(path)
    elif resume_from is not None and str(resume_from).lower() not in ("none", "null"):
        path = Path(os.path.expanduser(resume_from)) / "trainer_state.json"
        if path.is_file():
            try:
                saved = json.loads(path.read_text())["config"]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: unreadable trainer state ({type(e).__name__}: {e}); "
                                 f"valid: the trainer_state.json of a chunkflow checkpoint"
                                 ) from None
            saved = {s: dict(v) for s, v in saved.items()}
            saved.get("train", {}).pop("output_dir", None)  # the new run's, not the old one's
            saved.pop("checkpoint", None)
            return config_from_dict(saved, where=str(path)), os.path.abspath(path)
    return None, None



def add_config_arguments(parser: argparse.ArgumentParser, *, resume: bool = True) -> None:
    """``--config``, ``--resume`` (when ``resume``) and one ``--section.field`` option per field,
    grouped by section."""
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file with [section] tables")
    if resume:
        parser.add_argument("--resume", nargs="?", const="true", default=None,
                            metavar="auto",
                            help="continue from the newest checkpoint in --train.output_dir; "
                                 "--resume=auto: if it holds one, else start the run")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"[{section}]")
        for f in dataclasses.fields(cls):
            name = f"{section}.{f.name}"
            annotation = FIELDS[name][2]
            choices = [a for a in typing.get_args(annotation) if a is not type(None)]
            metavar = ("|".join(choices) if typing.get_origin(annotation) is Literal else
                       getattr(choices[0] if choices else annotation, "__name__", "VALUE").upper())
            takes_bool = annotation is bool or bool in choices
            if bool in choices:  # bool | Literal[...]: true, false or a named choice
                named = [a for c in choices if typing.get_origin(c) is Literal
                         for a in typing.get_args(c)]
                metavar = "|".join(["BOOL", *named])
            extra = {"nargs": "?", "const": "true"} if takes_bool else {}
            group.add_argument(f"--{name}", dest=name, metavar=metavar, default=argparse.SUPPRESS,
                               help=f"{f.metadata['help']} (default: {f.default})", **extra)


def config_from_args(args: argparse.Namespace, unknown: list[str], *,
                     log=None) -> TrainConfig:
    """The configuration for parsed ``chunkflow train`` arguments; unknown options are errors.

    Without ``--config``, a resume starts from the resumed run's saved configuration (see
    :func:`resume_base`); ``log`` (a print-like callable) hears where it came from."""
    for arg in unknown:
        name = arg.lstrip("-").split("=", 1)[0]
        raise ValueError(f"unknown option {arg!r}{suggest(name, FIELDS)}"
                         if arg.startswith("--") else f"unexpected argument {arg!r}")
    overrides = {name: value for name, value in vars(args).items() if name in FIELDS}
    if getattr(args, "resume", None) is not None:
        overrides["checkpoint.resume"] = args.resume
    base = None
    if args.config is None:
        base, source = resume_base(overrides)
        if base is not None and log is not None:
            log(f"configuration: {source}, with the options given here on top")
    return load_config(args.config, overrides, base=base)
