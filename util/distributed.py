"""Distributed data parallel helpers: process-group setup from torchrun's environment, rank-aware
reductions, and a check that every replica ends with the same weights.

Without torchrun (no WORLD_SIZE in the environment) everything degrades to one process: rank 0,
world size 1, and no process group, so the same command runs both ways.
"""
import datetime
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist

from util.cli import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise UserError(f"environment variable {name}={value!r} is not an integer (set by torchrun?)") from e


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> tuple[DistInfo, torch.device]:
    """Join the process group described by torchrun's RANK / WORLD_SIZE / LOCAL_RANK.

    `device` is the device chosen for a single process; under torchrun on CUDA each process takes
    GPU LOCAL_RANK. Backend: NCCL for CUDA, gloo for the CPU. Returns the rank info and the device
    this process trains on.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistInfo(), device
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible: "
                            f"use --nproc_per_node <= {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
    if backend == "nccl":
        kwargs["device_id"] = device  # binds the communicator to this GPU (no guessing in barrier)
    dist.init_process_group(**kwargs)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank), device


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (a no-op for a single process)."""
    if is_initialized():
        dist.destroy_process_group()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ('sum', 'min' or 'max'); identity for a single process."""
    if is_initialized():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list for a single process)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def parameter_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 of the names and exact bytes of the tensors, in the order given (16 hex digits)."""
    h = hashlib.sha256()
    for name, tensor in named_tensors:
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_replicas_in_sync(model: torch.nn.Module) -> str:
    """Compare every rank's parameter fingerprint; returns it, raises RuntimeError if ranks differ.

    DDP keeps replicas identical by construction; this end-of-training check turns a silent
    divergence (a rank that skipped a step, a missed all-reduce) into a loud failure.
    """
    fingerprints = all_gather_objects(parameter_fingerprint(model.named_parameters()))
    if len(set(fingerprints)) > 1:
        raise RuntimeError("replicas diverged: parameter fingerprints per rank " + ", ".join(fingerprints))
    return fingerprints[0]
