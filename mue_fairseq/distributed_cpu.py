"""Data-parallel training on CPU processes with fairseq's default ``--ddp-backend pytorch_ddp``.

fairseq 0.12 assumes one GPU per process; on a machine without CUDA its distributed set-up fails:

* `DistributedFairseqModel` passes ``device_ids=[device_id]`` to torch's DDP, which rejects it for
  CPU modules;
* under torchrun, ``rank % torch.cuda.device_count()`` divides by zero, and a default
  ``--distributed-world-size`` (the GPU count, 1) ignores torchrun's ``WORLD_SIZE``;
* one command with ``--distributed-world-size N`` asserts N <= GPU count and spawns 0 processes;
* the default ``--distributed-backend nccl`` needs CUDA;
* `all_gather_list` (logging outputs that cannot be summed) stages data in a CUDA buffer.

`install()` replaces exactly these pieces with CPU versions, and only when CUDA is absent, so
the GPU path is untouched. Nothing is replaced by importing the plugin alone; the support is
switched on explicitly, in one of two ways:

* programs call ``mue_fairseq.distributed_cpu.install()`` before fairseq's ``call_main``;
* command lines (``fairseq-train --user-dir mue_fairseq``, torchrun) set the environment variable
  ``MUE_CPU_DISTRIBUTED=1``; the plugin reads it when fairseq imports it (``--user-dir``), before
  fairseq's distributed set-up runs. Our run_scripts set it on CPU machines.

With it (for command lines: ``MUE_CPU_DISTRIBUTED=1`` in their environment), all of these work:

* ``torchrun --nproc_per_node 2 $(which fairseq-train) ... --distributed-world-size 2``;
* one command, ``fairseq-train ... --distributed-world-size 2`` (fairseq spawns 2 processes);
* one command per rank, ``--distributed-world-size 2 --distributed-rank R
  --distributed-init-method tcp://HOST:PORT`` (add ``--distributed-no-spawn`` or not; without it
  each command spawns ``--distributed-num-procs`` processes, default 1, ranks R, R+1, ...).

The backend becomes gloo when nccl is asked for. SLURM and pipeline parallelism are GPU-only
here and raise a clear error.
"""
import logging
import os
import random
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = "MUE_CPU_DISTRIBUTED"
_TORCHRUN_KEYS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
_originals: Dict[str, Callable] = {}


def cpu_distributed_fairseq_model(args, model, process_group, device):
    """fairseq's `DistributedFairseqModel`, with torch DDP built without device ids for CPU modules."""
    from fairseq.distributed import DistributedTimeoutWrapper, ModuleProxyWrapper

    on_cpu = torch.device(device).type == "cpu" and not getattr(args, "tpu", False)
    if not on_cpu or args.ddp_backend not in ("c10d", "pytorch_ddp"):
        return _originals["DistributedFairseqModel"](args, model, process_group, device)
    if getattr(args, "ddp_comm_hook", "none") not in (None, "none"):
        raise ValueError(f"--ddp-comm-hook {args.ddp_comm_hook} is not supported on CPU")
    wrapped = torch.nn.parallel.DistributedDataParallel(
        module=model.to(device),
        broadcast_buffers=args.broadcast_buffers,
        bucket_cap_mb=args.bucket_cap_mb,
        process_group=process_group,
        find_unused_parameters=args.find_unused_parameters,
        gradient_as_bucket_view=args.gradient_as_bucket_view,
    )
    wrapped = ModuleProxyWrapper(wrapped)
    if getattr(args, "heartbeat_timeout", -1) > 0:
        wrapped = DistributedTimeoutWrapper(wrapped, timeout=args.heartbeat_timeout)
    return wrapped


def cpu_infer_init_method(cfg, force_distributed: bool = False) -> None:
    """Fill in the rendezvous of CPU ranks: from torchrun's environment, else one local node."""
    if cfg.distributed_init_method is not None or getattr(cfg, "tpu", False):
        return
    if cfg.pipeline_model_parallel:
        raise ValueError("--pipeline-model-parallel needs GPUs; this machine has no CUDA device")
    if all(key in os.environ for key in _TORCHRUN_KEYS):
        world_size = int(os.environ["WORLD_SIZE"])
        if cfg.distributed_world_size not in (1, world_size):
            raise ValueError(
                f"--distributed-world-size {cfg.distributed_world_size} disagrees with torchrun's "
                f"WORLD_SIZE={world_size}"
            )
        if world_size == 1:
            return
        cfg.distributed_init_method = "env://"
        cfg.distributed_world_size = world_size
        cfg.distributed_rank = int(os.environ["RANK"])
        cfg.device_id = int(os.environ.get("LOCAL_RANK", 0))
        cfg.distributed_no_spawn = True
        return
    if cfg.distributed_world_size == 1:
        return
    if os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST"):
        raise ValueError(
            "SLURM rendezvous is GPU-only in fairseq; on CPU start the ranks with torchrun or "
            "--distributed-init-method tcp://HOST:PORT --distributed-rank R"
        )
    if cfg.distributed_port <= 0:
        cfg.distributed_port = random.randint(10000, 60000)
    cfg.distributed_init_method = f"tcp://localhost:{cfg.distributed_port}"
    if not cfg.distributed_no_spawn:
        cfg.distributed_num_procs = cfg.distributed_world_size


def cpu_call_main(cfg, main: Callable, **kwargs) -> None:
    """fairseq's `call_main` for CPU ranks: gloo instead of nccl, and one spawned process per local rank."""
    from fairseq.distributed import utils as distributed_utils

    training = cfg.distributed_training
    if training.distributed_backend == "nccl":
        logger.info("no CUDA device: distributed backend gloo instead of nccl")
        training.distributed_backend = "gloo"
    if training.distributed_init_method is None:
        distributed_utils.infer_init_method(training)
    if training.distributed_init_method is None or training.distributed_no_spawn:
        _originals["call_main"](cfg, main, **kwargs)
        return
    nprocs = max(1, min(training.distributed_num_procs or 1, training.distributed_world_size))
    kwargs["start_rank"] = training.distributed_rank
    training.distributed_rank = None  # distributed_main assigns start_rank + process index
    torch.multiprocessing.spawn(fn=_spawned_rank, args=(main, cfg, kwargs), nprocs=nprocs, join=True)


def _spawned_rank(index: int, main: Callable, cfg, kwargs: Dict[str, Any]) -> None:
    """fairseq's `distributed_main` in a spawned process, which starts without the CPU versions
    when they were installed by a call rather than by the environment variable."""
    from fairseq.distributed import utils as distributed_utils

    install()
    distributed_utils.distributed_main(index, main, cfg, kwargs)


def cpu_all_gather_list(data: Any, group=None, max_size: int = 16384) -> List[Any]:
    """fairseq's `all_gather_list` (gather a picklable object from every rank) without a CUDA buffer."""
    from fairseq import utils
    from fairseq.distributed import utils as distributed_utils

    if group is None:
        group = distributed_utils.get_global_group()
    gathered: List[Optional[Any]] = [None] * distributed_utils.get_world_size(group=group)
    dist.all_gather_object(gathered, utils.move_to_cpu(data), group=group)
    return gathered


def install() -> bool:
    """Replace fairseq's GPU-only distributed pieces by the CPU versions, process-wide.

    Returns whether fairseq now uses the CPU versions (also when an earlier call installed them);
    with CUDA it changes nothing and returns False.
    """
    if torch.cuda.is_available():
        return False
    if _originals:
        return True
    import fairseq.models
    import fairseq.models.distributed_fairseq_model as ddp_module
    from fairseq.distributed import utils as distributed_utils

    _originals["DistributedFairseqModel"] = ddp_module.DistributedFairseqModel
    _originals["call_main"] = distributed_utils.call_main
    _originals["infer_init_method"] = distributed_utils.infer_init_method
    _originals["all_gather_list"] = distributed_utils.all_gather_list
    fairseq.models.DistributedFairseqModel = cpu_distributed_fairseq_model
    ddp_module.DistributedFairseqModel = cpu_distributed_fairseq_model
    distributed_utils.call_main = cpu_call_main
    distributed_utils.infer_init_method = cpu_infer_init_method
    distributed_utils.all_gather_list = cpu_all_gather_list
    logger.debug("no CUDA device: CPU versions of fairseq's distributed set-up installed")
    return True


def uninstall() -> None:
    """Give fairseq back its own distributed pieces (undoes `install`)."""
    if not _originals:
        return
    import fairseq.models
    import fairseq.models.distributed_fairseq_model as ddp_module
    from fairseq.distributed import utils as distributed_utils

    fairseq.models.DistributedFairseqModel = _originals["DistributedFairseqModel"]
    ddp_module.DistributedFairseqModel = _originals["DistributedFairseqModel"]
    distributed_utils.call_main = _originals["call_main"]
    distributed_utils.infer_init_method = _originals["infer_init_method"]
    distributed_utils.all_gather_list = _originals["all_gather_list"]
    _originals.clear()


def install_if_requested() -> bool:
    """`install()` when the environment sets ``MUE_CPU_DISTRIBUTED=1``; nothing when it is unset or 0."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if value in ("", "0"):
        if not value and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            # fairseq would fail later with a bare ZeroDivisionError (rank % GPU count)
            logger.warning(
                "torchrun started %s processes on a machine without CUDA; fairseq needs the plugin's CPU "
                "support for that: set %s=1", os.environ["WORLD_SIZE"], ENVIRONMENT_VARIABLE,
            )
        return False
    if value != "1":
        raise ValueError(
            f"environment variable {ENVIRONMENT_VARIABLE}={value!r}: expected 1 (CPU distributed "
            "training support on) or 0 (off)"
        )
    return install()
