"""Test-wide settings: no network, one deliberate torch thread count."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# Two cores are shared; one torch thread per test process keeps timings stable (ERASEKIT_TEST_THREADS overrides).
torch.set_num_threads(int(os.environ.get("ERASEKIT_TEST_THREADS", "1")))
