"""Test-wide settings: no network, one deliberate torch thread count."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Caches (generated images, run folders) of the test session stay out of the user's own cache.
os.environ.setdefault("ERASEKIT_CACHE", tempfile.mkdtemp(prefix="erasekit-test-cache-"))

import torch  # noqa: E402

# Two cores are shared; one torch thread per test process keeps timings stable (ERASEKIT_TEST_THREADS overrides).
torch.set_num_threads(int(os.environ.get("ERASEKIT_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests need CUDA; elsewhere they are skipped, so the default run needs no GPU."""
    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
