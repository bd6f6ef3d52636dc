"""LoRA from the command line (``[lora]``), through ``peft``: build, save, load, merge.

* :func:`apply_lora` wraps a transformers causal LM in a ``PeftModel`` (``get_peft_model``) as the
  ``[lora]`` section describes. The engine trains it unchanged: adapters sit inside the model's
  linear layers, so they see the same chunked attention as the rest.
* Checkpoints hold the adapter in PEFT's own format (``adapter_model.safetensors`` +
  ``adapter_config.json``), so ``PeftModel.from_pretrained(base, step_dir)`` loads it, and
  :func:`merged_state_dict` gives base + adapter as plain weights for a merged model directory
  that ``from_pretrained`` loads.
* Merging is out of place: the training weights are never changed by a save (an in-place
  merge and unmerge would round them, and a resumed run would then differ from an
  uninterrupted one).

``peft`` is imported here only; a run without ``[lora]`` never needs it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from chunkflow.train.config import LoraSection

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_EMBEDDINGS = ("embed_tokens", "lm_head")


def _peft():
    try:
        import peft
    except ImportError:
        raise ValueError("--lora.rank needs the peft package: pip install 'chunkflow[lora]' "
                         "(or pip install peft)") from None
    return peft


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def apply_lora(model: nn.Module, section: LoraSection, *, model_path: str) -> nn.Module:
    """``model`` (a transformers causal LM) with LoRA adapters; only they (and
    ``modules_to_save``) train. The adapter config records ``model_path`` as its base."""
    peft = _peft()
    targets = _names(section.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    elif not targets:
        raise ValueError(f"--lora.target_modules={section.target_modules!r}: name at least one "
                         f"module, or 'all-linear'")
    if isinstance(targets, list):  # peft trains the names that match, silently skipping typos
        names = [n for n, _ in model.named_modules() if n]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, nn.Linear)})
            raise ValueError(f"--lora.target_modules={section.target_modules!r}: "
                             f"{', '.join(map(repr, missing))} match{'es' * (len(missing) == 1)} "
                             f"no module of the model; valid: its linear layers "
                             f"{', '.join(linear)}, or 'all-linear'")
    to_save = _names(section.modules_to_save) or None
    extra = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied and to_save and any(n in _EMBEDDINGS for n in to_save):
        # Trained fully, a tied embedding must stay tied to the head, or the merged model
        # (which transformers re-ties on load) would differ from the trained one.
        if "ensure_weight_tying" not in peft.LoraConfig.__dataclass_fields__:
            raise ValueError(f"--lora.modules_to_save={section.modules_to_save!r} on a model with "
                             f"tied embeddings needs peft's ensure_weight_tying (peft >= 0.18; "
                             f"this is {peft.__version__}); valid: upgrade peft, or leave the "
                             f"embeddings out")
        extra["ensure_weight_tying"] = True
    config = peft.LoraConfig(r=section.rank, lora_alpha=section.alpha,
                             lora_dropout=section.dropout, target_modules=targets,
                             modules_to_save=to_save, bias="none", task_type="CAUSAL_LM",
                             **extra)
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            wrapped = peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module that does not exist
        raise ValueError(f"--lora.target_modules={section.target_modules!r}, "
                         f"--lora.modules_to_save={section.modules_to_save!r}: peft refused "
                         f"them ({e})") from None
    wrapped.peft_config["default"].base_model_name_or_path = model_path
    return wrapped


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter (and fully trained modules) of ``model`` (or of its pipeline stage), by
    PEFT's names, on the CPU."""
    from peft import get_peft_model_state_dict

    state, seen = {}, set()
    for k, v in get_peft_model_state_dict(model).items():
        v = v.detach().to("cpu").contiguous()
        # Tied modules (e.g. a fully trained embedding tied to the head) share storage, which
        # safetensors refuses; each name gets its own copy, as PEFT's save_pretrained does.
        if v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        state[k] = v
    return state


def save_adapter(model: nn.Module, path: Path, *,
                 state: dict[str, torch.Tensor] | None = None) -> list[str]:
    """The adapter (and fully trained modules) in PEFT's format; returns the file names.
    ``state``: the whole adapter when ``model`` is one pipeline stage (default: the model's)."""
    from safetensors.torch import save_file

    state = adapter_state(model) if state is None else state
    save_file(state, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    model.peft_config["default"].save_pretrained(str(path))
    return [ADAPTER_WEIGHTS, ADAPTER_CONFIG]


def load_adapter(model: nn.Module, path: Path, *, stage: bool = False) -> None:
    """Inverse of :func:`save_adapter`: the adapter weights of ``path`` into ``model``
    (``stage``: one pipeline stage of the model, which takes its own part of them)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        raise ValueError(f"checkpoint {str(path)!r} holds no {ADAPTER_WEIGHTS}: it was not saved "
                         f"by a LoRA run; valid: the same --lora settings as the run that saved "
                         f"it")
    state = load_file(str(file), device=str(next(model.parameters()).device))
    expected = set(get_peft_model_state_dict(model))
    if stage:  # the other stages' tensors are theirs
        missing = sorted(expected - set(state))
        if missing:
            raise ValueError(f"{file} lacks this pipeline stage's adapter tensors "
                             f"{missing[:5]}; valid: the --lora settings of the run that saved "
                             f"it")
        state = {k: state[k] for k in expected}
    if set(state) != expected:
        raise ValueError(f"{file} does not match the configured adapters: missing "
                         f"{sorted(expected - set(state))[:5]}, unexpected "
                         f"{sorted(set(state) - expected)[:5]}; valid: the --lora settings of "
                         f"the run that saved it")
    set_peft_model_state_dict(model, state)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base weights + adapter deltas under the plain model's names (CPU, the model's dtype),
    computed out of place; fully trained modules contribute their trained copies."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model()
    special: dict[str, nn.Module] = {}
    for name, module in base.named_modules():
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)) and not any(
                name.startswith(s + ".") for s in special):
            special[name] = module
    out = {k: v for k, v in base.state_dict().items()
           if not any(k.startswith(s + ".") for s in special)}
    with torch.no_grad():
        for name, module in special.items():
            if isinstance(module, ModulesToSaveWrapper):
                adapter = module.active_adapters[0]
                for k, v in module.modules_to_save[adapter].state_dict().items():
                    out[f"{name}.{k}"] = v
                continue
            layer_state = module.get_base_layer().state_dict()
            for k, v in layer_state.items():
                if k == "weight":
                    for adapter in module.active_adapters:
                        v = v + module.get_delta_weight(adapter).to(v.dtype)
                out[f"{name}.{k}"] = v
    if getattr(base.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)  # stored once; from_pretrained re-ties it
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}
