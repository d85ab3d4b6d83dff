"""TensorRT's 256-byte address alignment, checked on CPU (no tensorrt, no GPU needed).

``set_tensor_address`` takes raw pointers and needs them 256-byte aligned; a contiguous row slice of a
batch is a view that can start anywhere. The backend copies such an input into an aligned buffer and
refuses to bind a misaligned address.
"""

from __future__ import annotations

import pytest
import torch
from ditstream.engine.backends.tensorrt_backend import TRT_ALIGNMENT, _address, _Runner, aligned_for_trt
from ditstream.engine.errors import GenerationError


def _misaligned_rows(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch and its rows 1..2, which start 105 items in: 105, 210, 420 or 840 bytes, none a
    multiple of 64, so the view is misaligned whatever 64-byte aligned address the batch got."""
    batch = (torch.randn(4, 3, 5, 7) * 10).to(dtype)
    rows = batch[1:3]
    assert rows.is_contiguous() and rows.data_ptr() % TRT_ALIGNMENT != 0
    return batch, rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_a_misaligned_view_is_copied_into_an_aligned_buffer(dtype):
    _, rows = _misaligned_rows(dtype)
    out = aligned_for_trt(rows)
    assert out.data_ptr() % TRT_ALIGNMENT == 0
    assert out.shape == rows.shape and out.dtype == rows.dtype and out.is_contiguous()
    assert torch.equal(out, rows)
    assert out.data_ptr() != rows.data_ptr()  # a copy: TensorRT never reads the view


def test_an_aligned_tensor_is_passed_through_uncopied():
    t = aligned_for_trt(_misaligned_rows()[1])  # aligned by construction
    assert aligned_for_trt(t) is t


def test_a_misaligned_address_is_refused_not_bound():
    _, rows = _misaligned_rows()
    with pytest.raises(GenerationError, match=r"sample .* not 256-byte aligned"):
        _address("sample", rows)
    assert _address("sample", aligned_for_trt(rows)) % TRT_ALIGNMENT == 0


def test_the_runner_aligns_every_input_it_binds():
    """``_Runner.prepare`` is what ``__call__`` binds: dtype, device, contiguity and alignment."""
    runner = object.__new__(_Runner)  # no engine: prepare only reads device and dtypes
    runner.device = torch.device("cpu")
    runner.dtypes = {"sample": torch.float32, "timestep": torch.float32}
    _, rows = _misaligned_rows()
    feeds = runner.prepare({"sample": rows, "timestep": torch.arange(6, dtype=torch.float64)[1:3]})
    for name, tensor in feeds.items():
        assert tensor.data_ptr() % TRT_ALIGNMENT == 0, name
        assert tensor.dtype == torch.float32
    assert torch.equal(feeds["sample"], rows) and feeds["timestep"].tolist() == [1.0, 2.0]
