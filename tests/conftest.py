"""Shared fixtures: a small demo dataset (the real pipeline at 5% of the demo's size, vocab 512),
built once per test session; one intra-op thread for the modules of tiny models."""

import pytest
import torch

import data


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    data.prepare_demo(str(out), vocab_size=512, scale=0.05, quiet=True)
    return str(out)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: they gain nothing from more, and on a
    shared 2-core machine an OpenMP barrier waiting for a descheduled thread makes a 2 ms forward
    take 100 ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
