"""Test setup: the same files run real kernels on CUDA and the Triton interpreter on CPU.

TRITON_INTERPRET is read when kernels are decorated, so it is set here, before anything imports
flare_kernels. ``torch.cuda.is_available()`` only counts devices (no context is created).
"""

import os
import time

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import flare_kernels  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not ON_GPU:
            item.add_marker(skip_gpu)


def pytest_runtest_setup(item):
    # Set by the GPU check (benchmarks/gpu_check/testrun.py): a time (seconds since the epoch) after
    # which no further GPU test starts, so that its one device call ends inside its budget with a
    # complete junit report. The names live there: tests import no conftest by name (a second
    # conftest.py, tests/flare's, may hold that module name in a whole-suite run).
    from benchmarks.gpu_check.budget import BUDGET_SKIP_REASON, DEADLINE_ENV

    deadline = os.environ.get(DEADLINE_ENV)
    if deadline and "gpu" in item.keywords and time.time() > float(deadline):
        pytest.skip(BUDGET_SKIP_REASON)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture
def triton_backend():
    """Run the test body on the Triton kernels (interpreted on CPU)."""
    with flare_kernels.use_backend("triton"):
        yield


@pytest.fixture
def torch_backend():
    with flare_kernels.use_backend("torch"):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
