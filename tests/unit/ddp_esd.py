"""Run by test_distributed under `accelerate launch`: a small ESD run whose Delta the main process saves."""

import sys

import torch
from accelerate import PartialState

import erase
from tests.unit.helpers import fresh_pipe, small_esd

if __name__ == "__main__":
    torch.set_num_threads(1)
    result = erase.run(fresh_pipe(), small_esd(batch_size=2, steps=3), progress=False)
    if PartialState().is_main_process:
        result.delta.save(sys.argv[1])
