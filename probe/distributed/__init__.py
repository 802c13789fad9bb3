"""Past one process: captures, training and studies over the ranks torchrun starts.

``torchrun --standalone --nproc-per-node N -m probe capture|train|study ...`` runs the command
on N ranks (docs/distributed.md): a capture splits its samples and rank 0 joins the parts, training
is data-parallel (DistributedDataParallel), a study spreads its runs, captures and lesion tables
over the ranks and rank 0 writes the report. In your own script under torchrun,
``probe.capture`` splits its data the same way once a process group is initialised.
"""

from probe.distributed.group import (
    RankFailed,
    Ranks,
    Terminated,
    agree,
    init_from_env,
    launched,
    on_main,
    ranks,
    shutdown,
)
from probe.distributed.split import split_samples

__all__ = [
    "RankFailed",
    "Ranks",
    "Terminated",
    "agree",
    "init_from_env",
    "launched",
    "on_main",
    "ranks",
    "shutdown",
    "split_samples",
]
