"""CPU data-parallel training with fairseq's default `--ddp-backend pytorch_ddp` (mue_fairseq.distributed_cpu).

Importing the plugin changes nothing in fairseq's distributed code; the CPU support is switched on by
`distributed_cpu.install()` (here, before the ranks are forked) or by `MUE_CPU_DISTRIBUTED=1`.

The end-to-end tests train tiny `ofa` / `mue_ofa` models on synthetic TSV rows: one process with
`--update-freq 2` against two ranks rendezvousing as torchrun makes them (its environment
variables); and two ranks restored from OFA's SNLI-VE checkpoint, interrupted and resumed, against
two ranks that run straight through. Ranks are forked from the test process, so they skip the
~10 s import of torch and fairseq that a fresh `torchrun` process pays; the code path from
`call_main` on is the command line's
(``MUE_CPU_DISTRIBUTED=1 torchrun --nproc_per_node 2 $(which fairseq-train) ... --distributed-world-size 2``).
"""
import io
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import pytest
import torch

import mue_fairseq  # noqa: F401
from mue_fairseq import distributed_cpu
from ofa_fixtures import BPE_DIR, require_file, require_fixture
from ofa_tsv_rows import solid_image_base64, write_tsv

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only support; inactive with CUDA")

REPO = Path(__file__).resolve().parents[1]
WORDS = ["red", "green", "blue", "small", "large", "square", "circle", "star"]
PROBE = (
    "import fairseq.models as m, fairseq.distributed.utils as d; {load}; "
    "print(d.call_main.__module__, d.infer_init_method.__module__, d.all_gather_list.__module__, "
    "m.DistributedFairseqModel.__module__)"
)


@pytest.fixture
def cpu_support():
    """The CPU versions installed for one test (its forked ranks inherit them), then fairseq's own back."""
    assert distributed_cpu.install()
    yield
    distributed_cpu.uninstall()


def _probe_modules(load: str, variable: Optional[str]) -> List[str]:
    """In a fresh interpreter: the modules of fairseq's four distributed pieces after running `load`."""
    env = {key: value for key, value in os.environ.items() if key != distributed_cpu.ENVIRONMENT_VARIABLE}
    if variable is not None:
        env[distributed_cpu.ENVIRONMENT_VARIABLE] = variable
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", PROBE.format(load=load)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()


def test_import_patches_nothing_and_the_variable_installs_through_user_dir():
    assert _probe_modules("import mue_fairseq", None) == [
        "fairseq.distributed.utils", "fairseq.distributed.utils", "fairseq.distributed.utils",
        "fairseq.models.distributed_fairseq_model",
    ]
    # fairseq-train --user-dir mue_fairseq imports the plugin this way, before `call_main`.
    plugin = str(REPO / "mue_fairseq")
    user_dir = f"import argparse, fairseq.utils as u; u.import_user_module(argparse.Namespace(user_dir={plugin!r}))"
    assert _probe_modules(user_dir, "1") == ["mue_fairseq.distributed_cpu"] * 4


def test_install_uninstall_and_the_variable(monkeypatch, caplog):
    from fairseq import models
    from fairseq.distributed import utils as distributed_utils
    from fairseq.models import distributed_fairseq_model

    def current():
        return [distributed_utils.call_main, distributed_utils.infer_init_method, distributed_utils.all_gather_list,
                models.DistributedFairseqModel, distributed_fairseq_model.DistributedFairseqModel]

    own = current()
    assert own[0].__module__ == "fairseq.distributed.utils", "fairseq's pieces were replaced before the test"
    cpu = [distributed_cpu.cpu_call_main, distributed_cpu.cpu_infer_init_method, distributed_cpu.cpu_all_gather_list,
           distributed_cpu.cpu_distributed_fairseq_model, distributed_cpu.cpu_distributed_fairseq_model]
    try:
        for value in ("", "0"):
            monkeypatch.setenv(distributed_cpu.ENVIRONMENT_VARIABLE, value)
            assert not distributed_cpu.install_if_requested() and current() == own
        monkeypatch.delenv(distributed_cpu.ENVIRONMENT_VARIABLE)
        monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's ranks without the variable: fairseq would fail
        assert not distributed_cpu.install_if_requested() and current() == own
        assert "set MUE_CPU_DISTRIBUTED=1" in caplog.text
        monkeypatch.setenv(distributed_cpu.ENVIRONMENT_VARIABLE, "yes")
        with pytest.raises(ValueError, match="MUE_CPU_DISTRIBUTED='yes'"):
            distributed_cpu.install_if_requested()
        monkeypatch.setenv(distributed_cpu.ENVIRONMENT_VARIABLE, "1")
        assert distributed_cpu.install_if_requested() and current() == cpu
        assert distributed_cpu.install() and current() == cpu  # a second call changes nothing
    finally:
        distributed_cpu.uninstall()
    assert current() == own


def test_spawned_ranks_install_the_cpu_versions(monkeypatch):
    """One command with --distributed-world-size 2 spawns fresh interpreters: each installs the CPU
    versions before fairseq's `distributed_main`, also when the parent installed them by a call."""
    from fairseq.distributed import utils as distributed_utils

    spawned = []
    monkeypatch.setattr(torch.multiprocessing, "spawn",
                        lambda fn, args, nprocs, join: [fn(index, *args) for index in range(nprocs)])
    monkeypatch.setattr(distributed_utils, "distributed_main",
                        lambda index, main, cfg, kwargs: spawned.append((index, distributed_utils.call_main, kwargs)))
    training = SimpleNamespace(distributed_backend="nccl", distributed_init_method="tcp://localhost:1",
                               distributed_no_spawn=False, distributed_num_procs=2, distributed_world_size=2,
                               distributed_rank=0)
    try:
        distributed_cpu.cpu_call_main(SimpleNamespace(distributed_training=training), main=None)
    finally:
        distributed_cpu.uninstall()
    assert spawned == [(index, distributed_cpu.cpu_call_main, {"start_rank": 0}) for index in range(2)]
    assert training.distributed_backend == "gloo" and training.distributed_rank is None


def _cfg(**values):
    defaults = dict(
        distributed_init_method=None, tpu=False, pipeline_model_parallel=False, distributed_world_size=1,
        distributed_rank=0, device_id=0, distributed_no_spawn=False, distributed_port=-1, distributed_num_procs=1,
    )
    defaults.update(values)
    return SimpleNamespace(**defaults)


def test_infer_init_method(monkeypatch):
    cpu_infer_init_method = distributed_cpu.cpu_infer_init_method

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


def _torchrun_env(rank: int, port: int, world_size: int = 2) -> Dict[str, str]:
    return dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                LOCAL_RANK=str(rank))


def _run_fairseq_train(argv, env, steps_file=None):
    """Child process: fairseq-train's entry (parse, then `call_main`) with torchrun-like environment `env`;
    writes the number of training steps it took to `steps_file` when given."""
    os.environ.update(env)
    torch.set_num_threads(1)
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils
    from fairseq.trainer import Trainer
    from fairseq_cli.train import main

    steps = []
    train_step = Trainer.train_step
    Trainer.train_step = lambda self, *args, **kwargs: steps.append(1) or train_step(self, *args, **kwargs)
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), main)
    if steps_file is not None:
        Path(steps_file).write_text(str(len(steps)))


def _run_processes(jobs: List[Tuple]) -> None:
    """Run `_run_fairseq_train(*job)` for every job at once, in forked processes; all must succeed."""
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_run_fairseq_train, args=job) for job in jobs]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=240)
    exit_codes = [process.exitcode for process in processes]
    for process in processes:
        if process.is_alive():
            process.kill()
    assert exit_codes == [0] * len(jobs), f"training processes failed (exit codes {exit_codes}); see captured stderr"


def test_two_cpu_ranks_match_update_freq_2(tmp_path, cpu_support):
    require_file(BPE_DIR)
    train, valid = _write_data(tmp_path)
    port = _free_port()
    ddp_args = _train_args(train, valid, tmp_path / "ddp") + ["--distributed-world-size", "2"]
    _run_processes(
        [(_train_args(train, valid, tmp_path / "single") + ["--update-freq", "2"], {})]
        + [(ddp_args, _torchrun_env(rank, port)) for rank in range(2)]
    )

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


# --------------------------------------------------------------------------- restore and resume
K_UPDATES, N_UPDATES = 3, 5  # 8 rows, 2 per rank and batch: 2 updates per epoch; stopped mid-epoch 2


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """Two-rank runs of `mue_ofa_tiny` from OFA's SNLI-VE checkpoint (`--restore-file`, as OFA's
    scripts start): "straight" to N_UPDATES; "resumed" stopped at K_UPDATES, then started again in
    the same save dir, which resumes from its checkpoint_last.pt (fairseq's default --restore-file)."""
    from test_training import synthetic_data, train_args

    fixture, _ = require_fixture("snli_ve")
    root = tmp_path_factory.mktemp("two_ranks")
    data = synthetic_data(root / "data", num_train=4)

    def ranks(save_dir: Path, updates: int, *extra: str) -> List[Tuple]:
        argv = train_args(data, fixture, save_dir, "--lr", "1e-3", "--batch-size", "2", "--max-update", str(updates),
                          "--distributed-world-size", "2", "--find-unused-parameters", *extra)
        port = _free_port()
        return [(argv, _torchrun_env(rank, port), str(save_dir / f"steps{rank}_{updates}")) for rank in range(2)]

    restore = ["--restore-file", str(fixture), "--reset-optimizer", "--reset-dataloader", "--reset-meters"]
    assert distributed_cpu.install()
    try:
        _run_processes(ranks(root / "straight", N_UPDATES, *restore) + ranks(root / "resumed", K_UPDATES, *restore))
        interrupted = torch.load(root / "resumed" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
        _run_processes(ranks(root / "resumed", N_UPDATES))
    finally:
        distributed_cpu.uninstall()
    return SimpleNamespace(fixture=fixture, root=root, interrupted=interrupted)


def _steps(save_dir: Path, updates: int) -> List[int]:
    return [int((save_dir / f"steps{rank}_{updates}").read_text()) for rank in range(2)]


def test_broadcast_checkpoint_state_loads_weights_only(two_rank_runs):
    """What rank 0 hands the other ranks (fairseq's `broadcast_object`: the loaded state, tensors
    taken out, through `torch.save`) loads under the weights-only unpickler, for OFA's checkpoints
    (cfg.model a Namespace) and one written by fairseq-fixed (omegaconf cfg, optimizer state)."""
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils
    from omegaconf import OmegaConf

    ofa_checkpoints = [require_fixture(name)[0] for name in ("caption", "snli_ve")]
    for path in ofa_checkpoints + [two_rank_runs.root / "resumed" / "checkpoint_last.pt"]:
        state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
        tensors = []
        sent = distributed_utils._split_tensors_from_obj(state, tensors)
        buffer = io.BytesIO()
        torch.save(sent, buffer)
        buffer.seek(0)
        received = distributed_utils._put_tensors_in_obj(torch.load(buffer, map_location="cpu", weights_only=True),
                                                         tensors)
        assert OmegaConf.to_container(received["cfg"]) == OmegaConf.to_container(state["cfg"]), path
        assert received["model"].keys() == state["model"].keys()


def test_two_ranks_restore_an_ofa_checkpoint_train_and_save(two_rank_runs):
    interrupted = two_rank_runs.interrupted
    assert _steps(two_rank_runs.root / "resumed", K_UPDATES) == [K_UPDATES, K_UPDATES]
    assert interrupted["optimizer_history"][-1]["num_updates"] == K_UPDATES
    assert interrupted["cfg"]["distributed_training"]["distributed_world_size"] == 2
    original = torch.load(two_rank_runs.fixture, map_location="cpu", weights_only=False)["model"]
    assert interrupted["model"].keys() == original.keys()
    moved = [name for name, tensor in original.items()
             if tensor.is_floating_point() and not torch.equal(interrupted["model"][name], tensor)]
    assert moved, "training did not change any parameter"
    # Started from the checkpoint, not from a fresh initialisation: every weight is within a few
    # lr-sized Adam steps (3 at lr 1e-3) of the fixture's.
    for name in moved:
        assert (interrupted["model"][name] - original[name]).abs().max() < 0.05, name


def test_resumed_two_rank_run_ends_with_the_weights_of_the_uninterrupted_one(two_rank_runs):
    root = two_rank_runs.root
    assert _steps(root / "resumed", N_UPDATES) == [N_UPDATES - K_UPDATES] * 2, "the second run did not resume"
    assert _steps(root / "straight", N_UPDATES) == [N_UPDATES] * 2
    resumed = torch.load(root / "resumed" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    straight = torch.load(root / "straight" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    for state in (resumed, straight):
        assert state["optimizer_history"][-1]["num_updates"] == N_UPDATES
    assert resumed["model"].keys() == straight["model"].keys()
    # Bit-identical by construction: the resumed ranks start from the exact weights, Adam moments
    # and data position of update K, and repeat the same float operations (dropout seeded by update
    # number; a two-rank gradient sum a + b is the same float whichever rank adds).
    for name, tensor in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=0, msg=name)
    interrupted = two_rank_runs.interrupted["model"]
    assert any(not torch.equal(straight["model"][name], tensor) for name, tensor in interrupted.items()
               if tensor.is_floating_point()), "the updates after K changed nothing"
