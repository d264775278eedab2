"""Run by test_distributed under torchrun: a small ESD run whose Delta the main process saves, with the number of
processes it ran over."""

import sys
from pathlib import Path

import torch

import erase
from erase.processes import process_state
from tests.unit.helpers import fresh_pipe, small_esd

if __name__ == "__main__":
    torch.set_num_threads(1)
    result = erase.run(fresh_pipe(), small_esd(batch_size=2, steps=3), progress=False)
    state = process_state()
    if state.is_main_process:
        result.delta.save(sys.argv[1])
        (Path(sys.argv[1]) / "processes.txt").write_text(str(state.num_processes))
