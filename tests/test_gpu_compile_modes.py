"""Which torch.compile settings replay CUDA graphs (so outputs are copied out, batches padded to
buckets and steps marked). Runs on CPU: the decision reads inductor's own mode table."""

from __future__ import annotations

import pytest
from ditstream.engine.backends.compile_backend import uses_cuda_graphs


@pytest.mark.parametrize("mode,graphs", [("reduce-overhead", True), ("max-autotune", True), ("default", False),
                                         ("max-autotune-no-cudagraphs", False)])
def test_inductor_modes_on_cuda(mode, graphs):
    assert uses_cuda_graphs("cuda", mode) is graphs


def test_no_cuda_graphs_off_cuda_or_with_a_backend_that_does_not_capture():
    assert not uses_cuda_graphs("cpu", "max-autotune")
    assert not uses_cuda_graphs("cpu", "reduce-overhead")
    assert not uses_cuda_graphs("cuda", "reduce-overhead", "eager")
    assert not uses_cuda_graphs("cuda", "default", "aot_eager")
    assert uses_cuda_graphs("cuda", "default", "cudagraphs")


def test_an_unknown_mode_is_inductors_error_not_a_guess():
    with pytest.raises(RuntimeError, match="Unrecognized mode"):
        uses_cuda_graphs("cuda", "fastest")
