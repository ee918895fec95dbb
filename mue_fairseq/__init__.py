"""mue-fairseq: OFA with MuE early exiting, as a fairseq `--user-dir` plugin.

Importing the package registers the models, tasks, criterions and generator with fairseq.
"""
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"fairseq\..*")

from . import criterions, distributed_cpu, models, ofa, tasks  # noqa: E402,F401
