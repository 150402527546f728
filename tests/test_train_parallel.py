"""train.py under several processes: per-step losses of tensor, sequence and data parallel runs,
and of each recomputation mode, equal those of one process with the same global batch."""

import os

import pytest

import train as T
from distributed import free_port, spawn

STEPS = 10
GLOBAL_BATCH = 8


def argv(data_dir, out, batch_size, *extra):
    return ["--data", data_dir, "--out", str(out), "--preset", "tiny", "--seq-len", "32",
            "--batch-size", str(batch_size), "--steps", str(STEPS), "--seed", "0",
            "--warmup", "3", "--eval-every", "100", "--eval-windows", "4", "--save-every", "100",
            "--samples", "0", "--device", "cpu", "--log-every", "100", *extra]


# (name, world size, tensor parallel, extra flags)
PARALLEL_RUNS = [
    ("tp2_sp_dp2", 4, 2, ["--sp"]),
    ("tp2_dp2_selective", 4, 2, ["--recompute", "selective"]),
    ("tp2_sp_dp2_selective", 4, 2, ["--sp", "--recompute", "selective"]),
    ("tp4_full", 4, 4, ["--recompute", "full"]),
    ("dp4", 4, 1, []),
]


def run_configs(data_dir, root, runs, ports):
    """In each worker: one train.main() per configuration, one after the other.

    NOTE: each configuration joins a fresh process group on its own port: the previous group's
    store may still hold the old one while a slower rank leaves it.
    """
    losses = {}
    for (name, world, tp, extra), port in zip(runs, ports):
        os.environ["MASTER_PORT"] = str(port)
        dp = world // tp
        result = T.main(argv(data_dir, f"{root}/{name}", GLOBAL_BATCH // dp, "--tp", str(tp), *extra))
        losses[name] = result["losses"]
    return losses


@pytest.fixture(scope="module")
def single_process(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    out = {}
    for mode in ("none", "selective", "full"):
        out[mode] = T.main(argv(demo_data, root / mode, GLOBAL_BATCH, "--recompute", mode))["losses"]
    return out


def test_recompute_modes_equal_in_one_process(single_process):
    for mode in ("selective", "full"):
        for step, loss in single_process["none"].items():
            assert single_process[mode][step] == pytest.approx(loss, rel=1e-5)


def test_parallel_runs_equal_one_process(demo_data, tmp_path, single_process):
    ports = [free_port() for _ in PARALLEL_RUNS]
    results = spawn(run_configs, 4, demo_data, str(tmp_path), PARALLEL_RUNS, ports, timeout=400)
    reference = single_process["none"]
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert reference[STEPS] < reference[1] - 1.0              # it learns: the check has teeth
    for rank_losses in results:                               # every rank logs the same losses
        for name, *_ in PARALLEL_RUNS:
            for step, loss in reference.items():
                assert rank_losses[name][step] == pytest.approx(loss, rel=1e-4), (name, step)
