"""train.py under several processes: per-step losses of tensor, sequence and data parallel runs,
and of each recomputation mode, equal those of one process with the same global batch; each run
frees every process group it made before it returns; a run resumed by another number of processes
than it was trained with is refused.

bf16 autocast on CPU (`--dtype bf16`) is the CPU stand-in for the CUDA path: every hand-written
backward (SwiGLU, the keep-shard linear, recomputation, the vocabulary-parallel loss, f and g)
runs under it in one process with each recompute mode, and under tp 2 + sp and pp 2. Its losses
stay within bf16's rounding of fp32's, and each parallel bf16 run equals one bf16 process.
"""

import os
from dataclasses import dataclass

import pytest

import train as T
from distributed import spawn_each

STEPS = 10
GLOBAL_BATCH = 8
WORLD = 4


def argv(data_dir, out, batch_size, *extra):
    return ["--data", data_dir, "--out", str(out), "--preset", "tiny", "--seq-len", "32",
            "--batch-size", str(batch_size), "--steps", str(STEPS), "--seed", "0",
            "--warmup", "3", "--eval-every", "100", "--eval-windows", "4", "--save-every", "100",
            "--samples", "0", "--device", "cpu", "--log-every", "100", *extra]


# bf16 keeps 8 bits of mantissa: one rounding is a relative 2^-8 = 0.39%. Over these few steps
# the bf16 losses stay within a fraction of that of fp32's (measured: 0.05%); a wrong gradient
# moves them by far more, since the loss falls by 1 nat over the run.
BF16_REL = 2 ** -8


@dataclass(frozen=True)
class Run:
    """One train.py configuration on the 4 workers: the ranks tp x pp leaves over are dp."""
    name: str
    tp: int = 1
    pp: int = 1
    micro_batches: int = 1
    flags: tuple = ()
    dtype: str = "fp32"


PARALLEL_RUNS = [
    Run("tp2_sp_dp2", tp=2, flags=("--sp",)),
    Run("tp2_dp2_selective", tp=2, flags=("--recompute", "selective")),
    Run("tp2_sp_dp2_selective", tp=2, flags=("--sp", "--recompute", "selective")),
    Run("tp4_full", tp=4, flags=("--recompute", "full")),
    Run("dp4"),
    Run("bf16_tp2_sp_dp2_selective", tp=2, flags=("--sp", "--recompute", "selective"),
        dtype="bf16"),
    Run("bf16_pp2_dp2", pp=2, micro_batches=2, dtype="bf16"),
]


def run_argv(data_dir, root, run: Run) -> list:
    dp = WORLD // (run.tp * run.pp)
    micro_batch = GLOBAL_BATCH // dp // run.micro_batches             # sequences, per dp rank
    return argv(data_dir, f"{root}/{run.name}", micro_batch, "--tp", str(run.tp), "--pp",
                str(run.pp), "--micro-batches", str(run.micro_batches), "--dtype", run.dtype,
                *run.flags)


@pytest.fixture(scope="module")
def single_process(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    out = {}
    for dtype in ("fp32", "bf16"):
        for mode in ("none", "selective", "full"):
            out[dtype, mode] = T.main(argv(demo_data, root / f"{dtype}-{mode}", GLOBAL_BATCH,
                                           "--recompute", mode, "--dtype", dtype))["losses"]
    return out


@pytest.fixture(scope="module")
def parallel(demo_data, tmp_path_factory):
    """{run name: per rank, {step: loss}}: train.main on 4 workers, one run after the other."""
    root = tmp_path_factory.mktemp("parallel")
    results = spawn_each(main_and_groups_left, WORLD,
                         [run_argv(demo_data, root, run) for run in PARALLEL_RUNS], timeout=400)
    return {run.name: ranks for run, ranks in zip(PARALLEL_RUNS, results)}


def main_and_groups_left(argv) -> dict:
    """train.main on a worker, and how many of the process groups it made are still alive when
    it returns (at module level: a spawned worker imports it)."""
    import weakref

    import parallel as P
    real, made = P.make_grid, []

    def make_grid(*args, **kwargs):
        grid = real(*args, **kwargs)
        made.extend(weakref.ref(g) for g in (grid.tp_group, grid.dp_group, grid.pp_group) if g)
        return grid
    P.make_grid = make_grid
    try:
        return dict(T.main(argv), groups_made=len(made),
                    groups_left=sum(ref() is not None for ref in made))
    finally:
        P.make_grid = real


def test_recompute_modes_equal_in_one_process(single_process):
    for mode in ("selective", "full"):
        for step, loss in single_process["fp32", "none"].items():
            assert single_process["fp32", mode][step] == pytest.approx(loss, rel=1e-5)


def test_bf16_autocast_on_cpu_trains_in_every_recompute_mode(single_process):
    fp32 = single_process["fp32", "none"]
    for mode in ("none", "selective", "full"):
        bf16 = single_process["bf16", mode]
        assert bf16 != fp32                                   # bf16 really ran
        for step, loss in fp32.items():
            assert bf16[step] == pytest.approx(loss, rel=BF16_REL), (mode, step)


def test_parallel_runs_equal_one_process(parallel, single_process):
    for dtype, rel in (("fp32", 1e-4), ("bf16", BF16_REL)):
        reference = single_process[dtype, "none"]
        assert sorted(reference) == list(range(1, STEPS + 1))
        assert reference[STEPS] < reference[1] - 1.0          # it learns: the check has teeth
        for run in PARALLEL_RUNS:
            if run.dtype != dtype:
                continue
            for rank, result in enumerate(parallel[run.name]):   # every rank logs the same losses
                for step, loss in reference.items():
                    assert result["losses"][step] == pytest.approx(loss, rel=rel), \
                        f"{run.name}, rank {rank}, step {step}"


def test_a_finished_run_leaves_no_process_group_alive(parallel):
    """A gloo group still alive at interpreter exit, after the group is left, can abort a run that
    has finished (exit -6): train.main frees every group it made, in every configuration."""
    for run in PARALLEL_RUNS:
        for rank, result in enumerate(parallel[run.name]):
            assert result["groups_made"] >= 1, (run.name, rank)
            assert result["groups_left"] == 0, (run.name, rank)


def signalled_in_step_4(argv) -> dict:
    """train.main on a worker, rank 1 sent SIGTERM in the second of four micro-batches of
    step 4 (at module level: a spawned worker imports it)."""
    import os
    import signal

    import torch

    import parallel as P
    real, calls = P.loss_fn, []

    def loss(logits, targets, grid):
        if torch.is_grad_enabled():                      # a training micro-batch
            calls.append(1)
            if len(calls) == 3 * 4 + 2 and os.environ["RANK"] == "1":
                os.kill(os.getpid(), signal.SIGTERM)
        return real(logits, targets, grid)
    P.loss_fn = loss
    return dict(T.main(argv), micro_batches_run=len(calls))


def test_a_stop_on_one_rank_between_micro_batches_drops_the_step_on_all(demo_data, tmp_path):
    """dp 2: only rank 1 is signalled, mid-step; both ranks drop step 4 (none is left waiting in
    the all-reduce of a step the other dropped), step 3 is saved, and --resume finishes the run
    with the losses of one process."""
    flags = ("--steps", "6", "--micro-batches", "4", "--log-every", "1")
    one = T.main(argv(demo_data, tmp_path / "one", 4, *flags))["losses"]
    out = tmp_path / "dp2"
    stopped = spawn_each(signalled_in_step_4, 2, [argv(demo_data, out, 2, *flags)])[0]
    assert [r["stopped_at"] for r in stopped] == [3, 3]
    assert [r["micro_batches_run"] for r in stopped] == [14, 14]    # step 4: two of four
    resumed = spawn_each(T.main, 2, [["--out", str(out), "--resume"]])[0]
    for rank in resumed:
        assert sorted(rank["losses"]) == [4, 5, 6]
        for step in (4, 5, 6):
            assert rank["losses"][step] == pytest.approx(one[step], rel=1e-4)


def files_under(folder) -> dict:
    """{path inside folder: its bytes}: what a run left there."""
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


def test_a_run_resumes_only_at_the_world_size_it_was_trained_at(demo_data, tmp_path, capsys):
    """dp is the world left over by tp x pp, and the global batch counts it: a dp 2 run resumed
    by one process would train on half its batch, and a tp 2 run needs its 2 processes, not a
    multiple of 2. Both are refused in one line naming the count, before anything is trained or
    written."""
    flags = ("--steps", "2", "--warmup", "1", "--save-every", "2")
    runs = {"dp2": (2, ()), "tp2": (4, ("--tp", "2"))}         # (batch size, flags) on 2 ranks
    spawn_each(T.main, 2, [argv(demo_data, tmp_path / name, batch_size, *flags, *extra)
                           for name, (batch_size, extra) in runs.items()])
    for name, grid in (("dp2", "dp 2 x tp 1 x pp 1"), ("tp2", "dp 1 x tp 2 x pp 1")):
        out = tmp_path / name
        before = files_under(out)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            T.main(["--out", str(out), "--resume", "--steps", "4"])
        ckpt = out / "checkpoints" / "step-000002"
        assert e.value.code == 2
        assert capsys.readouterr().err == (
            f"error: cannot resume {ckpt} at world size 1: the run was trained at world size 2 "
            f"({grid}), and another would change its global batch or its grid; launch 2 "
            f"processes, or start a new run from these weights with --init-from {ckpt}\n")
        assert files_under(out) == before
