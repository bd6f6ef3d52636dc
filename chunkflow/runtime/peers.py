"""What a step exchanges with its peers: pipeline stages (:class:`StageIO`) and data-parallel
replicas (:class:`GradSync`). The base classes are a single device with no peers;
``chunkflow.parallel`` implements both."""

from __future__ import annotations

import torch

from chunkflow.plan import Action, Chunk


class StageIO:
    """Where a pipeline stage's chunk inputs come from and its outputs go. This base class is a
    single device, first and last stage at once: nothing to receive or send.
    ``chunkflow.parallel`` implements it with point-to-point communication. Hidden states are
    (1, L, E) for a chunk of L tokens; under sequence parallelism, this rank's rows of it
    (1, ceil(L / tp), E)."""

    is_last_stage = True
    """Whether this stage holds the output head, and so computes the chunks' loss."""

    def start(self, action: Action) -> None:
        """Every action of a step begins here, before its receive (a stage posts the previous
        action's sends together with it)."""

    def recv_forward(self, chunk: Chunk) -> torch.Tensor | None:
        """The previous stage's output for ``chunk`` (1, L, E); None on the first stage."""
        return None

    def send_forward(self, chunk: Chunk, hidden: torch.Tensor) -> None:
        """Hand ``chunk``'s output (1, L, E) to the next stage (called on all but the last)."""

    def recv_backward(self, chunk: Chunk) -> torch.Tensor | None:
        """The gradient of this stage's output for ``chunk``; None on the last stage."""
        return None

    def send_backward(self, chunk: Chunk, grad: torch.Tensor) -> None:
        """Hand the gradient of ``chunk``'s input to the previous stage (all but the first)."""


class GradSync:
    """Data-parallel hooks around a step. This base class is a single process: nothing to do.

    * ``global_counts(num_tokens, num_sequences)``: the supervised tokens and supervised
      sequences of the whole global batch, from this rank's counts (a sum over ranks), so the
      loss normaliser is known before the first backward;
    * ``before_backward(last=...)``: called before every backward; ``last`` on the step's last;
    * ``finish()``: after the last backward, once the gradients are complete on this rank.
    """

    def global_counts(self, num_tokens: int, num_sequences: int) -> tuple[int, int]:
        return num_tokens, num_sequences

    def before_backward(self, *, last: bool) -> None:
        pass

    def finish(self) -> None:
        pass
