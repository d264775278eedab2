"""Two processes under `accelerate launch` train the same Delta as one process with the same effective batch."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import erase
from erase.delta import Delta
from tests.unit.helpers import fresh_pipe, small_esd

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_two_processes_match_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(ROOT / "tests" / "unit" / "ddp_esd.py"), str(tmp_path / "ddp"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = Delta.load(tmp_path / "ddp")
    one = erase.run(fresh_pipe(), small_esd(batch_size=2, steps=3), progress=False).delta
    assert set(two.tensors) == set(one.tensors) and one.tensors
    for name, value in one.tensors.items():
        torch.testing.assert_close(two.tensors[name], value, rtol=1e-4, atol=1e-6)
