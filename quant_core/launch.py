"""Starting a job's ranks: N local processes, or the processes torchrun started on one or more machines.

``run_ranked`` is what the command line and the worker call. With ``world_size`` 1 it is
``run_job``. With more, this process becomes rank 0 (the leader: it keeps the caller's hooks, writes
the checkpoint and the report) and starts ranks 1..N-1 as fresh processes (spawned, so no CUDA or
thread state is inherited); they meet in a process group over a local TCP port. On a GPU each rank
takes its own device (``cuda`` -> ``cuda:<rank>``); on a CPU each takes an equal share of the threads
this process had.

Under torchrun (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in the environment,
also across machines with ``--rdzv-endpoint``) no process is started: :func:`torchrun_ranks` joins
the group torchrun describes and the command runs its own rank.

Every collective waits at most ``SWQUANT_COLLECTIVE_TIMEOUT`` seconds (default 600): a rank that died
ends the others' wait with an error, the leader stops the rest, and the attempt fails like any other.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from quant_core.distributed import Ranks
from quant_core.job import JobSpec
from quant_core.job_settings import check_ranks
from quant_core.pipeline import JobHooks, measure, run_job
from quant_core.report import JobReport

TIMEOUT_VARIABLE = "SWQUANT_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
FOLLOWERS_GRACE_S = 30.0  # how long the leader waits for the other ranks to end after its own part
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to kill this process when the process that started it dies: an orphaned job or rank
    would otherwise hold a device (or wait in a collective) beside the next job."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def collective_timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT_S)))


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def rank_spec(spec: JobSpec, rank: int) -> JobSpec:
    """The spec a rank runs: on CUDA, each rank on its own device."""
    return replace(spec, device=f"cuda:{rank}") if spec.device == "cuda" else spec


def _join(spec: JobSpec, rank: int, address: str, port: int) -> Ranks:
    dist.init_process_group(
        _backend(spec.device),
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=spec.world_size,
        timeout=collective_timeout(),
    )
    if spec.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(spec.device))
    return Ranks(rank, spec.world_size)


def _follow(spec: JobSpec, out_dir: Path, checkpoint_dir: Path | None, rank: int, port: int, threads: int) -> None:
    """A spawned rank: its share of the job, nothing kept but its share of the chains in the block
    checkpoint (its spilled activations, and a streamed job's blocks it scores, are removed)."""
    die_with_parent()
    torch.set_num_threads(threads)
    ranks = _join(spec, rank, "127.0.0.1", port)
    try:
        measure(spec, out_dir, JobHooks(), checkpoint_dir, ranks)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_ranked(
    spec: JobSpec, out_dir: Path, hooks: JobHooks | None = None, checkpoint_dir: Path | None = None
) -> JobReport:
    """Run ``spec`` on ``spec.world_size`` local ranks, this process being rank 0; its report."""
    if spec.world_size == 1:
        return run_job(spec, out_dir, hooks, checkpoint_dir)
    threads = max(1, torch.get_num_threads() // spec.world_size)
    port = free_port()
    context = mp.get_context("spawn")
    followers = [
        context.Process(
            target=_follow, args=(rank_spec(spec, rank), out_dir, checkpoint_dir, rank, port, threads), daemon=True
        )
        for rank in range(1, spec.world_size)
    ]
    for follower in followers:
        follower.start()
    own_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ranks = _join(rank_spec(spec, 0), 0, "127.0.0.1", port)
        try:
            report = run_job(rank_spec(spec, 0), out_dir, hooks, checkpoint_dir, ranks)
        finally:
            dist.destroy_process_group()
        for follower in followers:
            follower.join(FOLLOWERS_GRACE_S)
        failed = [f"rank {rank}" for rank, f in enumerate(followers, 1) if f.exitcode != 0]
        if failed:
            raise RuntimeError(f"world_size {spec.world_size}: {', '.join(failed)} did not finish cleanly")
        return report
    finally:
        torch.set_num_threads(own_threads)
        for follower in followers:
            if follower.is_alive():
                follower.kill()
                follower.join()


def torchrun_ranks(spec: JobSpec) -> tuple[JobSpec, Ranks] | None:
    """Under torchrun: the spec this process runs (its world size torchrun's, on CUDA its local device)
    and its ranks, with the process group joined; None outside torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return None
    lm_eval, streamed_tuning = spec.evaluation.lm_eval is not None, spec.lazy_load and spec.finetune.enabled
    check_ranks(world_size, spec.calibration.n_samples, lm_eval=lm_eval, streamed_tuning=streamed_tuning)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    spec = rank_spec(replace(spec, world_size=world_size), local_rank)
    dist.init_process_group(_backend(spec.device), rank=rank, world_size=world_size, timeout=collective_timeout())
    if spec.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(spec.device))
    return spec, Ranks(rank, world_size)


def run_torchrun(spec: JobSpec, out_dir: Path, hooks: JobHooks, checkpoint_dir: Path | None) -> JobReport | None:
    """This process's rank of a job torchrun started: the leader's report, None on the other ranks."""
    joined = torchrun_ranks(spec)
    if joined is None:
        return run_ranked(spec, out_dir, hooks, checkpoint_dir)
    spec, ranks = joined
    try:
        if ranks.leader:
            return run_job(spec, out_dir, hooks, checkpoint_dir, ranks)
        measure(spec, out_dir, JobHooks(), checkpoint_dir, ranks)
        return None
    finally:
        dist.destroy_process_group()
