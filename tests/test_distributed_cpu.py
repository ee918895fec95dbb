"""CPU data-parallel training with fairseq's default `--ddp-backend pytorch_ddp` (mue_fairseq.distributed_cpu).

The end-to-end test trains a tiny `ofa` captioning model on synthetic TSV rows three times at once:
one process with `--update-freq 2`, and two ranks rendezvousing as torchrun makes them (its
environment variables). Ranks are forked from the test process, so they skip the ~10 s import of
torch and fairseq that a fresh `torchrun` process pays; the code path from `call_main` on is the
command line's (``torchrun --nproc_per_node 2 $(which fairseq-train) ... --distributed-world-size 2``).
"""
import multiprocessing
import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mue_fairseq  # noqa: F401
from ofa_fixtures import BPE_DIR, require_file
from ofa_tsv_rows import solid_image_base64, write_tsv

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only support; inactive with CUDA")

# Recorded at import, before any test here imports the module itself.
IMPORTED_BY_PLUGIN = "mue_fairseq.distributed_cpu" in sys.modules
REPO = Path(__file__).resolve().parents[1]
WORDS = ["red", "green", "blue", "small", "large", "square", "circle", "star"]


def test_plugin_installs_cpu_support():
    from fairseq import models
    from fairseq.distributed import utils as distributed_utils

    assert IMPORTED_BY_PLUGIN, "importing mue_fairseq must import mue_fairseq.distributed_cpu"
    from mue_fairseq import distributed_cpu

    assert distributed_utils.call_main is distributed_cpu.cpu_call_main
    assert distributed_utils.infer_init_method is distributed_cpu.cpu_infer_init_method
    assert distributed_utils.all_gather_list is distributed_cpu.cpu_all_gather_list
    assert models.DistributedFairseqModel is distributed_cpu.cpu_distributed_fairseq_model


def _cfg(**values):
    defaults = dict(
        distributed_init_method=None, tpu=False, pipeline_model_parallel=False, distributed_world_size=1,
        distributed_rank=0, device_id=0, distributed_no_spawn=False, distributed_port=-1, distributed_num_procs=1,
    )
    defaults.update(values)
    return SimpleNamespace(**defaults)


def test_infer_init_method(monkeypatch):
    from mue_fairseq.distributed_cpu import cpu_infer_init_method

    torchrun_keys = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")
    for key in torchrun_keys + ("SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST"):
        monkeypatch.delenv(key, raising=False)
    cfg = _cfg(distributed_world_size=2, distributed_port=12345)
    cpu_infer_init_method(cfg)
    assert (cfg.distributed_init_method, cfg.distributed_num_procs) == ("tcp://localhost:12345", 2)

    single = _cfg()
    cpu_infer_init_method(single)
    assert single.distributed_init_method is None

    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="2", WORLD_SIZE="2", RANK="1", LOCAL_RANK="1").items():
        monkeypatch.setenv(key, value)
    cfg = _cfg()  # the CPU default world size 1 yields to torchrun's WORLD_SIZE
    cpu_infer_init_method(cfg)
    assert (cfg.distributed_init_method, cfg.distributed_world_size, cfg.distributed_rank) == ("env://", 2, 1)
    assert cfg.distributed_no_spawn and cfg.device_id == 1
    with pytest.raises(ValueError, match="disagrees with torchrun"):
        cpu_infer_init_method(_cfg(distributed_world_size=4))

    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[1-2]")
    with pytest.raises(ValueError, match="SLURM"):
        cpu_infer_init_method(_cfg(distributed_world_size=2))


# --------------------------------------------------------------------------- end to end
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_data(directory: Path):
    rows = [
        [str(i), f"img{i}", f"a {WORDS[i % 3]} {WORDS[3 + i % 2]} {WORDS[5 + i % 3]}", "unused",
         solid_image_base64(20, 24, (30 * i, 200 - 20 * i, 100))]
        for i in range(8)
    ]
    return write_tsv(directory / "train.tsv", rows), write_tsv(directory / "valid.tsv", rows[:4])


def _train_args(train: Path, valid: Path, save_dir: Path):
    # --freeze-resnet: BatchNorm running statistics are per rank in DDP (buffers are not synchronised),
    # so they would make the two set-ups differ; frozen BatchNorm has none. --find-unused-parameters:
    # OFA's decoder holds image-code modules that captioning never uses (OFA's scripts pass it too).
    return [
        f"{train},{valid}", "--user-dir", str(REPO / "mue_fairseq"), "--task", "caption", "--bpe-dir", str(BPE_DIR),
        "--selected-cols", "0,4,2", "--patch-image-size", "64", "--max-src-length", "20", "--max-tgt-length", "10",
        "--arch", "ofa_tiny", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--encoder-layers", "1",
        "--decoder-layers", "2", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
        "--resnet-type", "resnet18", "--image-bucket-size", "4", "--token-bucket-size", "16", "--freeze-resnet",
        "--disable-entangle", "--dropout", "0", "--criterion", "adjust_label_smoothed_cross_entropy",
        "--label-smoothing", "0.1", "--optimizer", "sgd", "--lr", "0.5", "--batch-size", "2", "--max-epoch", "1",
        "--num-workers", "0", "--seed", "1", "--ignore-unused-valid-subsets", "--find-unused-parameters",
        "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--no-save-optimizer-state", "--log-format", "simple",
    ]


def _run_fairseq_train(argv, env):
    """Child process: fairseq-train's entry (parse, then `call_main`) with torchrun-like environment `env`."""
    os.environ.update(env)
    torch.set_num_threads(1)
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils
    from fairseq_cli.train import main

    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), main)


def test_two_cpu_ranks_match_update_freq_2(tmp_path):
    require_file(BPE_DIR)
    import mue_fairseq.distributed_cpu  # noqa: F401  (installs the CPU support in the forked ranks too)

    train, valid = _write_data(tmp_path)
    port = _free_port()
    context = multiprocessing.get_context("fork")
    runs = {
        "single": [(_train_args(train, valid, tmp_path / "single") + ["--update-freq", "2"], {})],
        "ddp": [
            (
                _train_args(train, valid, tmp_path / "ddp") + ["--distributed-world-size", "2"],
                dict(
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
                ),
            )
            for rank in range(2)
        ],
    }
    processes = [
        context.Process(target=_run_fairseq_train, args=(argv, env)) for jobs in runs.values() for argv, env in jobs
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=240)
    exit_codes = [process.exitcode for process in processes]
    for process in processes:
        if process.is_alive():
            process.kill()
    assert exit_codes == [0, 0, 0], f"training processes failed (exit codes {exit_codes}); see captured stderr"

    single = torch.load(tmp_path / "single" / "checkpoint_last.pt", weights_only=False)
    ddp = torch.load(tmp_path / "ddp" / "checkpoint_last.pt", weights_only=False)
    assert single["optimizer_history"][-1]["num_updates"] == ddp["optimizer_history"][-1]["num_updates"] == 2
    assert ddp["cfg"]["distributed_training"]["distributed_world_size"] == 2
    assert ddp["cfg"]["distributed_training"]["distributed_backend"] == "gloo"
    single_loss, ddp_loss = single["extra_state"]["val_loss"], ddp["extra_state"]["val_loss"]
    assert single_loss == pytest.approx(ddp_loss, abs=1.1e-3)  # fairseq rounds logged losses to 3 decimals
    assert single_loss < 10.5  # trained: the untrained loss is about ln(59457) = 11.0
    for name, tensor in single["model"].items():
        if tensor.is_floating_point():
            torch.testing.assert_close(ddp["model"][name], tensor, rtol=1e-4, atol=1e-6, msg=name)
