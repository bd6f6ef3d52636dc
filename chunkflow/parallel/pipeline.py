"""Pipeline parallelism: a stage is the model minus other stages' modules; chunks flow between
stages by point-to-point sends.

Each stage executes its own action list from :func:`chunkflow.plan.state_aware_1f1b`, the lists
:mod:`chunkflow.sim` simulates, through the single-device engine: :class:`P2PStageIO` is where a
stage's inputs come from and its outputs go. ``F``/``S`` receive the previous stage's hidden
states (1, n, E) (under sequence parallelism, each TP rank its rows of them, to the same TP
rank of the next stage) and send theirs on; ``R`` recomputes from the input the stage kept at ``S``
(nothing travels); ``B`` receives the gradient of its output and sends its input's gradient back.
Every stage keeps the key/value state of its own layers only, and at most k graphs per chain.

Shapes are known on both sides without any metadata message: every rank holds the plan, and a
chunk's token count says how big its activation is. Sends are asynchronous (kept alive until the
step ends); receives block, in an order both partners derive from the same schedule (forward in
plan order, backward in the order the schedule's backward queue gives, the same on every stage),
so messages need no tags (NCCL has none; gloo's tagged pairs would connect lazily, per tag).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from chunkflow.models.transformer import Transformer
from chunkflow.parallel.mesh import ParallelContext
from chunkflow.plan import Chunk
from chunkflow.runtime.chunk_call import SequenceShard
from chunkflow.runtime.peers import StageIO


def stage_layer_ranges(num_layers: int, num_stages: int) -> list[range]:
    """Decoder layers of each stage: balanced, a remainder to the first stages (the last one also
    holds the output head), as :attr:`chunkflow.plan.cost.CostModel.stage_layers`."""
    if num_stages > num_layers:
        raise ValueError(f"pp={num_stages} stages for a model of {num_layers} layers; valid: "
                         f"pp <= {num_layers} (every stage needs a layer)")
    q, r = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for s in range(num_stages):
        n = q + (s < r)
        ranges.append(range(start, start + n))
        start += n
    return ranges


def split_stage(model: torch.nn.Module, stage: int, num_stages: int) -> torch.nn.Module:
    """In place: keep stage ``stage``'s decoder layers, the embedding on the first stage and the
    final norm and output head on the last. Parameter names stay those of the whole model.
    ``model``: chunkflow's reference model or a transformers causal LM of a supported family."""
    from chunkflow.models.hf import is_hf_model

    if is_hf_model(model):
        return _split_hf_stage(model, stage, num_stages)
    if not isinstance(model, Transformer):
        raise ValueError(f"pipeline parallelism runs chunkflow's reference model (Llama, "
                         f"Qwen2, Qwen3, Mistral), got {type(model).__name__}; load a Hugging "
                         f"Face checkpoint "
                         f"with --model.implementation=reference, or use pp=1")
    if model.config.tie_word_embeddings and num_stages > 1:
        raise ValueError("pipeline parallelism with tied input/output embeddings "
                         "(tie_word_embeddings=true) is not supported: the embedding and the head "
                         "would live on different stages; valid: pp=1 for this model")
    keep = stage_layer_ranges(model.config.num_hidden_layers, num_stages)[stage]
    for key in list(model.model.layers):
        if int(key) not in keep:
            del model.model.layers[key]
    if stage != 0:
        model.model.embed_tokens = None
    if stage != num_stages - 1:
        model.model.norm = None
        model.lm_head = None
    return model


def _split_hf_stage(model: torch.nn.Module, stage: int, num_stages: int) -> torch.nn.Module:
    """:func:`split_stage` of a transformers model, from outside its code: the decoder's layer
    list keeps this stage's layers under their own indices (so parameter names, and each
    attention's ``layer_idx``, stay the whole model's), a later stage takes the previous one's
    hidden states as ``inputs_embeds``, and an earlier stage's final norm is the identity. A
    PEFT (LoRA) model is split the same way: its adapters live in the layers they adapt."""
    causal_lm = model.get_base_model() if hasattr(model, "peft_config") else model
    config = causal_lm.config
    from chunkflow.parallel.tensor import check_parallel_family

    check_parallel_family(config, "pipeline parallelism", "--parallel.pp=1")
    if getattr(config, "tie_word_embeddings", False) and num_stages > 1:
        raise ValueError("pipeline parallelism with tied input/output embeddings "
                         "(tie_word_embeddings=true) is not supported: the embedding and the head "
                         "would live on different stages; valid: pp=1 for this model")
    decoder = causal_lm.get_decoder()
    keep = stage_layer_ranges(len(decoder.layers), num_stages)[stage]
    for key in [name for name, _ in decoder.layers.named_children()]:
        if int(key) not in keep:
            delattr(decoder.layers, key)  # the others keep their keys: no renumbering
    if stage != 0:
        decoder.embed_tokens = None
    if stage != num_stages - 1:
        decoder.norm = torch.nn.Identity()
        causal_lm.lm_head = None
    return model


class P2PStageIO(StageIO):
    """Point-to-point inputs and outputs of one pipeline stage (see the module docstring)."""

    def __init__(self, ctx: ParallelContext, *, hidden_size: int, dtype: torch.dtype,
                 shard: SequenceShard | None = None):
        """``shard``: under sequence parallelism a stage sends its rows of the chunk to the same
        tensor-parallel rank of the next stage."""
        self.ctx, self.hidden_size, self.dtype, self.shard = ctx, hidden_size, dtype, shard
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []

    def _recv(self, chunk: Chunk, src: int) -> torch.Tensor:
        rows = chunk.num_tokens if self.shard is None else self.shard.rows(chunk.num_tokens)
        buf = torch.empty(1, rows, self.hidden_size, dtype=self.dtype, device=self.ctx.device)
        dist.recv(buf, src=src)
        return buf

    def _send(self, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.detach().to(self.dtype).contiguous()
        self._pending.append((dist.isend(tensor, dst=dst), tensor))

    def recv_forward(self, chunk: Chunk) -> torch.Tensor | None:
        return None if self.ctx.is_first_stage else self._recv(chunk, self.ctx.prev_rank)

    def send_forward(self, chunk: Chunk, hidden: torch.Tensor) -> None:
        self._send(hidden, self.ctx.next_rank)

    def recv_backward(self, chunk: Chunk) -> torch.Tensor | None:
        return None if self.ctx.is_last_stage else self._recv(chunk, self.ctx.next_rank)

    def send_backward(self, chunk: Chunk, grad: torch.Tensor) -> None:
        self._send(grad, self.ctx.prev_rank)

    def wait(self) -> None:
        """Complete every send of the step (their buffers are freed afterwards)."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
