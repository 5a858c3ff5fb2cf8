"""Fixtures for the flare model tests (helpers live in ``flare.testing``)."""

from __future__ import annotations

import warnings

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # These models are tiny (hidden 64): OpenMP's thread hand-offs cost more than they save, and on a
    # shared 2-core machine 2 threads made a forward 10x slower (0.13-0.3 s vs 0.013-0.02 s measured).
    # Session scope: module-scoped fixtures (a shared trained run) start before function-scoped ones.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*")
        warnings.filterwarnings("ignore", message=".*mixes all positions of a sequence.*")
        yield
