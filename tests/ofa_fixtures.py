"""Access to the shared OFA reference fixtures (checkpoints written by OFA's own trainer)."""
import os
from pathlib import Path
from typing import Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MUE_SHARED_DIR", REPO.parent / "shared"))
REFERENCE_DIR = SHARED / "ofa_reference"
BPE_DIR = SHARED / "ofa_bpe"
FIXTURE_NAMES = ("caption", "snli_ve")


def fixture_paths(name: str):
    return REFERENCE_DIR / f"ofa_tiny_{name}.pt", REFERENCE_DIR / f"ofa_tiny_{name}_reference.pt"


def require_file(path: Path) -> Path:
    """`path`, or a test failure naming it: a missing fixture must turn the suite red, not skip."""
    if not Path(path).exists():
        pytest.fail(f"shared fixture {path} not found (the shared folder is {SHARED}; set MUE_SHARED_DIR)")
    return Path(path)


def require_fixture(name: str):
    checkpoint, reference = fixture_paths(name)
    for path in (checkpoint, reference, BPE_DIR):
        require_file(path)
    return checkpoint, reference


def load_reference(name: str) -> dict:
    return torch.load(fixture_paths(name)[1], weights_only=True)


def load_fixture_model(name: str, overrides: Optional[dict] = None):
    """The fixture checkpoint loaded strictly through fairseq, with its own task and config."""
    import mue_fairseq  # noqa: F401  (registers the plugin)
    from fairseq import checkpoint_utils

    checkpoint, _ = require_fixture(name)
    arg_overrides = {"bpe_dir": str(BPE_DIR), **(overrides or {})}
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)], arg_overrides=arg_overrides)
    model = models[0].eval()
    return model, cfg, task
