"""torch.distributed for recipe runs started by ``torchrun --nproc-per-node N -m prunekit run ...``.

One process per rank; the process group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``...), gloo on CPU and nccl when CUDA is available. Training wraps the model in
DistributedDataParallel (gradients averaged, so every rank applies the same update to the same weights)
and shards the shuffled training data with a DistributedSampler whose order is a function of
``(seed, epoch)``. Everything else runs on every rank on identical weights, so pruning decisions are
computed identically on every rank (a hash of the masks is compared across ranks after every round);
evaluation, latency and every file are rank 0's, while the others wait at a barrier.

Without torchrun (``WORLD_SIZE`` unset or 1) :func:`session` returns a single-process context whose
helpers do nothing, so the pipeline has one code path.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from prunekit.errors import PrunekitError


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: not distributed

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    # -- collectives (no-ops in a single process) --------------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather_strings(self, text: str) -> list[str]:
        """``text`` from every rank, in rank order (equal-length ASCII strings such as hex digests)."""
        if not self.enabled:
            return [text]
        local = torch.tensor(list(text.encode("ascii")), dtype=torch.uint8, device=self._comm_device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return [bytes(p.cpu().tolist()).decode("ascii") for p in parts]

    def sum_floats(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def broadcast_json(self, obj):
        """Rank 0's ``obj`` on every rank (as JSON bytes: no pickle between processes)."""
        if not self.enabled:
            return obj
        data = json.dumps(obj).encode() if self.main else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self._comm_device)
        dist.broadcast(size, 0)
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=self._comm_device)
        if self.main:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buf, 0)
        return json.loads(bytes(buf.cpu().tolist()).decode()) if not self.main else obj

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics, masks) on every rank."""
        if not self.enabled:
            return
        for buf in model.buffers():
            moved = buf.to(self._comm_device)
            dist.broadcast(moved, 0)
            if moved is not buf:
                buf.copy_(moved)

    @property
    def _comm_device(self) -> torch.device:
        return self.device

    # -- training ----------------------------------------------------------------------------------------
    def train_loader(self, dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
        """This rank's shard of the shuffled training data; the order depends only on (seed, epoch)."""
        sampler = DistributedSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed, drop_last=False
        )
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler)

    @contextmanager
    def wrap(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model to train: DDP-wrapped on this rank's device when distributed, else itself.

        DDP broadcasts rank 0's parameters and buffers when it is built and its buffers before every
        forward (``broadcast_buffers``); after the last step the buffers are broadcast once more so
        BatchNorm statistics agree on every rank, and the model goes back to the CPU.
        """
        if not self.enabled:
            yield model
            return

        model.to(self.device)
        ids = [self.local_rank] if self.device.type == "cuda" else None

        # rank 0's buffers before every forward; torch 2.13 renamed broadcast_buffers to forward_sync_buffers
        new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        sync = {"forward_sync_buffers" if new_name else "broadcast_buffers": True}
        ddp = DistributedDataParallel(model, device_ids=ids, **sync)
        try:
            yield ddp
        finally:
            self.broadcast_buffers(model)
            model.to("cpu")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise PrunekitError(f"environment variable {name} must be an integer, got {value!r}") from None


@contextmanager
def session() -> Iterator[DistributedContext]:
    """The run's distributed context, from torchrun's environment; the process group it starts is
    destroyed on exit (one already started by the caller is used and left alone)."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        yield DistributedContext()
        return
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    started = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        try:
            dist.init_process_group(backend=backend, init_method="env://")
        except (RuntimeError, ValueError) as exc:
            raise PrunekitError(
                f"cannot start torch.distributed ({backend}) from the environment: {exc}"
            ) from None
        started = True
    backend = dist.get_backend()
    try:
        yield DistributedContext(rank=rank, world_size=world, local_rank=local, backend=str(backend))
        if started:
            # every rank done with every collective before any tears the group down (rank 0 hosts the
            # store); without it, CI once saw rank 1 abort at exit in gloo ('terminate called without an
            # active exception'), not reproduced in 6 loaded runs here
            dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()


__all__ = ["DistributedContext", "session"]
