"""The GPU image's torch/CUDA pins: a pair PyTorch actually publishes, the torch scripts/install pins,
and the TensorRT package of the same CUDA major as the pyproject extra. Runs on CPU (reads files).

Why a table here and not the index: the index cannot be reached from CI, and a torch pinned to a CUDA
index it was never published for (torch 2.13 on cu128) fails only when someone builds the image.
"""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]

#: torch version -> the CUDA wheel indexes (download.pytorch.org/whl/<tag>) that carry it. A pin not
#: in this table fails the test: add its row, read from the index, before changing the Dockerfile.
#: Sources: https://pytorch.org/get-started/previous-versions/ (2.7-2.9, the install lines per
#: version) and, for 2.13, issue 25 read against https://download.pytorch.org/whl/torch/ (the
#: +cu126 and +cu130 wheels; no +cu128 from 2.12 on).
PUBLISHED: dict[str, frozenset[str]] = {
    "2.7.0": frozenset({"cu118", "cu126", "cu128"}),
    "2.8.0": frozenset({"cu126", "cu128", "cu129"}),
    "2.9.0": frozenset({"cu126", "cu128", "cu130"}),
    "2.13.0": frozenset({"cu126", "cu130"}),
}


def _dockerfile_args(text: str) -> dict[str, str]:
    return {m[0]: m[1].strip('"') for m in re.findall(r"^ARG (\w+)=(.+)$", text, flags=re.M)}


def check_image_pins(dockerfile: str, install_script: str, tensorrt_extra: list[str]) -> list[str]:
    """Every inconsistency between the image's pins, the published pairs, scripts/install and the extra."""
    from ditstream.trt_build.specs import TRT_PACKAGES

    args = _dockerfile_args(dockerfile)
    torch_version, index = args.get("TORCH_VERSION", ""), args.get("TORCH_CUDA", "")
    problems = []
    if index not in PUBLISHED.get(torch_version, frozenset()):
        problems.append(f"torch=={torch_version} is not published on the {index} index "
                        f"(known: {sorted(PUBLISHED.get(torch_version, ()))})")
    if "--index-url \"https://download.pytorch.org/whl/${TORCH_CUDA}\"" not in dockerfile:
        problems.append("the Dockerfile does not install torch from the TORCH_CUDA index")
    pin = re.search(r"torch==\$\{DITSTREAM_TORCH_VERSION:-([\w.+]+)\}", install_script)
    if pin is None or pin[1] != torch_version:
        problems.append(f"scripts/install pins torch {pin[1] if pin else '?'}, the image {torch_version}")
    major = index[2:4]
    base = re.search(r"nvidia/cuda:(\d+)\.", args.get("BASE_IMAGE", ""))
    if base is None or base[1] != major:
        problems.append(f"base image {args.get('BASE_IMAGE')} is not CUDA {major} like torch's {index} wheel")
    if args.get("TENSORRT") != TRT_PACKAGES.get(major):
        problems.append(f"TensorRT {args.get('TENSORRT')} is not the CUDA {major} package {TRT_PACKAGES.get(major)}")
    if tensorrt_extra != [args.get("TENSORRT")]:
        problems.append(f"the pyproject tensorrt extra {tensorrt_extra} differs from the image's {args.get('TENSORRT')}")
    return problems


def _repo_pins() -> tuple[str, str, list[str]]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return ((ROOT / "docker" / "Dockerfile").read_text(), (ROOT / "scripts" / "install").read_text(),
            pyproject["project"]["optional-dependencies"]["tensorrt"])


def test_gpu_image_installs_a_published_torch_cuda_pair():
    assert check_image_pins(*_repo_pins()) == []


def test_the_check_refuses_an_unpublished_pair_and_a_split_stack():
    dockerfile, install, extra = _repo_pins()
    cu128 = re.sub(r"^ARG TORCH_CUDA=.*$", "ARG TORCH_CUDA=cu128", dockerfile, flags=re.M)
    assert any("not published on the cu128 index" in p for p in check_image_pins(cu128, install, extra))
    cu126 = re.sub(r"^ARG TORCH_CUDA=.*$", "ARG TORCH_CUDA=cu126", dockerfile, flags=re.M)
    problems = check_image_pins(cu126, install, extra)  # torch CUDA 12, base and TensorRT still CUDA 13
    assert any("base image" in p for p in problems) and any("TensorRT" in p for p in problems)
    other_pin = install.replace("DITSTREAM_TORCH_VERSION:-2.13.0", "DITSTREAM_TORCH_VERSION:-2.12.0")
    assert any("scripts/install pins torch 2.12.0" in p for p in check_image_pins(dockerfile, other_pin, extra))
