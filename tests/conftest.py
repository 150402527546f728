"""Shared fixtures: a small demo dataset (the real pipeline at 5% of the demo's size, vocab 512),
built once per test session."""

import pytest

import data


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    data.prepare_demo(str(out), vocab_size=512, scale=0.05, quiet=True)
    return str(out)
