"""Loading OFA checkpoint files as they are, under torch's weights-only unpickler.

OFA's trainer stores `cfg["model"]` as an `argparse.Namespace`; torch >= 2.6 refuses any class
that is not allow-listed. Allow-listing the few classes fairseq checkpoints need keeps the
protection for everything else.

With several processes, fairseq's `Trainer.load_checkpoint` reads the file on rank 0 only and hands
the loaded state to the other ranks with `distributed_utils.broadcast_object`, whose
`_broadcast_object_slow` runs `torch.load` (weights-only by default) on a buffer. That state is no
longer the file's: `checkpoint_utils.load_checkpoint_to_cpu` has turned `cfg` into an omegaconf
`DictConfig`, and the tensors are replaced by fairseq's `_TensorPlaceholder`. Those classes are
allow-listed too, so `--restore-file` and resuming work on any number of processes.
"""
import argparse
import logging
import typing
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

OFA_ARCHITECTURES = ("ofa_tiny", "ofa_medium", "ofa_base", "ofa_large", "ofa_huge")
MUE_ARCHITECTURES = ("mue_ofa",) + tuple(f"mue_{arch}" for arch in OFA_ARCHITECTURES)


def allow_fairseq_checkpoint_globals() -> None:
    """Allow-list the non-tensor classes found in OFA and fairseq-fixed checkpoints, as files and as
    the state rank 0 broadcasts to the other ranks (see the module docstring)."""
    from fairseq.distributed.utils import _TensorPlaceholder
    from omegaconf import DictConfig, ListConfig, base, nodes

    safe = [argparse.Namespace, np.dtype, np.core.multiarray.scalar]
    safe += [type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32", "bool")]
    # The cfg fairseq loads is built from the file's plain containers: a DictConfig pickles its
    # untyped nodes (AnyNode), their metadata, the types the metadata names (typing.Any, dict, list,
    # int: a ListConfig's key type) and a defaultdict cache.
    safe += [DictConfig, ListConfig, nodes.AnyNode, base.ContainerMetadata, base.Metadata, typing.Any]
    safe += [defaultdict, dict, list, int, _TensorPlaceholder]
    torch.serialization.add_safe_globals(safe)


def checkpoint_architecture(state: Dict) -> Optional[str]:
    """The model architecture recorded in a loaded checkpoint dict (in `cfg.model` or legacy `args`)."""
    holder = state["cfg"]["model"] if state.get("cfg") is not None else state.get("args")
    return getattr(holder, "_name", None) or getattr(holder, "arch", None)


def checkpoint_task(state: Dict) -> Optional[str]:
    """The task name recorded in a loaded checkpoint dict (`cfg.task` or legacy `args`)."""
    if state.get("cfg") is not None and state["cfg"].get("task") is not None:
        return state["cfg"]["task"].get("_name")
    return getattr(state.get("args"), "task", None)


def check_is_ofa_checkpoint(path: str, state: Dict, accepted: Sequence[str]) -> str:
    """Raise a clear error unless `state` (loaded from `path`) holds one of `accepted` architectures."""
    for key in ("model", "cfg"):
        if key not in state and not (key == "cfg" and "args" in state):
            raise ValueError(f"{path}: not an OFA checkpoint: no {key!r} entry (keys: {sorted(state)[:8]})")
    arch = checkpoint_architecture(state)
    if arch not in accepted:
        raise ValueError(
            f"{path}: checkpoint architecture {arch!r} is not an OFA model; expected one of {list(accepted)}"
        )
    return arch


def read_checkpoint(path: str, arg_overrides: Optional[Dict] = None) -> Dict:
    """fairseq's `load_checkpoint_to_cpu`, with errors that name the file and say what is wrong with it."""
    import os
    import pickle
    import zipfile

    from fairseq import checkpoint_utils

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        state = checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides)
    except KeyError as err:
        raise ValueError(f"{path}: not an OFA checkpoint: a torch file without fairseq's entries ({err})") from err
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if magic[:2] == b"PK":  # torch's zip format, so the archive itself is damaged
            raise ValueError(f"{path}: truncated or corrupt checkpoint ({reason})") from err
        if magic[:1] == b"\x80":  # a legacy (pickle) torch file
            raise ValueError(f"{path}: unreadable legacy torch checkpoint ({reason})") from err
        raise ValueError(f"{path}: not a torch checkpoint file (neither a zip archive nor a pickle)") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not an OFA checkpoint: holds a {type(state).__name__}, not a dict")
    return state


def load_ofa_ensemble(
    paths: List[str], arg_overrides: Optional[Dict] = None, task=None,
    accepted: Sequence[str] = OFA_ARCHITECTURES + MUE_ARCHITECTURES, task_name: Optional[str] = None,
) -> Tuple[list, object, object]:
    """`checkpoint_utils.load_model_ensemble_and_task` after checking each file is an OFA model
    (and, with `task_name`, one trained for that task: the checkpoint's task would win silently)."""
    from fairseq import checkpoint_utils

    # A trained checkpoint holds its ResNet weights: the file it was initialised from (--resnet-model-path)
    # is not needed, and often not there, at evaluation time. An explicit override still wins.
    arg_overrides = {"resnet_model_path": None, **(arg_overrides or {})}
    for path in paths:
        state = read_checkpoint(path, arg_overrides)
        check_is_ofa_checkpoint(path, state, accepted)
        trained_for = checkpoint_task(state)
        if task_name is not None and trained_for is not None and trained_for != task_name:
            raise ValueError(f"--task {task_name} but the checkpoint {path} was trained for {trained_for!r}")
    return checkpoint_utils.load_model_ensemble_and_task(paths, arg_overrides=arg_overrides, task=task)
