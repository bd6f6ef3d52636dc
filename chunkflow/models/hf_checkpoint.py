"""Read and write Hugging Face Llama/Qwen2/Qwen3/Mistral checkpoints (``config.json`` +
safetensors).

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Because :class:`~chunkflow.models.transformer.Transformer` uses
Hugging Face's parameter names, the weights load with no renaming.

Invariants (each has a test against plain ``transformers`` models):

- Exact or refused: :func:`config_from_hf` accepts only configs the reference model reproduces
  exactly (silu SwiGLU, a static RoPE variant, full causal attention, no dropout, no MLP bias;
  the families of :mod:`chunkflow.models.families`). Anything else
  is a ``ValueError`` naming the file, the field, its value and what is supported -- a checkpoint
  that loads but computes something slightly different would silently corrupt fine-tuning.
- Strict keys: every parameter comes from the file and every tensor in the file is used; the only
  tolerated extras are stale ``rotary_emb.inv_freq`` buffers (recomputed from ``rope_theta``).
- Tied embeddings are stored once, as ``model.embed_tokens.weight``, as ``transformers`` does.
- No pickle: ``*.bin`` checkpoints are refused; safetensors cannot run code on load.
- ``save_hf_checkpoint`` output loads with ``AutoModelForCausalLM.from_pretrained`` into the same
  architecture with bit-identical tensors.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chunkflow.models.config import ModelConfig
from chunkflow.models.families import REFERENCE_FAMILIES, ROPE_TYPES
from chunkflow.models.rope import REQUIRED
from chunkflow.models.transformer import RotaryEmbedding, Transformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# What each RoPE variant may carry beside rope_type and rope_theta.
_ROPE_FIELDS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate"},
}
_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16, "float64": torch.float64}


def _refuse(source: str, field: str, value, supported: str) -> ValueError:
    return ValueError(f"{source}: {field}={value!r} is not supported; {supported}")


def _rope(hf: dict, source: str) -> tuple[float, dict]:
    """``rope_theta`` and the static RoPE variant's parameters from either layout, refusing
    dynamic variants and fields the reference model does not implement.

    transformers 4.x stores ``rope_theta`` at top level and scaling in ``rope_scaling``;
    5.x stores both in ``rope_parameters``. A config may carry both (converted checkpoints)."""
    top, scaling = hf.get("rope_theta"), {}
    for field in ("rope_scaling", "rope_parameters"):
        params = hf.get(field)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise _refuse(source, field, params, "expected a dict or null")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise _refuse(source, f"{field}.rope_type", rope_type,
                          f"supported are the static variants {', '.join(ROPE_TYPES)} (dynamic "
                          f"ones rescale by each forward's length, which chunking changes)")
        extra = set(params) - {"rope_type", "type", "rope_theta"} - _ROPE_FIELDS[rope_type]
        if extra:
            raise _refuse(source, field, params,
                          f"rope_type {rope_type!r} takes {sorted(_ROPE_FIELDS[rope_type])}, "
                          f"not {sorted(extra)}")
        if "rope_theta" in params:
            # v4 reads the top-level value and v5 the nested one: disagreement is ambiguous.
            if top is not None and float(top) != float(params["rope_theta"]):
                raise _refuse(source, f"{field}.rope_theta", params["rope_theta"],
                              f"it must equal the top-level rope_theta={top!r}")
            top = params["rope_theta"]
        this = {k: v for k, v in params.items() if k in _ROPE_FIELDS[rope_type]}
        if rope_type != "default":
            this["rope_type"] = rope_type
        if scaling and this and scaling != this:
            raise _refuse(source, field, params, f"it must agree with the other RoPE field "
                                                 f"({scaling})")
        scaling = scaling or this
    rope_type = scaling.get("rope_type", "default")
    if rope_type in ("llama3", "yarn") and "original_max_position_embeddings" not in scaling:
        # as transformers standardises it: the top-level field, else the context length
        original = hf.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
        if original is not None:
            scaling["original_max_position_embeddings"] = original
    missing = [f for f in REQUIRED.get(rope_type, ()) if scaling.get(f) is None]
    if missing:
        raise _refuse(source, "rope_parameters", scaling, f"rope_type {rope_type!r} needs "
                                                          f"{', '.join(missing)}")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(source, "partial_rotary_factor", hf["partial_rotary_factor"],
                      "RoPE must rotate the whole head (1.0)")
    return (float(top) if top is not None else 10000.0), scaling


def config_from_hf(hf: dict, *, source: str = CONFIG_NAME) -> ModelConfig:
    """Map a ``config.json`` dict of a supported family onto :class:`ModelConfig`, refusing
    what the reference model cannot reproduce exactly. ``source`` names the file in errors."""
    model_type = hf.get("model_type")
    if model_type not in REFERENCE_FAMILIES:
        raise _refuse(source, "model_type", model_type,
                      f"supported are {', '.join(map(repr, REFERENCE_FAMILIES))}")
    family = REFERENCE_FAMILIES[model_type]
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(source, "hidden_act", hf["hidden_act"],
                      "the reference MLP is SwiGLU ('silu')")
    if hf.get("attention_dropout", 0.0) != 0.0:
        # Harmless at inference, but dropout makes training differ from the reference model.
        raise _refuse(source, "attention_dropout", hf["attention_dropout"], "it must be 0.0")
    if hf.get("mlp_bias", False):
        raise _refuse(source, "mlp_bias", hf["mlp_bias"], "the reference MLP has no biases")
    if hf.get("use_sliding_window", False):
        raise _refuse(source, "use_sliding_window", hf["use_sliding_window"],
                      "only full causal attention is supported")
    if family.sliding_window is not None and \
            hf.get("sliding_window", family.sliding_window) is not None:
        # Mistral applies its window whenever one is set (its config class sets 4096)
        raise _refuse(source, "sliding_window", hf.get("sliding_window", family.sliding_window),
                      "only full causal attention is supported (set it to null)")
    if any(t != "full_attention" for t in hf.get("layer_types") or []):
        raise _refuse(source, "layer_types", sorted(set(hf["layer_types"])),
                      "only full causal attention is supported")
    if hf.get("quantization_config") is not None:
        raise _refuse(source, "quantization_config", hf["quantization_config"],
                      "only unquantized floating-point checkpoints are supported")
    rope_theta, rope_scaling = _rope(hf, source)
    missing = [f for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if f not in hf]
    if missing:
        raise ValueError(f"{source}: required field(s) missing: {', '.join(missing)}")
    fields = {"max_position_embeddings": family.max_position_embeddings,
              "model_type": model_type, "rope_theta": rope_theta, "rope_scaling": rope_scaling}
    if family.head_dim is not None:
        fields["head_dim"] = family.head_dim
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                 "max_position_embeddings", "tie_word_embeddings", "initializer_range"):
        if hf.get(name) is not None:  # null head_dim / num_key_value_heads: derive, as HF does
            fields[name] = hf[name]
    if family.qkv_bias == "flag":
        # Qwen2 always has q/k/v biases and no attention_bias field; Llama's and Qwen3's flag
        # covers q/k/v/o; Mistral has none.
        fields["attention_bias"] = bool(hf.get("attention_bias", False))
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def config_to_hf(config: ModelConfig, *, dtype: str) -> dict:
    """A ``config.json`` dict that ``transformers`` loads as the family's ``*ForCausalLM``;
    ``dtype`` names the stored weights' dtype (e.g. "bfloat16")."""
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype!r}: supported are {', '.join(_FLOAT_DTYPES)}")
    hf = {
        "architectures": [config.family.architecture],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        # Both RoPE layouts: transformers 4.x reads rope_theta, 5.x reads rope_parameters.
        "rope_theta": config.rope_theta,
        "rope_parameters": {**config.rope_parameters, "rope_theta": config.rope_theta},
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "attention_dropout": 0.0,
        "dtype": dtype,  # transformers 5 name; 4.x's "torch_dtype" now triggers a warning
    }
    if config.family.qkv_bias == "flag":
        hf.update(attention_bias=config.attention_bias)
    hf.update(config.family.fixed_config)
    if config.rope_scaling:  # transformers 4.x reads the variant here
        hf["rope_scaling"] = dict(config.rope_scaling)
    return hf


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype!r}: supported are {', '.join(_FLOAT_DTYPES)}")
    return _FLOAT_DTYPES[name]


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: ``model.safetensors``, else the shards
    its index lists; pickle weights are refused."""
    if (path / WEIGHTS_NAME).is_file():  # preferred over an index, as transformers does
        return [path / WEIGHTS_NAME]
    if (path / INDEX_NAME).is_file():
        weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"{path / INDEX_NAME} lists shard(s) that do not exist: {absent}")
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        raise ValueError(
            f"{path}: only pickle weights found ({', '.join(pickles)}); chunkflow requires "
            f"safetensors ({WEIGHTS_NAME} or {INDEX_NAME}) because pickle can run code on "
            "load. Convert once with transformers: from_pretrained(...).save_pretrained(...)")
    raise ValueError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME} found")


def _key_list(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")


def load_hf_checkpoint(path, *, dtype=None, device=None) -> Transformer:
    """Load a safetensors checkpoint directory of a supported family as a
    :class:`Transformer`.

    ``dtype`` defaults to the stored weights' dtype (the widest, if they are mixed); ``device``
    to CPU. Missing or unexpected tensors are errors that list the keys."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise ValueError(f"{path}: no {CONFIG_NAME}; expected a Hugging Face checkpoint directory")
    config = config_from_hf(json.loads((path / CONFIG_NAME).read_text()),
                            source=str(path / CONFIG_NAME))
    dtype, device = _as_dtype(dtype), torch.device("cpu" if device is None else device)

    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if not key.endswith("rotary_emb.inv_freq"):  # old checkpoints saved the buffer
                    tensors[key] = f.get_tensor(key)
    if dtype is None and tensors:
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors.values()))

    # Built on the meta device: no memory or random init for weights about to be replaced.
    with torch.device("meta"):
        model = Transformer(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        head = tensors.pop("lm_head.weight", None)  # some tied checkpoints store a copy
        embed = tensors.get("model.embed_tokens.weight")
        if head is not None and embed is not None and not torch.equal(head, embed):
            raise ValueError(f"{path}: tie_word_embeddings is true but lm_head.weight differs "
                             "from model.embed_tokens.weight")
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match {CONFIG_NAME}; "
                         f"missing: [{_key_list(missing)}]; unexpected: [{_key_list(unexpected)}]")
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    wrong = [f"{k} {tuple(t.shape)} (expected {shapes[k]})" for k, t in sorted(tensors.items())
             if tuple(t.shape) != shapes[k]]
    if wrong:
        raise ValueError(f"{path}: tensor shapes do not match {CONFIG_NAME}: {', '.join(wrong)}")
    state = {k: t.to(device=device, dtype=dtype) for k, t in tensors.items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    # assign=True adopts our tensors instead of copying into the meta parameters.
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:  # assign wraps each key in its own Parameter: re-tie
        model.lm_head.weight = model.model.embed_tokens.weight
    # inv_freq is a non-persistent buffer, still on meta: rebuild it in float32 on the device.
    with device:
        model.model.rotary_emb = RotaryEmbedding(config)
    return model


def save_hf_checkpoint(model: Transformer, path, *, dtype=None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` loadable by
    ``transformers.AutoModelForCausalLM.from_pretrained(path)``; returns ``path``.

    ``dtype`` defaults to the model's parameter dtype. Tied embeddings are stored once."""
    path = Path(path)
    config = model.config
    dtype = _as_dtype(dtype) or next(model.parameters()).dtype
    dtype_name = str(dtype).removeprefix("torch.")
    hf_config = config_to_hf(config, dtype=dtype_name)  # validates dtype before writing
    state = model.state_dict()
    with torch.device("meta"):
        expected = set(Transformer(config).state_dict())
    if set(state) != expected:
        # e.g. a pipeline stage that deleted the layers it does not own
        raise ValueError(f"model does not hold the full {config.num_hidden_layers}-layer "
                         f"model: missing [{_key_list(expected - set(state))}], "
                         f"unexpected [{_key_list(set(state) - expected)}]")
    if config.tie_word_embeddings:
        del state["lm_head.weight"]  # safetensors refuses shared storage; HF re-ties on load
    tensors = {k: t.detach().to(device="cpu", dtype=dtype).contiguous() for k, t in state.items()}
    path.mkdir(parents=True, exist_ok=True)
    # metadata format=pt: transformers checks it to know the tensors are PyTorch layout.
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return path
