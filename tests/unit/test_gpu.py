"""GPU paths (run where CUDA is present): bf16 training, SDPA/xformers attention, CUDA peak-memory metering."""

import pytest
import torch

import erase
from tests.unit.helpers import fresh_pipe, small_esd

pytestmark = pytest.mark.gpu


def _cuda_pipe(dtype=torch.float32):
    pipe = fresh_pipe()
    return pipe.to("cuda", dtype)


def test_bf16_esd_on_cuda_meters_cuda_memory():
    result = erase.run(_cuda_pipe(), small_esd(mixed_precision="bf16"), progress=False)
    assert result.record["memory_kind"] == "cuda_max_allocated" and result.record["peak_memory_bytes"] > 0
    assert result.delta.tensors and all(t.device.type == "cpu" for t in result.delta.tensors.values())


def test_half_model_trains_fp32_master_weights_and_keeps_its_dtype():
    pipe = _cuda_pipe(torch.float16)
    result = erase.run(pipe, small_esd(mixed_precision="fp16"), progress=False)
    assert all(t.dtype == torch.float16 for t in result.delta.tensors.values())
    assert all(torch.isfinite(torch.tensor(result.record["losses"])))


def test_attention_processors_are_restored_after_training():
    pipe = _cuda_pipe()
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    erase.run(pipe, small_esd(), progress=False)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before
