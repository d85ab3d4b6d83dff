"""What the ``gpu``-marked tests share: the device they run on, and the skip where it is missing.

``DITSTREAM_GPU_TESTS_DEVICE=cpu`` runs them on the CPU as a stand-in (their logic, not their speed);
``scripts/gpu-check`` finds them by their ``pytest.mark.gpu``, which each module keeps in its own
``pytestmark``.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("DITSTREAM_GPU_TESTS_DEVICE", "cuda")
NEEDS_GPU = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                               reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
