"""Peak memory of one ChunkFlow training step, estimated from the model shape and the chunk plan.

Stdlib only: ``model`` is anything with :class:`chunkflow.models.ModelConfig`'s attributes
(``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
``num_key_value_heads``, ``head_dim``, ``vocab_size``, ``num_params``), duck-typed because the
planning layer may not import the models.

The estimate has two parts. The *static* part depends only on the parameter count ``P``:
weights ``P * param_bytes``, gradients ``P * param_bytes``, optimizer state (AdamW: two moments
in the parameter dtype, as ``torch.optim.AdamW`` keeps them, ``2 * P * param_bytes``). With LoRA
(``trainable_params=T``) the ``P`` weights are frozen and the ``T`` adapter parameters train in
float32 (or wider): weights ``P * param_bytes + 4T``, gradients ``4T``, AdamW ``8T``. The *step*
part is what the runtime's CPU meter (``StepResult.peak_memory_bytes``) counts: tensors saved
for backward plus the chains' key/value state. Invariant: ``activations + kv_state`` is that
meter's peak, up to the approximations below.

``total``, the device's peak, is the largest of these moments (as the dry run on fake tensors,
``chunkflow plan --dry-run``, finds them):

* a chunk moment below: the static parts, the moment's step part and ``transient``; the
  gradients only from the step's first backward on (torch allocates ``.grad`` as a backward
  produces it), so a plan's first chunk (a chain's: its last forward) peaks without them;
* bf16 autocast (``activation_bytes < param_bytes``) adds 16-bit copies of the matmul weights
  (all but an untied embedding): once per step for trained weights (autocast caches those
  casts for the step), once per live graph for LoRA's frozen ones (cast at every use, each
  kept by the graph that saved it for the input gradient);
* the optimizer step: weights, gradients, optimizer state and AdamW's foreach temporaries,
  one trained-parameter-sized tensor in the state dtype.

Activations, per token of a live chunk graph, with ``b = activation_bytes``, ``a = max(b, 4)``
(the float32-or-wider accumulation dtype), E hidden, H/G query/key-value heads, D head dim,
I intermediate, V vocabulary, L layers. Per layer::

    b * (6E          two RMSNorms: input, normalised input, scaled output (the residual stream
                     is each norm's input, so it needs no term of its own)
         + 3HD       queries, attention output, o_proj input
         + 2GD       keys, values (un-expanded heads: the kernels see GQA directly)
         + 4I)       SwiGLU: gate, up, silu(gate), product (down_proj input)
    + a * (H + 2)    attention LSE per query head, the two norms' rsqrt

and once per token for the head and the chunk's inputs::

    b * (3E + 2D) + a * (V + 2) + 16
    (final norm as above, RoPE cos/sin shared by all layers, log-probabilities of the
    cross-entropy, final rsqrt, loss weight, int64 input id and target)

less the log-probabilities (``a * V``) in a chunk whose logits exceed ``LOGITS_BUDGET``: the
runtime's fused linear cross-entropy keeps none (:func:`fused_head`).

RoPE saves nothing per layer (the multiplications by cos/sin need only cos/sin), and nothing
grows with prefix x chunk (the runtime's attention never builds such a tensor).

Which graphs are alive at the peak follows the schedule (``chunkflow.plan.scheduling``): a chain
of N chunks keeps the graphs of its last ``min(K, N)`` chunks alive together, then recomputes each
earlier chunk alone; its key/value state (all layers, the positions before its last chunk) lives
for the whole chain. A standalone chunk lives alone, with no state. The step's peak is the
largest of these moments (a chain's always hold at least one full chunk plus state, so a
standalone chunk sets the peak only in a batch without chains). Packed segments count like
chain tokens: the per-token cost does not depend on which sequence a token belongs to.

Key/value state of a chain whose last chunk starts at position ``T``::

    2 * L * G * D * T * (b + a)     keys and values in the key dtype, their gradients in float32+

Selective recompute (``recompute="selective"``): each ``s`` chunk keeps, per layer and token,
its attention output and LSE, ``L * (b * H * D + a * H)``, from its ``s`` until its ``r``
(where they become the graph's saved output and LSE, already counted above). So after a chain's
last ``F`` all its ``N-K`` recomputed chunks' outputs are alive, and at the ``r`` of chunk j
those of chunks 0..j-1.

Offload (``offload="state"``): the chain's state lives in host memory and two layers of it on
the device, the one in use and the one prefetched behind it; at the step's peak, the end of a
chain's last forward, that is two layers' keys/values, ``2 * G * D * T * 2b``. (A backward
brings gradient buffers too, but later: the dry run, ``chunkflow plan --dry-run``, of a 7B
LoRA step on one 1M-token sequence peaks with 4.0 GiB of state on the device, this figure,
with and without activation checkpointing.) ``host`` is the whole state (every layer; keys/values with
``state_extra_rows`` more rows, gradients ``T``), as the CUDA runtime allocates it: pinned, in
a few pieces (:func:`host_pieces`), each of which torch's caching host allocator rounds up to a
power of two (:func:`pinned_block_bytes`). ``offload="all"`` moves the kept attention outputs
there too, each chunk's in pieces of its own, rounded the same way
(:func:`kept_attention_host_bytes`).

Activation checkpointing (``activation_checkpointing=True``): a chunk graph keeps, per layer and
token, the layer's input only, ``b * E``, plus the head as above. While a chunk runs backward one
of its layers is recomputed in full: that ``transient`` (one layer's activations of the largest
chunk) is part of ``total``. The CPU meter does not see it (backward builds it under
checkpointing's own hooks); CUDA's allocator does.

Assumptions and known errors (all small against the totals):

* every activation is in ``activation_bytes`` (a model run in its own dtype, no autocast);
* the o_proj input is counted separately from the attention output; for chunks without a prefix
  the CPU flash kernel's output already has that layout and the two are one tensor, so the
  estimate is high there by ``HD`` per token-layer;
* a chain's last chunk that also holds packed sequences saves some query/key/value storage twice
  (the prefix path copies its segment); not counted, the estimate is low by about 2% there;
* transient buffers inside one operator (attention scores of a block, backward temporaries) and
  allocator overhead are not counted, as the CPU meter does not count them either;
* the optimizer state is ``torch.optim.AdamW``'s (moments in the parameter dtype); a
  mixed-precision optimizer with float32 master weights and moments needs more;
* LoRA's activations are a full fine-tune's: an adapter saves its input for its own weight
  gradient where the frozen projection no longer does, plus ``rank`` values per token and
  adapted projection (not counted, under 0.2% at rank 16); adapters on some projections
  only keep less (the estimate is an upper bound there).
"""

from __future__ import annotations

from dataclasses import dataclass

from chunkflow.plan.chunks import ChunkPlan, check_positive_int
from chunkflow.plan.units import format_bytes

OPTIMIZER_STATES = {"adamw": 2, "sgd": 0}
"""Optimizer state tensors per parameter, in its dtype: AdamW's two moments; plain SGD none."""

_MODEL_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "num_params")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of the step by part: the static parts, and the chunk moment where the runtime
    meter peaks (``step``). ``total`` is the device's peak, which may come at another moment
    (``peak_at``): before any gradient exists, or at the optimizer step."""

    weights: int
    grads: int
    optimizer_state: int
    activations: int
    """Saved-for-backward tensors of the chunk graphs alive at the peak."""
    kv_state: int
    """Key/value state (and its gradients) of the chain alive at the peak; 0 without a chain."""
    peak_tokens: int
    """Tokens of the chunk graphs alive at the peak (for reading the estimate, not for sums)."""
    kept_attention: int = 0
    """Attention outputs kept on the device for selective recomputes, at the peak."""
    host: int = 0
    """The most that offload keeps in host memory at any moment of the step (not part of
    ``total``; with ``offload="all"`` that moment is not the device's peak: the kept outputs
    are all on the host after a chain's last forward)."""
    transient: int = 0
    """Activation checkpointing: one layer recomputed in a chunk's backward."""
    weight_copies: int = 0
    """bf16 autocast's 16-bit copies of the weights at the step's peak (in ``weights`` on the
    dry run's breakdown)."""
    optimizer_transient: int = 0
    """The optimizer step's temporaries (``torch.optim.AdamW``'s foreach step: one
    trained-parameter-sized tensor in the state dtype)."""
    peak_bytes: int = 0
    """The device's peak over the step's moments (``total``); 0: the sum of the parts."""
    peak_at: str = "a chunk's backward"
    """The moment of ``total``."""

    @property
    def step(self) -> int:
        """What the runtime's CPU meter counts: saved activations, device KV state, kept
        attention outputs (not the checkpointing transient)."""
        return self.activations + self.kv_state + self.kept_attention

    @property
    def total(self) -> int:
        return self.peak_bytes or (self.weights + self.weight_copies + self.grads
                                   + self.optimizer_state + self.step + self.transient)

    def summary(self) -> str:
        b = format_bytes
        kept = f" + kept attention {b(self.kept_attention)}" if self.kept_attention else ""
        kept += f" + recomputed layer {b(self.transient)}" if self.transient else ""
        copies = f" (+ {b(self.weight_copies)} bf16 copies)" if self.weight_copies else ""
        host = f"; in host memory {b(self.host)}" if self.host else ""
        return (f"peak {b(self.total)} at {self.peak_at}: weights {b(self.weights)}"
                f"{copies}, grads {b(self.grads)}, optimizer {b(self.optimizer_state)}; "
                f"the step's most: activations {b(self.activations)} ({self.peak_tokens} "
                f"tokens) + KV state {b(self.kv_state)}{kept}{host}")


LOGITS_BUDGET = 256 * 2**20
"""Bytes of logits (and as much for their gradient) a chunk's loss may hold at once; above it
the runtime's head (``chunkflow.runtime.head_loss``) runs a fused linear cross-entropy in row
blocks, which keeps no log-probabilities."""


def fused_head(num_tokens: int, vocab_size: int, activation_bytes: int) -> bool:
    """Whether a chunk of ``num_tokens`` takes the fused linear cross-entropy: its float32 (or
    wider) logits over ``vocab_size`` would exceed :data:`LOGITS_BUDGET`."""
    return num_tokens * vocab_size * max(activation_bytes, 4) > LOGITS_BUDGET


def _token_parts(model, activation_bytes: int, num_tokens: int | None = None) -> tuple[int, int]:
    """Saved-for-backward bytes of one token: (one decoder layer, head and inputs). The head
    keeps no log-probabilities in a chunk of ``num_tokens`` that takes the fused head."""
    b, a = activation_bytes, max(activation_bytes, 4)
    e, i, d = model.hidden_size, model.intermediate_size, model.head_dim
    h, g = model.num_attention_heads, model.num_key_value_heads
    per_layer = b * (6 * e + 3 * h * d + 2 * g * d + 4 * i) + a * (h + 2)
    fused = num_tokens is not None and fused_head(num_tokens, model.vocab_size, b)
    head = b * (3 * e + 2 * d) + a * ((0 if fused else model.vocab_size) + 2) + 16
    return per_layer, head


def activation_bytes_per_token(model, *, activation_bytes: int,
                               activation_checkpointing: bool = False,
                               num_tokens: int | None = None) -> int:
    """Saved-for-backward bytes of one token of a chunk graph: all layers plus the head;
    with ``activation_checkpointing`` each layer keeps its input only. ``num_tokens``: the
    chunk's, whose size decides the head's path (:func:`fused_head`); ``None``: the plain
    path, with log-probabilities."""
    per_layer, head = _token_parts(model, activation_bytes, num_tokens)
    if activation_checkpointing:
        per_layer = activation_bytes * model.hidden_size
    return model.num_hidden_layers * per_layer + head


def kept_attention_bytes_per_token(model, *, activation_bytes: int) -> int:
    """What a selective ``s`` keeps per token until its ``r``: every layer's attention output
    and float32+ LSE."""
    b, a = activation_bytes, max(activation_bytes, 4)
    h = model.num_attention_heads
    return model.num_hidden_layers * h * (b * model.head_dim + a)


HOST_ALIGN = 64
"""Bytes each offloaded state buffer's start is aligned to inside its pinned piece (a cache
line; any dtype's element size divides it)."""


def pinned_block_bytes(nbytes: int) -> int:
    """Bytes torch's caching host allocator (CUDA pinned memory) reserves for a request of
    ``nbytes``: the next power of two. It never splits a block, and keeps freed blocks for
    requests of the same power of two (``CachingHostAllocatorImpl::allocate``,
    ``c10::llvm::PowerOf2Ceil``, aten/src/ATen/core/CachingHostAllocator.h)."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def host_pieces(buffer_bytes: list[int]) -> list[tuple[int, int]]:
    """How the offloaded state's buffers (bytes each, in order) are laid out in pinned memory:
    ``(number of buffers, bytes)`` per allocation, each buffer starting at a multiple of
    ``HOST_ALIGN``.

    One allocation per buffer would be rounded up to a power of two each (up to 2x); one for
    all, once (still up to 2x). Instead each piece takes as many of the next buffers as fit in
    the largest power of two not above what is left, so its rounding wastes less than one
    buffer; the last piece, where one buffer is more than half of what is left, takes all the
    rest (its rounding costs the same as that buffer's alone). At 7B (28 layers) and 256K
    positions the waste is 0; with sizes that are not powers of two, about a buffer per piece,
    ``log2(number of buffers)`` pieces at most."""
    sizes = [-(-n // HOST_ALIGN) * HOST_ALIGN for n in buffer_bytes]
    pieces, i = [], 0
    while i < len(sizes):
        remaining = sum(sizes[i:])
        room = 1 << (remaining.bit_length() - 1)  # the largest power of two <= remaining
        j, used = i, 0
        while j < len(sizes) and used + sizes[j] <= room:
            used += sizes[j]
            j += 1
        if j == i:  # the next buffer alone exceeds room: take everything left
            j, used = len(sizes), remaining
        pieces.append((j - i, used))
        i = j
    return pieces


def offloaded_state_buffers(model, num_positions: int, *, activation_bytes: int,
                            extra_rows: int = 0, with_grads: bool = True) -> list[int]:
    """Bytes of an offloaded chain state's host buffers, in the runtime's order: per layer,
    keys and values (``num_positions + extra_rows`` rows in the key dtype), then their
    gradients (``num_positions`` rows, float32 or wider)."""
    b, a = activation_bytes, max(activation_bytes, 4)
    row = model.num_key_value_heads * model.head_dim
    kv, grad = (num_positions + extra_rows) * row * b, num_positions * row * a
    per_layer = [kv, kv] + ([grad, grad] if with_grads else [])
    return per_layer * model.num_hidden_layers


def offloaded_state_host_bytes(model, num_positions: int, *, activation_bytes: int,
                               extra_rows: int = 0, pinned: bool = True) -> int:
    """Host memory an offloaded chain state takes: its pieces (:func:`host_pieces`), each
    rounded as the pinned allocator does (``pinned=False``: pageable memory, exact)."""
    if num_positions <= 0:
        return 0
    pieces = host_pieces(offloaded_state_buffers(model, num_positions,
                                                 activation_bytes=activation_bytes,
                                                 extra_rows=extra_rows))
    return sum(pinned_block_bytes(n) if pinned else n for _, n in pieces)


def state_extra_rows(attention_backend: str, device_type: str, activation_bytes: int,
                     chunk_size: int) -> int:
    """Key/value rows a chain state holds past its prefix, ``estimate_peak_memory``'s
    ``state_extra_rows``: a chunk in the CUDA varlen kernel's layout (its ``state_capacity``),
    which runs 16-bit compute by name (``varlen``) or by ``auto`` (where the build and the head
    dim allow it: counted there), else 0."""
    varlen = (device_type == "cuda" and activation_bytes == 2
              and attention_backend in ("auto", "varlen"))
    return chunk_size if varlen else 0


def kept_attention_host_bytes(model, num_tokens: int, *, activation_bytes: int,
                              pinned: bool = True) -> int:
    """Host memory one chunk's kept attention outputs take under ``offload="all"``: every
    layer's output and float32+ LSE, in order, laid out in pieces (:func:`host_pieces`) as the
    runtime allocates them, each rounded as the pinned allocator does."""
    if num_tokens <= 0:
        return 0
    b, a = activation_bytes, max(activation_bytes, 4)
    h = model.num_attention_heads
    buffers = [num_tokens * h * model.head_dim * b, num_tokens * h * a] * model.num_hidden_layers
    return sum(pinned_block_bytes(n) if pinned else n for _, n in host_pieces(buffers))


def kv_state_bytes(model, num_positions: int, *, activation_bytes: int) -> int:
    """Key/value state of ``num_positions`` positions (all layers) plus its float32+ gradients."""
    b, a = activation_bytes, max(activation_bytes, 4)
    return (2 * model.num_hidden_layers * model.num_key_value_heads * model.head_dim
            * num_positions * (b + a))


RECOMPUTE_MODES = ("full", "selective")
OFFLOAD_MODES = ("none", "state", "all")


def estimate_peak_memory(model, plan: ChunkPlan, *, k: int, param_bytes: int = 4,
                         activation_bytes: int | None = None,
                         optimizer: str = "adamw", recompute: str = "full",
                         offload: str = "none",
                         activation_checkpointing: bool = False,
                         state_extra_rows: int = 0,
                         trainable_params: int | None = None) -> MemoryEstimate:
    """Peak memory of one step of ``plan`` with ``k`` retained chunk graphs (see module docstring).

    ``param_bytes``: bytes per parameter (and gradient) element; ``activation_bytes``: bytes per
    activation element, default ``param_bytes`` (fewer: bf16 autocast); ``optimizer``: a key of
    ``OPTIMIZER_STATES``; ``recompute``/``offload``/``activation_checkpointing``: the engine's
    options of the same names. ``state_extra_rows``: key/value rows a chain state holds past its
    prefix, the attention kernel's ``state_capacity`` less the prefix (``chunk_size`` for the
    CUDA varlen kernel, 0 for the others); priced in ``host`` only. ``trainable_params``: LoRA's
    trained parameters (adapters, in float32 or wider, on top of ``model.num_params`` frozen
    ones); ``None``: every parameter trains.
    """
    k = check_positive_int("k", k)
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={recompute!r}; valid: {', '.join(RECOMPUTE_MODES)}")
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload={offload!r}; valid: {', '.join(OFFLOAD_MODES)}")
    param_bytes = check_positive_int("param_bytes", param_bytes)
    activation_bytes = check_positive_int(
        "activation_bytes", param_bytes if activation_bytes is None else activation_bytes)
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer={optimizer!r}; valid: {', '.join(OPTIMIZER_STATES)}")
    missing = [name for name in _MODEL_FIELDS if not hasattr(model, name)]
    if missing:
        raise ValueError(f"model {type(model).__name__} lacks {', '.join(missing)}; pass a "
                         f"chunkflow.models.ModelConfig or an object with its attributes")
    if not isinstance(plan, ChunkPlan):
        raise ValueError(f"plan must be a ChunkPlan from build_chunks, got {type(plan).__name__}")

    # Candidate moments of the step: (tokens of each live graph, positions of live KV state,
    # the chunks whose attention outputs are kept for a selective recompute, by token count,
    # whether a backward ran before it). The first chunk of the plan (a chain: its last
    # forward) runs before any backward, so before any gradient exists.
    selective = recompute == "selective"
    first = plan.chunks[0] if plan.chunks else None
    moments = [((c.num_tokens,), 0, (), c is not first) for c in plan.chunks
               if c.chain_id is None]
    for chain in plan.chains:
        tokens = [plan.chunks[i].num_tokens for i in chain.chunk_ids]
        state = plan.chunks[chain.chunk_ids[-1]].segments[0].start  # before the last chunk
        num_kept = min(k, len(tokens))
        recomputed = tuple(tokens[:-num_kept])
        kept = tuple(tokens[-num_kept:])
        moments.append((kept, state, recomputed if selective else (),
                        first.chain_id != chain.chain_id))  # after the last F
        for i in range(num_kept - 1, 0, -1):  # each later B of a kept chunk: gradients exist
            moments.append((kept[:i], state, recomputed if selective else (), True))
        for j, n in enumerate(recomputed):  # each R j: one graph, the outputs of 0..j-1
            moments.append(((n,), state, recomputed[:j] if selective else (), True))

    def graph_bytes(num_tokens: int) -> int:
        return num_tokens * activation_bytes_per_token(
            model, activation_bytes=activation_bytes,
            activation_checkpointing=activation_checkpointing, num_tokens=num_tokens)

    transient = (_token_parts(model, activation_bytes)[0] * max(c.num_tokens for c in plan.chunks)
                 if activation_checkpointing else 0)
    kept_per_token = kept_attention_bytes_per_token(model, activation_bytes=activation_bytes)
    layers = model.num_hidden_layers
    b, a = activation_bytes, max(activation_bytes, 4)
    # offloaded: 2 layers of keys/values on the device (module docstring)
    state_share = min(2, layers) * b / (layers * (b + a)) if offload != "none" else 1.0

    def parts(m) -> tuple[int, int, int, int]:
        """(activations, device state, device kept outputs, host) of a moment."""
        state = kv_state_bytes(model, m[1], activation_bytes=activation_bytes)
        kept = sum(m[2]) * kept_per_token
        on_device = round(state * state_share)
        host = (offloaded_state_host_bytes(model, m[1], activation_bytes=activation_bytes,
                                           extra_rows=state_extra_rows)
                if offload != "none" else 0)
        if offload == "all":  # each kept chunk's outputs in their own pinned pieces
            host += sum(kept_attention_host_bytes(model, n, activation_bytes=activation_bytes)
                        for n in m[2])
            kept = 0
        return sum(graph_bytes(n) for n in m[0]), on_device, kept, host

    of = {id(m): parts(m) for m in moments}  # each moment's parts, computed once
    peak = max(moments, key=lambda m: sum(of[id(m)][:3]))
    activations, kv_state, kept, _ = of[id(peak)]
    host = max(p[3] for p in of.values())

    # Static parts. LoRA: frozen weights in the parameter dtype, adapters (and their gradients
    # and optimizer state) in float32 or wider, as peft keeps them.
    num_params = model.num_params
    lora = trainable_params is not None
    trained_bytes = max(param_bytes, 4) if lora else param_bytes
    trained = trainable_params if lora else num_params
    weights = num_params * param_bytes + (trained * trained_bytes if lora else 0)
    grads = trained * trained_bytes
    optimizer_state = trained * OPTIMIZER_STATES[optimizer] * trained_bytes
    optimizer_transient = trained * trained_bytes if OPTIMIZER_STATES[optimizer] else 0
    # bf16 autocast casts every matmul's weight (the head's, not the embedding lookup's):
    # trained weights once per step (autocast caches the casts of leaves that need a
    # gradient), frozen ones at every use, each kept by the graph that saved it.
    cast = 0
    if activation_bytes < param_bytes:
        embedding = 0 if getattr(model, "tie_word_embeddings", False) else (
            model.vocab_size * model.hidden_size)
        cast = (num_params - embedding) * activation_bytes

    def device(m) -> int:
        """The device's bytes at a moment: static parts, its step parts and transient."""
        copies = cast * (len(m[0]) if lora else 1)
        return (weights + copies + (grads if m[3] else 0) + optimizer_state
                + sum(of[id(m)][:3]) + transient)

    at = max(moments, key=device)
    peak_bytes, peak_at = device(at), ("a chunk's backward" if at[3] else
                                       "the first chunk's backward, before any gradient exists")
    at_optimizer = weights + grads + optimizer_state + optimizer_transient
    if at_optimizer > peak_bytes:
        peak_bytes, peak_at = at_optimizer, "the optimizer step"
    return MemoryEstimate(
        weights=weights,
        grads=grads,
        optimizer_state=optimizer_state,
        activations=activations,
        kv_state=kv_state,
        peak_tokens=sum(peak[0]),
        kept_attention=kept,
        host=host,
        transient=transient,
        weight_copies=cast * (len(at[0]) if lora else 1),
        optimizer_transient=optimizer_transient,
        peak_bytes=peak_bytes,
        peak_at=peak_at,
    )

