"""Low-communication outer-loop optimizers over the ``Collective`` protocol."""

from optim.diloco import DelayedDiLoCo, DiLoCo
from optim.outer import OuterLoop, OuterStats, RoundRecord
from optim.sparseloco import SparseLoCo
from optim.spes import SPES
from optim.streaming import StreamingDiLoCo, strided_fragments

__all__ = [
    "SPES",
    "DelayedDiLoCo",
    "DiLoCo",
    "OuterLoop",
    "OuterStats",
    "RoundRecord",
    "SparseLoCo",
    "StreamingDiLoCo",
    "strided_fragments",
]
