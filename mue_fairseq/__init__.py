"""mue-fairseq: OFA with MuE early exiting, as a fairseq `--user-dir` plugin.

Importing the package registers the models, tasks, criterions and generator with fairseq, and
changes nothing else in fairseq. CPU data-parallel training is switched on explicitly: by
``MUE_CPU_DISTRIBUTED=1`` in the environment (read here, when fairseq imports the plugin), or by
calling ``mue_fairseq.distributed_cpu.install()`` (see that module).
"""
from . import criterions, distributed_cpu, models, ofa, tasks  # noqa: F401

distributed_cpu.install_if_requested()
