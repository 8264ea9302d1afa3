"""Multi-process test scaffolding (gloo on CPU) shared by test_ddp, test_fsdp and test_readme:
the process group a worker runs in, and spawning the workers with a deadline."""
import contextlib
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int, **env: str):
    """This process as rank `rank` of a gloo group, one intra-op thread (the ranks share the
    cores); `env` adds variables a launcher would set, before the group is made."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn(worker, world: int, out_dir, seconds: int) -> None:
    """Run worker(rank, world, port, out_dir) on `world` processes; fail the test when they have
    not finished after `seconds`."""
    context = mp.spawn(worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=False)
    deadline = time.monotonic() + seconds
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{worker.__module__}.{worker.__name__} did not finish on {world} processes within {seconds} s")
