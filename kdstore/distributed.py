"""torch.distributed plumbing for `torchrun ... -m kdstore train`: process group, rank, reductions."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdstore.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, *values: float) -> list[float]:
        """Sum scalars over ranks (float64 on CPU tensors for gloo, on the device for nccl)."""
        if not self.active:
            return list(values)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return [float(v) for v in t.tolist()]


def _shutdown() -> None:
    if dist.is_initialized():
        # Meet the other ranks first: a rank whose peers have already torn their gloo sockets down can abort in
        # its own teardown (SIGABRT, "terminate called without an active exception"), seen under load.
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()


def exit_process(code: object) -> None:
    """Leave a torchrun process at once after the other ranks (its command finished with exit status `code`):
    meet them at a barrier, flush stdout and stderr, then `os._exit`, skipping the process group's teardown. Left
    to `destroy_process_group` and interpreter teardown, a rank whose peer closed its gloo sockets first can still
    abort in a C++ destructor under load ("terminate called without an active exception", SIGABRT) after its
    work is done and written. A no-op without a process group (every run outside torchrun)."""
    if not dist.is_initialized():
        return
    with contextlib.suppress(Exception):
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


def init(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group if launched by torchrun (WORLD_SIZE > 1); pick this rank's GPU.

    Backend: NCCL for CUDA, gloo for CPU. Returns the context and the device this rank should use.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistContext(), device
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise ConfigError("WORLD_SIZE > 1 but RANK/MASTER_ADDR are not set; launch with torchrun "
                          "(torchrun --nproc-per-node N -m kdstore train ...)")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs; "
                              "use --nproc-per-node <= the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        # Shut the group down before the interpreter does: left to interpreter teardown, gloo's threads are
        # destroyed while running and the process aborts ("terminate called without an active exception").
        atexit.register(_shutdown)
    return DistContext(dist.get_rank(), dist.get_world_size()), device
