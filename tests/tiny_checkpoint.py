"""A tiny `mue_ofa` checkpoint trained for two updates by fairseq-train, in this process, on the
built-in synthetic task; built once per test session and shared by the test files that need one."""
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence


from ofa_fixtures import BPE_DIR, require_file

TASK_ARGS = {
    "snli_ve": ["--selected-cols", "0,2,3,4,5", "--add-caption", "--prompt-type", "prev_output",
                "--max-src-length", "40", "--max-tgt-length", "10"],
    "caption": ["--selected-cols", "0,4,2", "--max-src-length", "40", "--max-tgt-length", "12"],
    "refcoco": ["--selected-cols", "0,4,2,3", "--max-src-length", "40", "--max-tgt-length", "10",
                "--max-image-size", "64"],
    "vqa_gen": ["--selected-cols", "0,5,2,3,4", "--max-src-length", "40", "--max-tgt-length", "10",
                "--prompt-type", "prev_output", "--add-object", "--valid-batch-size", "7"],
}
# Tasks whose synthetic data come from data_utils.synthetic_vqa_grounding (with its ans2label file).
VQA_GROUNDING_TASKS = ("refcoco", "vqa_gen")
TINY_MODEL_ARGS = [
    "--arch", "mue_ofa_tiny", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--encoder-layers", "2",
    "--decoder-layers", "2", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    "--resnet-type", "resnet18", "--patch-image-size", "64", "--image-bucket-size", "8", "--token-bucket-size", "32",
]
LAYERS = 2


@dataclass
class TinyCheckpoint:
    task: str
    checkpoint: Path
    data_dir: Path
    bpe_dir: str

    def split(self, name: str) -> Path:
        return self.data_dir / f"{self.task}_{name}.tsv"

    def eval_args(self) -> List[str]:
        """Arguments shared by evaluate and sweep: data, checkpoint, task options, CPU."""
        return [str(self.split("valid")), "--path", str(self.checkpoint), "--user-dir", str(_plugin_dir()),
                "--task", self.task, "--gen-subset", "valid", "--batch-size", "4", "--num-workers", "0", "--cpu",
                "--log-format", "none", "--model-overrides", repr({"bpe_dir": self.bpe_dir})]


_BUILT: Dict[str, TinyCheckpoint] = {}


def _plugin_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "mue_fairseq"


def tiny_checkpoint(task: str, tmp_path_factory, extra_args: Sequence[str] = ()) -> TinyCheckpoint:
    """Synthetic data (4-8 training rows, 6-12 validation rows) and a 2-update checkpoint for `task`.

    `extra_args` (e.g. validation options) are appended to the fairseq-train command line; a
    checkpoint built with them is cached apart from the plain one.
    """
    require_file(BPE_DIR)
    key = " ".join([task, *extra_args])
    if key in _BUILT:
        return _BUILT[key]
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils
    from fairseq_cli import train

    from data_utils.synthetic import build_synthetic_task

    root = tmp_path_factory.mktemp(f"tiny_{task}")
    data_dir = root / "data"
    task_args = list(TASK_ARGS[task])
    if task in VQA_GROUNDING_TASKS:
        from data_utils.synthetic_vqa_grounding import build_vqa_grounding_task

        paths = build_vqa_grounding_task(str(data_dir), seed=3, num_train=4, num_valid=6, num_test=2)
        if task == "vqa_gen":
            task_args += ["--ans2label-file", paths["vqa_ans2label"]]
    else:
        build_synthetic_task(str(data_dir), seed=3, num_train=4, num_valid=6, num_test=2)
    save_dir = root / "checkpoints"
    argv = [
        f"{data_dir / f'{task}_train.tsv'},{data_dir / f'{task}_valid.tsv'}", "--user-dir", str(_plugin_dir()),
        "--task", task, "--bpe-dir", str(BPE_DIR), *task_args, *TINY_MODEL_ARGS,
        "--ignore-unused-valid-subsets", "--criterion", "adjust_label_smoothed_cross_entropy",
        "--optimizer", "adam", "--lr", "1e-3", "--max-update", "2", "--batch-size", "4", "--cpu",
        "--num-workers", "0", "--log-format", "none", "--save-dir", str(save_dir), "--no-epoch-checkpoints",
        "--seed", "1", *(extra_args or ["--disable-validation"]),
    ]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    # fairseq keeps the best validation score on a function attribute: an earlier training in this
    # process would otherwise pass its own best on to this checkpoint.
    from fairseq import checkpoint_utils

    if hasattr(checkpoint_utils.save_checkpoint, "best"):
        del checkpoint_utils.save_checkpoint.best
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), train.main)
    checkpoint = save_dir / "checkpoint_last.pt"
    assert checkpoint.exists(), f"fairseq-train wrote no {checkpoint}"
    _BUILT[key] = TinyCheckpoint(task, checkpoint, data_dir, str(BPE_DIR))
    return _BUILT[key]
