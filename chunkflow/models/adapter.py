"""One adapter per model kind: everything the parallel layer asks of a model.

* :class:`ReferenceAdapter`: chunkflow's reference model (:class:`~chunkflow.models.Transformer`).
* :class:`TransformersAdapter`: a transformers ``*ForCausalLM``, PEFT-wrapped (LoRA) or not.

Each answers the same questions: the decoder layers; the embedding and the output head (and
swapping the embedding for a split one); the stage split (keep some layers, drop the embedding
or the final norm and head); how a layer passes its input to attention (the tensor-parallel plan
under sequence parallelism depends on it); the FSDP2 units and the root's forward method; and
the family's capabilities, from :data:`chunkflow.models.families.FAMILIES` (read here and in
:func:`~chunkflow.models.families.model_shape` only), with the refusals that follow from them.

:func:`adapt` picks the kind, once. A new family is a row of the family table; a new model kind is
one class here. Model code is never changed: every step works on the modules from outside.
"""

from __future__ import annotations

from torch import nn

from chunkflow.models.families import Family, family_of

TIED_REFUSAL = ("pipeline parallelism with tied input/output embeddings (tie_word_embeddings=true) "
                "is not supported: the embedding and the head would live on different stages; "
                "valid: pp=1 for this model")


class ModelAdapter:
    """What every model kind answers (see the module docstring). ``module``: the model as it
    trains (a PEFT wrapper included); its parameter names are kept by every step."""

    kind = ""
    attention_kwargs = False
    """Whether a decoder layer calls its attention module with ``hidden_states=`` (else with
    its positional arguments, the hidden states first)."""

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def causal_lm(self) -> nn.Module:
        """The model without a PEFT wrapper."""
        return self.module

    @property
    def config(self):
        return self.causal_lm.config

    @property
    def family(self) -> Family | None:
        return family_of(self.config)

    @property
    def lora(self) -> bool:
        return hasattr(self.module, "peft_config")

    @property
    def experts(self) -> bool:
        """A mixture of experts: a replica may route no token to an expert."""
        return self.family is not None and self.family.experts

    # ---- modules -----------------------------------------------------------------------------

    def decoder_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def embedding(self) -> nn.Module | None:
        """The input embedding (None on a later pipeline stage)."""
        raise NotImplementedError

    def head(self) -> nn.Module | None:
        """The output head (None on an earlier pipeline stage)."""
        raise NotImplementedError

    def set_embedding(self, module: nn.Module) -> None:
        raise NotImplementedError

    def keep_stage(self, layers: range, *, first: bool, last: bool) -> None:
        """In place: keep decoder ``layers`` (by index), the embedding if ``first``, the final
        norm and head if ``last``."""
        raise NotImplementedError

    def fsdp_root_forward(self) -> str:
        """The method of the FSDP2 root (``module``) the engine calls to run the decoder, which
        must gather the root's own parameters (embedding, final norm, head) first."""
        raise NotImplementedError

    # ---- what the family allows --------------------------------------------------------------

    def check_parallel(self, what: str, valid: str) -> None:
        """Refuse TP or PP for a family whose modules chunkflow's plans do not fit."""
        family = self.family
        if family is not None and not family.parallel:
            raise ValueError(f"{what} for model_type {self.config.model_type!r} is not "
                             f"supported ({family.note}); valid: {valid}, data parallel (ddp)")

    def check_tp(self) -> None:
        if self.lora:
            raise ValueError("tensor parallelism with LoRA is not supported (PEFT wraps the "
                             "projections the plan shards); valid: --parallel.tp=1, data "
                             "parallel (ddp) or pipeline stages (--parallel.pp) for LoRA")
        self.check_parallel("tensor parallelism", "--parallel.tp=1")

    def check_pp(self, num_stages: int) -> None:
        self.check_parallel("pipeline parallelism", "--parallel.pp=1")
        if getattr(self.config, "tie_word_embeddings", False) and num_stages > 1:
            raise ValueError(TIED_REFUSAL)

    def check_fsdp(self) -> None:
        if self.lora:
            raise ValueError("data_parallel='fsdp' with LoRA is not supported: the frozen base "
                             "weights have no gradient or optimizer state to shard, and a step "
                             "gathers them whole anyway (ZeRO-2); valid: --parallel.data_parallel"
                             "=ddp for LoRA")
        if self.experts:
            raise ValueError(f"data_parallel='fsdp' for model_type {self.config.model_type!r} "
                             f"is not supported: a replica may route no token to an expert, and "
                             f"FSDP2 reduce-scatters only the gradients a replica has, so the "
                             f"replicas' collectives would not match; valid: "
                             f"--parallel.data_parallel=ddp (experts summed by one all-reduce)")


class ReferenceAdapter(ModelAdapter):
    """chunkflow's reference model: layers in a ``ModuleDict`` keyed by index, so a stage is
    the model minus other stages' entries; it runs chunks itself (``hidden_states``)."""

    kind = "reference"

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.module.model.layers.values())

    def embedding(self) -> nn.Module | None:
        return self.module.model.embed_tokens

    def head(self) -> nn.Module | None:
        return self.module.lm_head

    def set_embedding(self, module: nn.Module) -> None:
        self.module.model.embed_tokens = module

    def keep_stage(self, layers: range, *, first: bool, last: bool) -> None:
        model = self.module.model
        for key in list(model.layers):
            if int(key) not in layers:
                del model.layers[key]
        if not first:
            model.embed_tokens = None
        if not last:
            model.norm = None
            self.module.lm_head = None

    def fsdp_root_forward(self) -> str:
        return "hidden_states"


class TransformersAdapter(ModelAdapter):
    """A transformers causal LM (or a PEFT wrapper of one), from outside its code: a stage keeps
    its layers under their own indices (so parameter names, and each attention's ``layer_idx``,
    stay the whole model's), a later stage takes the previous one's hidden states as
    ``inputs_embeds``, an earlier stage's final norm is the identity. PEFT's adapters live in
    the layers they adapt, so they split with them."""

    kind = "transformers"
    attention_kwargs = True

    @property
    def causal_lm(self) -> nn.Module:
        return self.module.get_base_model() if self.lora else self.module

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.causal_lm.get_decoder().layers)

    def embedding(self) -> nn.Module | None:
        return self.module.get_input_embeddings()

    def head(self) -> nn.Module | None:
        return self.module.get_output_embeddings()

    def set_embedding(self, module: nn.Module) -> None:
        self.module.set_input_embeddings(module)

    def keep_stage(self, layers: range, *, first: bool, last: bool) -> None:
        decoder = self.causal_lm.get_decoder()
        for key in [name for name, _ in decoder.layers.named_children()]:
            if int(key) not in layers:
                delattr(decoder.layers, key)  # the others keep their keys: no renumbering
        if not first:
            decoder.embed_tokens = None
        if not last:
            decoder.norm = nn.Identity()
            self.causal_lm.lm_head = None

    def fsdp_root_forward(self) -> str:
        """The engine runs the decoder and reads the head's weight, never the causal LM's own
        forward; so the causal LM gets a forward method that runs its decoder
        (:data:`chunkflow.models.hf.DECODER_FORWARD`, which the engine calls when present), for
        FSDP2 to register: the root then gathers its own parameters (embedding, final norm,
        head) before the decoder runs. The method is bound to this model object: a sharded
        model is not deep-copied or pickled (as FSDP2's registered methods are not)."""
        from chunkflow.models.hf import DECODER_FORWARD

        causal_lm = self.causal_lm
        setattr(causal_lm, DECODER_FORWARD, causal_lm.get_decoder().__call__)  # not a submodule
        return DECODER_FORWARD


def chunk_model(model: nn.Module):
    """What the engine runs chunks through (:class:`chunkflow.runtime.chunk_call.ChunkModel`)
    for a model that is not one itself: a transformers causal LM's
    :class:`~chunkflow.models.hf.HFChunkModel` (chunkflow's reference model is one)."""
    from chunkflow.models.hf import HFChunkModel, is_hf_model

    if not is_hf_model(model):
        raise ValueError(f"{type(model).__name__} is neither a chunkflow.models.Transformer "
                         f"nor a Hugging Face transformers causal LM")
    return HFChunkModel(model)


def adapt(model: nn.Module, *, what: str, valid: str) -> ModelAdapter:
    """The adapter of ``model``'s kind; anything else is refused, naming ``what`` needs it and
    what is ``valid`` instead."""
    from chunkflow.models.hf import is_hf_model
    from chunkflow.models.transformer import Transformer

    if isinstance(model, Transformer):
        return ReferenceAdapter(model)
    if is_hf_model(model):
        return TransformersAdapter(model)
    raise ValueError(f"{what} runs chunkflow's reference model or a transformers causal LM, "
                     f"got {type(model).__name__}; valid: {valid}")
