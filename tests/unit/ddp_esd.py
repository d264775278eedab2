"""Run by test_distributed under torchrun: a small ESD run (or, with a second argument `text-encoder`, a small run
training text-encoder tensors only) whose Delta the main process saves, with the number of processes it ran over."""

import sys
from pathlib import Path

import torch

import erase
from erase import methods
from erase.processes import process_state
from tests.unit.helpers import fresh_pipe, small_esd
from tests.unit.test_text_encoder_params import SPEC, EmptyEmbeddingConfig

if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[2:] == ["text-encoder"]:
        methods.METHODS[SPEC.name] = SPEC
        config = EmptyEmbeddingConfig(concepts=["van gogh"], steps=3, lr=1e-2, batch_size=2)
    else:
        config = small_esd(batch_size=2, steps=3)
    result = erase.run(fresh_pipe(), config, progress=False)
    state = process_state()
    if state.is_main_process:
        result.delta.save(sys.argv[1])
        (Path(sys.argv[1]) / "processes.txt").write_text(str(state.num_processes))
