"""Evaluation on several processes, as OFA's scripts run it (`torch.distributed.launch`, torchrun).

Each rank evaluates a shard of the batches, the per-batch outputs of all ranks are gathered and put
back in one-process order, and every rank computes the same merged result from them; only rank 0
writes files.

Sharding is fairseq's (`get_batch_iterator(num_shards=world, shard_id=rank)`): the batches are
formed over the whole split as in one process, rank r takes batches r, r + N, r + 2N, ..., and a
rank left short gets empty batches at its end (fairseq pads with `[]`, it repeats no sample), so
each sample is evaluated exactly once. OFA's own ranks read contiguous row slices instead
(`data/file_dataset.py`) and ignore the shard arguments; both give the merged file in row order.
Sharding whole batches keeps every batch as a one-process run forms it, so the exit statistics
(their FLOPs count each batch's padded source length and share per-batch costs) are the same too.

The process group comes from the launcher's environment (WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) or from fairseq's `--distributed-init-method`,
`--distributed-world-size` and `--distributed-rank`; gloo on the CPU, nccl on CUDA.
"""
import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

T = TypeVar("T")
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"


@dataclass(frozen=True)
class EvalProcesses:
    """Where this process stands among the evaluating processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class RankFailed(RuntimeError):
    """Another rank failed; raised on the ranks that did not, so the whole run stops."""


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    """Accept `--local-rank=N`, which torch.distributed.launch appends to the command line
    (fairseq's parser knows only the older `--local_rank`, an alias of `--device-id`)."""
    parser.add_argument("--local-rank", dest="device_id", type=int, default=argparse.SUPPRESS,
                        help="local rank given by torch.distributed.launch (same as --device-id)")


def current_processes() -> EvalProcesses:
    """The process group already joined, or one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return EvalProcesses()
    return EvalProcesses(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init_processes(args: argparse.Namespace) -> EvalProcesses:
    """Join the launcher's process group (or fairseq's explicit one); one process without either."""
    if dist.is_available() and dist.is_initialized():
        return current_processes()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        missing = [name for name in LAUNCHER_ENV if name not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={world_size} is set but {', '.join(missing)} is not: start several "
                             "processes with torchrun or python -m torch.distributed.launch")
        rank, local_rank, init_method = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), "env://"
    elif getattr(args, "distributed_init_method", None) and getattr(args, "distributed_world_size", 1) > 1:
        world_size, rank, init_method = args.distributed_world_size, args.distributed_rank, args.distributed_init_method
        local_rank = getattr(args, "device_id", 0)
        if not 0 <= rank < world_size:
            raise ValueError(f"--distributed-rank {rank} is outside 0..{world_size - 1}")
    else:
        return EvalProcesses()
    use_cuda = torch.cuda.is_available() and not getattr(args, "cpu", False)
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} has no CUDA device: {torch.cuda.device_count()} visible; "
                             "start at most that many processes per node, or pass --cpu")
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank)
    processes = EvalProcesses(rank, world_size, local_rank)
    # Tell fairseq's own code (logging, device choice) where it runs.
    args.distributed_world_size, args.distributed_rank, args.device_id = world_size, rank, local_rank
    logger.info("evaluating on %d processes (%s): this is rank %d", world_size, backend, rank)
    return processes


def configure_logging(processes: Optional[EvalProcesses] = None) -> None:
    """fairseq's log format, with the rank in every line when there are several processes."""
    fmt = LOG_FORMAT
    if processes is not None and processes.distributed:
        fmt = fmt.replace("%(name)s |", f"%(name)s | rank {processes.rank} |")
    # fairseq's import configures the root logger already: force our format and level.
    logging.basicConfig(format=fmt, level=os.environ.get("LOGLEVEL", "INFO").upper(), stream=sys.stdout, force=True)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


def gather_shards(processes: EvalProcesses, shard: Any, error: Optional[BaseException] = None) -> List[Any]:
    """Every rank's `shard` (rank order), on every rank; raises on every rank if any rank failed.

    A rank that failed passes its exception instead of its shard: the others learn of it here
    (rather than waiting for it forever) and stop too, naming the failing rank and its error.
    """
    if not processes.distributed:
        if error is not None:
            raise error
        return [shard]
    payload = {"error": None if error is None else f"{type(error).__name__}: {error}",
               "shard": None if error is not None else shard}
    gathered: List[Any] = [None] * processes.world_size
    dist.all_gather_object(gathered, payload)
    if error is not None:
        raise error
    failed = [(rank, p["error"]) for rank, p in enumerate(gathered) if p["error"] is not None]
    if failed:
        rank, message = failed[0]
        raise RankFailed(f"evaluation failed on rank {rank} of {processes.world_size}: {message}")
    return [p["shard"] for p in gathered]


def interleave_batches(shards: Sequence[Sequence[T]]) -> List[T]:
    """Per-rank batch lists back in one-process order: rank r's k-th batch was batch k * N + r.

    Ranks drop fairseq's empty padding batches, which only ever come at a shard's end.
    """
    merged: List[T] = []
    for k in range(max((len(shard) for shard in shards), default=0)):
        merged.extend(shard[k] for shard in shards if k < len(shard))
    return merged


def all_gather_floats(processes: EvalProcesses, value: float) -> List[float]:
    """`value` of every rank, in rank order."""
    if not processes.distributed:
        return [float(value)]
    gathered: List[Any] = [None] * processes.world_size
    dist.all_gather_object(gathered, float(value))
    return gathered


def broadcast_from_main(processes: EvalProcesses, value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not processes.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(processes: EvalProcesses) -> None:
    if processes.distributed:
        dist.barrier()


def close_processes(processes: EvalProcesses) -> None:
    """Leave the process group (once the run is over), so the process exits without warnings."""
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()
