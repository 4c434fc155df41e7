"""What crosses between pipeline stages: each stage's last hidden states go to the next stage,
and the last stage's picked ids go back to the first (its embedding needs them for the next
token). Messages between two ranks arrive in the order they were sent, so both sides walk the
same (token, micro-batch, GPU batch) order and no tags are needed.

Sends are asynchronous (isend): a stage goes on computing while its output travels. A send is
never waited on before the end of a block: it completes only once its receiver has asked for it,
and waiting earlier could close a cycle of waits around the ring of stages. With `async_comm`,
the next message a stage expects is posted (irecv) as soon as the current one arrives, so it
lands while the stage computes.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from flexgen_repro.parallel.world import World


class StageLink:
    """Sends and receives of one pipeline stage. A world of one has nothing to send."""

    def __init__(self, world: World, comm_device: torch.device, compute_device: torch.device,
                 async_comm: bool = False):
        self.world, self.comm, self.dev, self.async_comm = world, comm_device, compute_device, async_comm
        self.prev = (world.rank - 1) % world.size
        self.next = (world.rank + 1) % world.size
        self.pending: deque = deque()
        self.posted: deque = deque()    # (shape, dtype, source, buffer, work) expected next

    @property
    def alone(self) -> bool:
        return self.world.size == 1

    def send(self, tensor: torch.Tensor, to: int) -> None:
        """Queue `tensor` to rank `to` (it is copied to the communication device first)."""
        buf = tensor.detach().to(self.comm).contiguous()
        self.pending.append((buf, dist.isend(buf, to)))
        while self.pending and self.pending[0][1].is_completed():
            self.pending.popleft()  # its tensor may go

    def receive(self, shape: tuple[int, ...], dtype: torch.dtype, source: int,
                then: tuple[tuple[int, ...], torch.dtype, int] | None = None) -> torch.Tensor:
        """The next tensor from `source`, on the compute device. With async_comm, `then` (shape,
        dtype, source) of the message after it is posted before this one is waited on."""
        if not self.posted:
            self._post(shape, dtype, source)
        got_shape, got_dtype, got_source, buf, work = self.posted.popleft()
        if (got_shape, got_dtype, got_source) != (tuple(shape), dtype, source):
            raise RuntimeError(f"pipeline out of step: expected {shape} {dtype} from rank {source}, "
                               f"posted {got_shape} {got_dtype} from rank {got_source}")
        if self.async_comm and then is not None:
            self._post(*then)
        work.wait()
        return buf.to(self.dev)

    def _post(self, shape, dtype, source: int) -> None:
        buf = torch.empty(tuple(shape), dtype=dtype, device=self.comm)
        self.posted.append((tuple(shape), dtype, source, buf, dist.irecv(buf, source)))

    def flush(self) -> None:
        """Every send done (before the tensors they hold may go)."""
        while self.pending:
            self.pending.popleft()[1].wait()
