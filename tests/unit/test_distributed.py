"""Two processes under torchrun train the same Delta as one process with the same effective batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

import erase
from erase.delta import Delta
from tests.unit.helpers import fresh_pipe, small_esd

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        str(ROOT / "tests" / "unit" / "ddp_esd.py"), str(tmp_path / "ddp"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ddp" / "processes.txt").read_text() == "2", "the run did not join a two-process group"
    two = Delta.load(tmp_path / "ddp")
    one = erase.run(fresh_pipe(), small_esd(batch_size=2, steps=3), progress=False).delta
    assert set(two.tensors) == set(one.tensors) and one.tensors
    for name, value in one.tensors.items():
        torch.testing.assert_close(two.tensors[name], value, rtol=1e-4, atol=1e-6)
