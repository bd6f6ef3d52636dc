"""A chunk's backward in two passes, for the zero-bubble schedules' ``I`` and ``W`` actions.

:func:`input_backward` (``I``) runs autograd from the chunk's output down to the stage input
only: every node on a path to the input runs, the attention backwards included (they add the
key/value gradients to the chain state), and the input's ``.grad`` is what the previous stage
waits for. No parameter gradient is computed. The graph is kept, and so is, for each *split
node* (a node on a path to the input with a branch that leads only to parameters, e.g. the
matmul of ``x @ W.T``), the gradient that arrived at it.

:func:`weight_backward` (``W``) runs autograd again from the split nodes, with those gradients,
to the parameters only: each split node computes just its parameter-side outputs, and what lies
below it on the parameters' side (transposes, casts, LoRA's adapters) runs as usual, so the
gradients accumulate into ``.grad`` (with every hook a parameter has) exactly as one backward
would. The graph is freed then.

Cost: the split nodes' parameter-side work moves from ``I`` to ``W``; nothing runs twice,
except where a split node is one custom autograd Function that computes all its gradients at
once (the fused head loss): its ``W`` runs its backward again. Host work per chunk: one graph
walk in ``I`` to find the split nodes, and one autograd pass per level of split nodes in ``W``,
each of which walks the graph below it (so it grows with the square of the stage's depth).
This is the approach of torch's pipelining (``stage_backward_input`` /
``stage_backward_weight``), written on autograd's public graph API
(``torch.autograd.graph``: ``Node.next_functions``, ``register_prehook``, ``GradientEdge``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge


@dataclass
class WeightWork:
    """What a ``W`` needs from its ``I``: per level of split nodes, their edges with the
    gradients that reached them and the parameters below them. Holding it keeps the graph
    alive."""

    passes: list[tuple[list[GradientEdge], list[torch.Tensor], list[torch.Tensor]]] = field(
        default_factory=list)
    """(edges, their gradients, the parameters they lead to) per autograd pass."""
    roots: list[torch.Tensor] = field(default_factory=list)
    """Tensors that keep the graph alive until the ``W`` (the chunk's output)."""

    def add(self, edges: list[GradientEdge], grads: list[torch.Tensor],
            params: list[torch.Tensor]) -> None:
        if edges and params:
            self.passes.append((edges, grads, params))


class EmbeddingLeaf:
    """``with EmbeddingLeaf(embedding):`` the embedding's next output is replaced by a leaf
    that requires grad (``leaf``), so a first stage's ``I`` stops there; its own backward, from
    ``output`` with the leaf's gradient, is part of the ``W``."""

    def __init__(self, embedding: torch.nn.Module | None):
        if embedding is None:
            raise ValueError("the model has no input_embedding(): a zero-bubble schedule's "
                             "first stage needs it (chunkflow.runtime.chunk_call.ChunkModel)")
        self.embedding = embedding
        self.leaf: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def _swap(self, module, args, output):
        self.output, self.leaf = output, output.detach().requires_grad_()
        return self.leaf

    def __enter__(self) -> "EmbeddingLeaf":
        self._handle = self.embedding.register_forward_hook(self._swap)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def input_backward(output: torch.Tensor, grad_output: torch.Tensor | None,
                   inputs: list[torch.Tensor], params: Iterable[torch.Tensor]) -> WeightWork:
    """Backward of ``output`` (with ``grad_output``; None for a scalar loss) to ``inputs``
    (leaf tensors; their ``.grad`` accumulates) only; returns what :func:`weight_backward`
    needs for the parameter gradients of ``params`` (those that require grad)."""
    work = WeightWork(roots=[output])
    if output.grad_fn is None:  # nothing before the output trains
        return work
    by_node = {get_gradient_edge(p).node: p for p in params if p.requires_grad}
    input_nodes = {get_gradient_edge(x).node for x in inputs}
    splits = _split_nodes(output.grad_fn, input_nodes, set(by_node))
    captured: dict[Node, tuple] = {}

    def capture(node: Node):
        def hook(grad_outputs):
            captured[node] = grad_outputs
        return hook

    handles = [node.register_prehook(capture(node)) for node, _, _ in splits]
    try:
        torch.autograd.backward([output], None if grad_output is None else [grad_output],
                                inputs=list(inputs), retain_graph=True)
    finally:
        for h in handles:
            h.remove()
    levels: dict[int, tuple[list, list, list]] = {}
    for node, below, level in splits:  # one weight pass per level (module docstring)
        grads = captured.get(node, ())
        edges, grads_in, params = levels.setdefault(level, ([], [], []))
        edges += [GradientEdge(node, i) for i, g in enumerate(grads) if g is not None]
        grads_in += [g for g in grads if g is not None]
        params += [by_node[n] for n in below]
    for level in sorted(levels):
        work.add(*levels[level])
    return work


def weight_backward(work: WeightWork) -> None:
    """The parameter gradients :func:`input_backward` left; frees the graph. One autograd
    pass per *level* of split nodes, to their own parameters only (a pass to every parameter
    at once would also run the split nodes' input side again, down to the parameters of the
    layers below, and count their gradients twice). A split node's level is one more than the
    highest level below it, so no split node of a level lies below another: in their pass
    the input side leads to none of the pass's parameters and does not run."""
    for edges, grads, params in work.passes:
        torch.autograd.backward(edges, grads, inputs=params)
    work.passes.clear()
    work.roots.clear()


def _split_nodes(root: Node, input_nodes: set[Node], param_nodes: set[Node]
                 ) -> list[tuple[Node, list[Node], int]]:
    """Nodes on a path from ``root`` to an input with a child that leads to a parameter but not
    to an input (module docstring), each with the parameters' nodes below those children and
    its level (:func:`weight_backward`), in a deterministic order. Raises if a parameter sits
    below two of them (a weight used twice in the stage): its weight passes would overlap."""
    to_input: dict[Node, bool] = {}
    to_param: dict[Node, bool] = {}
    height: dict[Node, int] = {}  # the highest split-node level at or below the node
    order: list[Node] = []
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:  # iterative post-order: a deep stage's graph exceeds Python's recursion limit
        node, expanded = stack.pop()
        if node in to_input:
            continue
        children = [c for c, _ in node.next_functions if c is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in to_input)
            continue
        to_input[node] = node in input_nodes or any(to_input[c] for c in children)
        to_param[node] = node in param_nodes or any(to_param[c] for c in children)
        below = max((height[c] for c in children), default=0)
        is_split = to_input[node] and any(to_param[c] and not to_input[c] for c in children)
        height[node] = below + 1 if is_split else below
        order.append(node)
    splits, owner = [], {}
    for node in order:
        if not to_input[node]:
            continue
        weight_side = [c for c, _ in node.next_functions
                       if c is not None and to_param[c] and not to_input[c]]
        if not weight_side:
            continue
        below, seen = [], set()
        todo = list(weight_side)
        while todo:  # the weight-only region below the node (casts, transposes, adapters)
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in param_nodes:
                if owner.setdefault(n, node) is not node:
                    raise ValueError("a zero-bubble schedule's split backward found a "
                                     "parameter used twice in one pipeline stage (shared "
                                     "weights); run it with --parallel.schedule=1f1b")
                below.append(n)
            todo.extend(c for c, _ in n.next_functions if c is not None and to_param[c])
        splits.append((node, below, height[node]))
    return splits
