"""Where a process computes: the device, the precision and its place in a torchrun job.

Training asks ``setup_runtime(train_config)`` for a ``Runtime`` (device, precision, rank,
world size); inference asks ``inference_device(name)`` for a device name and, under
``torchrun``, ``join_torchrun(device)`` for this process's ``Shard`` of the input. Both join
the process group themselves when RANK/WORLD_SIZE/LOCAL_RANK are in the environment: NCCL on
CUDA, Gloo on a CPU, with ``cuda:LOCAL_RANK`` as the GPU of a CUDA run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from mtkit.errors import MtkitError, check_cuda_index

if TYPE_CHECKING:
    from mtkit.config import TrainConfig


@dataclass
class Runtime:
    """Where and how this process trains."""

    device: torch.device
    precision: str  # fp32, bf16 or fp16 (resolved from "auto")
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum numbers over ranks (identity without distribution)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()


@dataclass
class Shard:
    """This process's part of a multi-process translation: ``rank`` of ``world``;
    ``gather(part)`` returns every rank's part (in rank order) on rank 0, None elsewhere.
    (The parts are lists of ``mtkit.translate.Translation``.)"""

    rank: int
    world: int
    gather: Callable[[list[Any]], list[list[Any]] | None]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX, Arm BF16): there
    bf16 autocast trains faster than fp32; elsewhere it is emulated and many times slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    return False


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Join the process group under torchrun, pick the device and the precision of training
    (``train.device``, ``train.precision``, ``train.threads``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise MtkitError(f"train.device={cfg.device}: no CUDA device available")
    if device.type == "cuda":
        assert device.index is not None  # set above
        check_cuda_index(device.index, f"train.device={cfg.device}")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    precision = cfg.precision
    if precision == "auto" and device.type == "cuda":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    elif precision == "auto":
        precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise MtkitError("train.precision=fp16 needs a CUDA device; use fp32 (or bf16) on a CPU")
    return Runtime(device=device, precision=precision, rank=rank, world=world)


def inference_device(name: str) -> str:
    """The device to translate on for ``--device NAME`` (cpu, cuda, cuda:N or auto; auto is
    cuda when CUDA is available, else cpu). MtkitError for a malformed name or a CUDA device
    this machine does not have."""
    from mtkit.config import DEVICE_NAME

    if not DEVICE_NAME.fullmatch(name):
        raise MtkitError(f"--device {name}: expected cpu, cuda, cuda:N or auto")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MtkitError(f"--device {name}: CUDA is not available on this machine")
    if name.startswith("cuda:"):
        check_cuda_index(int(name.removeprefix("cuda:")), f"--device {name}")
    return name


def join_torchrun(device: str) -> tuple[str, Shard | None]:
    """Under torchrun (WORLD_SIZE > 1): join the process group and return this rank's device
    (``cuda:LOCAL_RANK`` for a CUDA ``device``) and ``Shard``; otherwise ``(device, None)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device, None
    if device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        check_cuda_index(local_rank, f"--device {device}")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank()

    def gather(part: list[Any]) -> list[list[Any]] | None:
        parts: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(part, parts, dst=0)
        return parts

    return device, Shard(rank, world, gather)


def training_device(device: str) -> str:
    """The device a ``train.device`` setting names for work outside training (the pipeline's
    test-set translation): ``auto`` is cuda when CUDA is available, else cpu."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"
