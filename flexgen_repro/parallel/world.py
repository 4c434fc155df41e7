"""Who this process is among several (rank, world size, local rank), the process group it joins,
and the devices it computes and communicates on.

Ranks come from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
from Open MPI's (OMPI_COMM_WORLD_*, with `--use-mpi`), or from explicit flags; they are read when
a run starts, never at import. NCCL carries tensors between GPUs; gloo between CPUs (and wherever
the communication device is the host).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

COMM_DEVICES = ("gpu", "cpu")
# How long a rank waits for the others (a collective or a receive) before failing
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """One process's place: `rank` of `size`, `local_rank` on its node."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size or self.local_rank < 0:
            raise ValueError(f"invalid rank {self.rank} / world size {self.size} / local rank "
                             f"{self.local_rank}; launch with torchrun --nproc-per-node N")

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1


def _env_int(names: tuple[str, ...]) -> int | None:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return None


def world_from_env(use_mpi: bool = False, rank: int | None = None, size: int | None = None,
                   local_rank: int | None = None) -> World:
    """This process's World: explicit values first, then Open MPI's (use_mpi) or torchrun's
    variables; a process started alone is rank 0 of 1."""
    prefix = ("OMPI_COMM_WORLD_",) if use_mpi else ("",)
    if rank is None:
        rank = _env_int(tuple(p + "RANK" for p in prefix))
    if size is None:
        size = _env_int(tuple(p + "SIZE" for p in prefix) if use_mpi else ("WORLD_SIZE",))
    if local_rank is None:
        local_rank = _env_int(tuple(p + "LOCAL_RANK" for p in prefix))
    rank = rank or 0
    return World(rank=rank, size=size or 1, local_rank=rank if local_rank is None else local_rank)


def compute_device(world: World) -> str:
    """The device this rank computes on: cuda:LOCAL_RANK where CUDA exists, else the host."""
    if not torch.cuda.is_available():
        return "cpu"
    if world.local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {world.local_rank} needs GPU {world.local_rank}, but this node "
                         f"has {torch.cuda.device_count()}; use --nproc-per-node <= that")
    return f"cuda:{world.local_rank}"


def backend_for(comm_device: str) -> str:
    """NCCL where tensors travel between GPUs, gloo where they travel through host memory."""
    if comm_device not in COMM_DEVICES:
        raise ValueError(f"--comm-device must be one of {COMM_DEVICES}, got {comm_device!r}")
    return "nccl" if comm_device == "gpu" and torch.cuda.is_available() else "gloo"


def comm_torch_device(comm_device: str, world: World) -> torch.device:
    """Where tensors sit while they cross between ranks."""
    if backend_for(comm_device) == "nccl":
        return torch.device(f"cuda:{world.local_rank}")
    return torch.device("cpu")


@contextlib.contextmanager
def process_group(world: World, backend: str, init_method: str | None = None,
                  timeout: datetime.timedelta = TIMEOUT):
    """Join the process group of `world` for the `with` block (nothing for a world of one);
    leave it afterwards, also after a failure."""
    if world.size == 1 or dist.is_initialized():
        yield
        return
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    kwargs = {"init_method": init_method} if init_method else {}
    dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size,
                            timeout=timeout, **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


def init_method(head_ip: str | None, port: int | None) -> str | None:
    """`--head-ip --port` as a TCP rendezvous; None: torchrun's (MASTER_ADDR, MASTER_PORT)."""
    if head_ip is None and port is None:
        return None
    if head_ip is None or port is None:
        raise ValueError("--head-ip and --port go together (or neither, under torchrun)")
    return f"tcp://{head_ip}:{port}"


def gather_objects(world: World, obj) -> list:
    """`obj` of every rank, in rank order (on every rank)."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
