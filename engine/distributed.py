"""Several processes, one job: which device and which share of the work each rank takes.

Launchers (``torchrun``, ``accelerate launch``) start one process per GPU and tell each its place through the
environment: ``RANK`` (0..WORLD_SIZE-1 over all machines), ``WORLD_SIZE`` and ``LOCAL_RANK`` (its index on this
machine). Everything here reads those variables; a plain ``python -m ...`` run is rank 0 of 1.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from engine.errors import ConfigError

T = TypeVar("T")
# Ranks wait for each other only at the start and at the end of a job; a slower rank may need hours to get there.
_GROUP_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0  # this process among all of them
    world_size: int = 1
    local_rank: int = 0  # this process among those on this machine (its GPU index)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info(env: Mapping[str, str] | None = None) -> RankInfo:
    """This process's place as the launcher set it (rank 0 of 1 without a launcher)."""
    env = os.environ if env is None else env
    try:
        info = RankInfo(rank=int(env.get("RANK", 0)), world_size=int(env.get("WORLD_SIZE", 1)),
                        local_rank=int(env.get("LOCAL_RANK", 0)))
    except ValueError as e:
        raise ConfigError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from e
    if not 0 <= info.rank < info.world_size or info.local_rank < 0:
        raise ConfigError(f"RANK {info.rank} is outside WORLD_SIZE {info.world_size} (LOCAL_RANK {info.local_rank})")
    return info


def device_for_rank(device: str, env: Mapping[str, str], cuda_count: int) -> torch.device:
    """The device a setting (``clap.device``, ``llm.device``) means for this process.

    "auto" is CUDA when there is a GPU, else the CPU. Under a launcher (``LOCAL_RANK`` set), "auto" and "cuda" mean
    this rank's own GPU, ``cuda:LOCAL_RANK``; without that every rank would load its model onto cuda:0. Where a
    launcher gives each process a single visible GPU (CUDA_VISIBLE_DEVICES per rank), or there are more ranks than
    GPUs, ranks wrap around (``LOCAL_RANK % cuda_count``). An explicit "cuda:N" is used as written.
    """
    if device == "auto":
        device = "cuda" if cuda_count > 0 else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"Unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from e
    if resolved.type != "cuda":
        return resolved
    if cuda_count == 0:
        raise ConfigError(f"device is {device!r} but this machine has no usable CUDA device; use 'auto' or 'cpu'")
    if resolved.index is not None:
        if resolved.index >= cuda_count:
            raise ConfigError(f"device is {device!r} but this machine has {cuda_count} CUDA device(s)")
        return resolved
    if "LOCAL_RANK" in env:
        return torch.device("cuda", rank_info(env).local_rank % cuda_count)
    return resolved


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def shard(items: Sequence[T], info: RankInfo) -> list[T]:
    """This rank's items: every ``world_size``-th one from its rank on, so long and short files (often grouped in a
    listing) spread evenly over the ranks and each rank's share keeps the input order."""
    return list(items[info.rank::info.world_size])


@contextlib.contextmanager
def process_group(info: RankInfo | None = None) -> Iterator[RankInfo]:
    """A gloo process group for the duration of the block when launched with several ranks (nothing otherwise).

    gloo, also on GPU machines: the group only synchronises ranks and exchanges small Python objects, which gloo does
    without tying a rank to a GPU. Each rank's CUDA work goes to its own GPU (``torch.cuda.set_device``), so
    un-indexed CUDA calls (synchronize, caches) do not all land on cuda:0.
    """
    import torch.distributed as dist

    info = info or rank_info()
    if not info.distributed:
        yield info
        return
    if cuda_device_count():
        torch.cuda.set_device(device_for_rank("cuda", os.environ, cuda_device_count()))
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=info.rank, world_size=info.world_size, timeout=_GROUP_TIMEOUT)
    try:
        yield info
    finally:
        if created:
            dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_objects(value: T) -> list[T]:
    """``value`` of every rank, in rank order, on every rank (``[value]`` in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
