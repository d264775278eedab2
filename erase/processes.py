"""This process's place in a launched group (`accelerate launch` on GPUs, `torchrun` on CPUs).

accelerate joins a CPU process group only when its state is created with `cpu=True`; created without, the first
`PartialState()` of a process started by torchrun on a machine without CUDA reports one process, and the
process-wide state it caches makes every later caller agree. So every part of the toolkit asks here.
"""

from __future__ import annotations

import torch
from accelerate import PartialState


def process_state() -> PartialState:
    """The shared accelerate state, on CPU when there is no CUDA device (so a CPU group is joined)."""
    return PartialState(cpu=not torch.cuda.is_available())
