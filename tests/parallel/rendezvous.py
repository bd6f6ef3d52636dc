"""A stage transport for gloo with NCCL's rendezvous, so a CPU run of an op order that would
hang on GPUs fails instead of passing.

gloo buffers every send; NCCL does not: a send completes only when the peer's matching receive
runs, and a rank's batched posts run on one stream in the order posted. This transport gives
gloo the same rules: every send waits for an acknowledgement the receiver sends once its
receive completed (tag 1; the data travels on tag 0), and a post starts only once the rank's
previous post completed. Posts on a channel (``P2PStageIO(channels=True)``) use tags of
their own (``F`` 2/3, ``B`` 4/5) and do not wait for the previous post: a channel carries one
direction to one peer, whose messages match in order whatever the stream does. A wait that exceeds ``timeout_s`` raises an error that names the op,
the peer and the reason.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

DATA, ACK = 0, 1


class RendezvousTransport:
    """:class:`chunkflow.parallel.pipeline.BatchedP2P`'s interface, on gloo, NCCL's rules."""

    def __init__(self, group=None, *, timeout_s: float = 10.0):
        self.group, self.timeout_s = group, timeout_s
        self._last = {}  # stream -> its previous post and ops: it must complete before the next

    def post(self, ops, channel=None):
        stream = None if channel is None else (channel, ops[0][0].peer)
        data = DATA if channel is None else {"F": 2, "B": 4}[channel]
        if channel is None and stream in self._last:  # one stream: the previous post first
            self.wait(*self._last[stream])
        # (a channel carries one direction to one peer: its ops match in order anyway, and
        # waiting here would block the host, which NCCL's stream order does not)
        works = [(dist.isend if op.op == "send" else dist.irecv)(
            tensor, op.peer, group=self.group, tag=data) for op, tensor in ops]
        acks = [(op, torch.zeros(1), None) for op, _ in ops if op.op == "send"]
        acks = [(op, buf, dist.irecv(buf, op.peer, group=self.group, tag=data + 1))
                for op, buf, _ in acks]
        handle = {"works": works, "acks": acks, "sent": [], "done": False, "tag": data,
                  "stream": stream}
        self._last[stream] = (handle, ops)
        return handle

    def _wait(self, work, what: str) -> None:
        try:
            work.wait(datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            if "Timed out" not in str(e):
                raise
            raise RuntimeError(
                f"rank {dist.get_rank()}: the {what} waited {self.timeout_s:g} s for its "
                f"match: under NCCL (a send completes only when its receive runs, a rank's "
                f"posts run in order) this stage message order deadlocks; "
                f"chunkflow.plan.messages.check_messages replays a recorded order") from None

    def wait(self, handle, ops) -> None:
        if handle["done"]:
            return
        for (op, _), work in zip(ops, handle["works"]):
            if op.op == "recv":  # received: acknowledge it, so its sender may complete
                self._wait(work, f"receive of {op.label} from rank {op.peer}")
                handle["sent"].append(dist.isend(torch.ones(1), op.peer, group=self.group,
                                                 tag=handle["tag"] + 1))
        for op, _, ack in handle["acks"]:
            self._wait(ack, f"send of {op.label} to rank {op.peer}")
        # (a gloo work is waited once: a second wait() waits for another message)
        for (op, _), work in zip(ops, handle["works"]):
            if op.op == "send":
                work.wait()
        for work in handle["sent"]:
            work.wait()
        handle["done"] = True
        if self._last.get(handle["stream"], (None,))[0] is handle:
            del self._last[handle["stream"]]
