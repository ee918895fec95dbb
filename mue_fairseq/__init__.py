"""mue-fairseq: OFA with MuE early exiting, as a fairseq `--user-dir` plugin.

Importing the package registers the models, tasks, criterions and generator with fairseq, and
changes one thing in fairseq: the trainer's EMA (``--store-ema``) of our OFA models copies their
integer state entries instead of failing to average them (`mue_fairseq.ema`; OFA's fork of fairseq
does the same); other models get fairseq's own EMA. CPU data-parallel training is switched on explicitly: by
``MUE_CPU_DISTRIBUTED=1`` in the environment (read here, when fairseq imports the plugin), or by
calling ``mue_fairseq.distributed_cpu.install()`` (see that module).
"""
from . import criterions, distributed_cpu, ema, models, ofa, tasks  # noqa: F401

distributed_cpu.install_if_requested()
ema.install()
