"""Low-communication outer-loop optimizers over the ``Collective`` protocol."""

from optim.diloco import DelayedDiLoCo, DiLoCo
from optim.outer import OuterLoop, OuterStats, RoundRecord

__all__ = ["DelayedDiLoCo", "DiLoCo", "OuterLoop", "OuterStats", "RoundRecord"]
