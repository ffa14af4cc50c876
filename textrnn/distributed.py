"""Distributed training helpers: the process group torchrun asks for, and the few collectives the
loop needs so that every rank takes the same branch (stop, skip, evaluate) at the same step.

Without torchrun's variables everything here is a no-op on a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .model import State
from .runtime import resolve_device



@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # train() made the process group, so it destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """A process group when torchrun's variables are set; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(), resolve_device(device_name)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()  # a caller's own group is used and left alone
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, owns_group), device


def reduce_step(bad: bool, loss: float, dist_info: Dist, device: torch.device) -> tuple[bool, float]:
    """Whether any rank had a bad step (so all skip it), and the loss averaged over the ranks' streams
    (this rank's own loss after a bad step): one all-reduce."""
    if not dist_info.enabled:
        return bad, loss
    import torch.distributed as dist

    value = torch.tensor([1.0 if bad else 0.0, 0.0 if bad else loss], dtype=torch.float64, device=device)
    dist.all_reduce(value)
    if value[0] > 0:
        return True, loss
    return False, float(value[1]) / dist_info.world_size


def agree(elapsed: float, flag: bool, dist_info: Dist, device: torch.device) -> tuple[float, bool]:
    """The largest elapsed time of all ranks, and whether ``flag`` is true on any rank (one all-reduce)."""
    if not dist_info.enabled:
        return elapsed, flag
    import torch.distributed as dist

    value = torch.tensor([elapsed, 1.0 if flag else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value[0]), bool(value[1] > 0)


def barrier(dist_info: Dist) -> None:
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()


def broadcast(value, dist_info: Dist):
    """Rank 0's value of a small JSON-like object, on every rank (an exception travels as a message)."""
    if not dist_info.enabled:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_hidden(hidden: State, dist_info: Dist) -> State:
    """The hidden state of every rank's streams, concatenated along the batch in rank order."""
    if not dist_info.enabled:
        return hidden
    import torch.distributed as dist

    gathered = []
    for h in hidden:
        parts = [torch.empty_like(h) for _ in range(dist_info.world_size)]
        dist.all_gather(parts, h.contiguous())
        gathered.append(torch.cat(parts, dim=1))
    return tuple(gathered)


def gather_rng(dist_info: Dist, device: torch.device) -> dict[str, torch.Tensor]:
    """Every rank's RNG states (dropout masks differ per rank), as ``rng.torch[.RANK]`` tensors."""
    states = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["rng.cuda"] = torch.cuda.get_rng_state(device)
    if not dist_info.enabled:
        return states
    import torch.distributed as dist

    gathered = {}
    for name, value in states.items():
        value = value.to(device)  # nccl gathers device tensors only
        parts = [torch.empty_like(value) for _ in range(dist_info.world_size)]
        dist.all_gather(parts, value)
        gathered.update({f"{name}.{rank}": part.cpu() for rank, part in enumerate(parts)})
    return gathered
