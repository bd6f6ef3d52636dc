"""What a pretrained ``--model.path`` brings to a run's configuration.

* Fine-tuning defaults (:func:`pretrained_defaults`): the learning rate of TRL's SFTTrainer
  and PEFT, and warmup as a share of the run, for the options a user did not give.
* Its ``config.json`` (:func:`config_json`) and the dtype it declares (:func:`checkpoint_dtype`),
  which ``--model.dtype=auto`` follows.
"""

from __future__ import annotations

import json
from pathlib import Path


PRETRAINED_LR = {"full": 2e-5, "lora": 2e-4}
"""The learning rate a pretrained model is fine-tuned with unless --optim.lr says otherwise
(TRL's SFTTrainer's and PEFT's usual values; the built-in default, 2e-3, is for the
randomly initialised presets)."""
PRETRAINED_WARMUP_RATIO = 0.03


def pretrained_defaults(config, given: set[str]) -> list[str]:
    """With --model.path, fine-tuning defaults for the options not ``given``: the learning
    rate, and warmup as a share of the run. Returns what it set, for the banner."""
    if config.model.path is None:
        return []
    notes = []
    if "optim.lr" not in given:
        config.optim.lr = PRETRAINED_LR["lora" if config.lora.rank else "full"]
        notes.append(f"optim.lr={config.optim.lr:g}")
    if not {"optim.warmup_steps", "optim.warmup_ratio"} & given:
        config.optim.warmup_ratio = PRETRAINED_WARMUP_RATIO
        notes.append(f"optim.warmup_ratio={PRETRAINED_WARMUP_RATIO:g}")
    return notes


def config_json(path: str) -> dict:
    """A Hugging Face model directory's config.json as a dict; ``{}`` when it is missing or
    unreadable (the model's loaders name that, with the file, when the model is built)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def checkpoint_dtype(path: str) -> str | None:
    """The dtype a Hugging Face model directory's config.json declares (``dtype``, or
    ``torch_dtype`` as transformers < 4.56 wrote it), or None."""
    config = config_json(path)
    dtype = config.get("dtype", config.get("torch_dtype"))
    return dtype if isinstance(dtype, str) else None
