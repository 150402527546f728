"""Runs as users run them: the README's resume commands verbatim, kills, full disks, two runs on
one folder, damaged files and bad numbers, for train.py, generate.py and planner.py (data.py's and
eval.py's own cases sit in their test files).

Each case checks three things: the exact one-line message, the exit code, and what is (still) on
disk. A full disk is the kernel's own: writes into /dev/full fail with ENOSPC.
"""

import builtins
import errno
import fcntl
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import time

import pytest
import torch

import checkpoint as C
import cli
import data
import generate as G
import model as M
import parallel as P
import planner
import train as T
from distributed import (children, free_port, losses, python, start, torchrun, torchrun_env,
                         wait_for_step)
from test_generate import tiny_model, tok_path, write_checkpoint  # noqa: F401 (a fixture)
from test_train import base_argv, read_metrics

pytestmark = pytest.mark.slow


def one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --- 1. --resume continues the saved run -------------------------------------------------------

# The README's pair, `python train.py --preset tiny --steps 1000 --out out/run1 --data data/demo
# --mix code=0.7,docs=0.3` then `python train.py --out out/run1 --resume`, at test sizes: the flags
# after SMALL only make it fast, and the resume command is the README's, word for word.
SMALL = ["--seq-len", "32", "--batch-size", "4", "--warmup", "3", "--eval-every", "100",
         "--eval-windows", "4", "--save-every", "100", "--samples", "0", "--device", "cpu",
         "--log-every", "1"]


def readme_run(out, data_dir):
    return ["train.py", "--preset", "tiny", "--steps", "12", "--out", str(out), "--data",
            data_dir, "--mix", "code=0.7,docs=0.3", *SMALL]


def test_readme_resume_pair_with_a_sigterm_finishes_the_run_exactly(demo_data, tmp_path):
    straight = T.main(readme_run(tmp_path / "straight", demo_data)[1:])["losses"]
    out = tmp_path / "run1"
    proc = start(*readme_run(out, demo_data), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_step(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0 and "saving step" in proc.stdout.read()
    stopped = max(losses(out))
    assert stopped < 12                                       # really stopped in the middle
    resumed = python("train.py", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out}/checkpoints/step-{stopped:06d} at step {stopped}" in resumed.stdout
    assert losses(out) == pytest.approx(straight, rel=1e-6)   # steps 1..12, once each, equal
    assert sorted(losses(out)) == list(range(1, 13))
    config = json.load(open(C.latest(str(out))
                            + "/train_config.json"))
    assert config["mix"] == "code=0.7,docs=0.3" and config["steps"] == 12
    # --mix is the run's: every step's 4 windows come from code and docs alone (the demo's other
    # sources get none), code's share within one window of 0.7 (deficit scheduling), and the
    # resumed run's batches are the straight run's, step for step
    rows = {run: {r["step"]: r["tokens_by_source"] for r in read_metrics(tmp_path / run)
                  if "tokens_by_source" in r} for run in ("straight", "run1")}
    assert rows["run1"] == rows["straight"] and sorted(rows["run1"]) == list(range(1, 13))
    for step, tokens in rows["run1"].items():
        windows = {name: count / 33 for name, count in tokens.items()}   # seq_len + 1 tokens
        assert set(windows) == {"code", "docs"} and sum(windows.values()) == 4 * step
        assert abs(windows["code"] - 0.7 * 4 * step) <= 1


@pytest.mark.parametrize("flag,value,shown,saved", [
    ("--lr", "1e-3", "0.001", "0.003"), ("--mix", "code=1", "code=1", "'code=0.7,docs=0.3'"),
    ("--seq-len", "64", "64", "32"), ("--seed", "1", "1", "0")])
def test_resume_refuses_a_flag_that_would_change_the_run(demo_data, tmp_path, capsys, flag,
                                                         value, shown, saved):
    T.main(readme_run(tmp_path, demo_data)[1:] + ["--steps", "2", "--warmup", "1",
                                                  "--save-every", "2"])
    before = (sorted(os.listdir(tmp_path / "checkpoints")), losses(tmp_path))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        T.main(["--out", str(tmp_path), "--resume", flag, value])
    assert e.value.code == 2
    ckpt = f"{tmp_path}/checkpoints/step-000002"
    assert one_error_line(capsys.readouterr().err) == (
        f"error: cannot resume {ckpt} with {flag} {shown}: the run was trained with {flag} "
        f"{saved}, and another value would not continue it; drop {flag}, or start a new run "
        f"from these weights with --init-from {ckpt}")
    assert (sorted(os.listdir(tmp_path / "checkpoints")), losses(tmp_path)) == before


def test_resume_extends_steps_and_a_finished_run_says_so(demo_data, tmp_path, capsys):
    T.main(base_argv(demo_data, tmp_path, "--steps", "4", "--save-every", "2"))
    capsys.readouterr()
    done = T.main(["--out", str(tmp_path), "--resume"])
    assert done["finished"] and done["losses"] == {}
    assert capsys.readouterr().out.strip() == (
        f"{tmp_path} is finished: it trained 4 steps of --steps 4; give --steps N (more than "
        "that) to train it further")
    more = T.main(["--out", str(tmp_path), "--resume", "--steps", "6"])
    cfg6 = T.TrainConfig(steps=6, lr=3e-3, warmup=3)
    cfg4 = T.TrainConfig(steps=4, lr=3e-3, warmup=3)
    assert (f"--steps 6: the run was planned for 4 steps; the cosine decay is recomputed over 6, "
            f"so the learning rate goes from {T.lr_at(3, cfg4):.3g} at step 4 to "
            f"{T.lr_at(4, cfg6):.3g} at step 5, and reaches its floor at step 6"
            in capsys.readouterr().out)
    assert sorted(more["losses"]) == [5, 6]
    rows = [r for r in read_metrics(tmp_path) if "lr" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["lr"] == pytest.approx(T.lr_at(5, cfg6))


# --- 2. nothing on disk is lost ----------------------------------------------------------------

def temporary_file_on_a_full_disk(prefix, suffix, dir):
    """tempfile.mkstemp, its file the kernel's full disk: a link to /dev/full under its name."""
    tmp = os.path.join(dir, f"{prefix}full{suffix}")
    os.symlink("/dev/full", tmp)
    return os.open(tmp, os.O_WRONLY), tmp


def test_write_atomic_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "latest"
    path.write_text("step-000002")
    monkeypatch.setattr(C.tempfile, "mkstemp", temporary_file_on_a_full_disk)
    with pytest.raises(OSError) as e:
        C.write_atomic(str(path), "step-000004")
    assert e.value.errno == errno.ENOSPC
    assert path.read_text() == "step-000002" and os.listdir(tmp_path) == ["latest"]
    with pytest.raises(OSError):
        C.log_metrics("/dev/full", dict(step=1, loss=2.0))   # appends fail loudly too


def test_two_writes_of_one_path_at_once_each_complete_whole(tmp_path, monkeypatch):
    """Two eval.py --out of one report finishing together: a second write of the path runs
    while the first flushes its file. Each writes a file of its own; neither fails, and the
    path holds one of them whole (the one renamed last), nothing else is left."""
    path, real_fsync = str(tmp_path / "report.json"), os.fsync

    def another_write_meanwhile(fd):
        monkeypatch.setattr(C.os, "fsync", real_fsync)
        C.write_atomic(path, json.dumps({"writer": "B"}))
        real_fsync(fd)
    monkeypatch.setattr(C.os, "fsync", another_write_meanwhile)
    C.write_atomic(path, json.dumps({"writer": "A", "pad": "A" * 100_000}))
    assert json.load(open(path))["writer"] == "A" and os.listdir(tmp_path) == ["report.json"]


def test_a_write_whose_rename_fails_leaves_no_temporary_file(tmp_path):
    os.makedirs(tmp_path / "latest")                  # a folder where the file goes
    with pytest.raises(IsADirectoryError):
        C.write_atomic(str(tmp_path / "latest"), "step-000004")
    assert os.listdir(tmp_path) == ["latest"]


def test_a_runs_leftovers_are_removed_its_checkpoints_kept(tmp_path):
    """What killed writes leave in checkpoints/: a step folder being built, a `latest` being
    written (write_atomic's temporary file); removed when a run takes the folder again."""
    for folder in ("step-000002", ".tmp-step-000004"):
        os.makedirs(tmp_path / folder)
    for name in ("latest", "latest.k2j_3xq9.tmp", "notes.tmp"):   # the last: no write_atomic's
        (tmp_path / name).write_text("step-000002")
    C.remove_leftovers(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["latest", "notes.tmp", "step-000002"]


def test_full_disk_during_a_save_is_one_line_and_keeps_latest(demo_data, tmp_path, monkeypatch,
                                                             capsys):
    real_save = torch.save

    def into_full_disk(obj, path, *a, **k):
        if "step-000004" in str(path):
            return real_save(obj, "/dev/full", *a, **k)     # torch's own error on ENOSPC
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", into_full_disk)
    with pytest.raises(SystemExit) as e:
        T.main(base_argv(demo_data, tmp_path, "--steps", "6", "--save-every", "2"))
    assert e.value.code == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: could not write {tmp_path}/checkpoints/.tmp-step-000004/")
    assert line.endswith("is the disk full? (then --resume continues the run)")
    assert C.latest(str(tmp_path)).endswith("step-000002")
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".tmp")]
    monkeypatch.undo()                                          # space freed: the advice holds
    T.main(["--out", str(tmp_path), "--resume"])
    assert C.latest(str(tmp_path)).endswith("step-000006")


def test_a_torn_metrics_line_is_dropped_on_resume(demo_data, tmp_path):
    T.main(base_argv(demo_data, tmp_path, "--steps", "4", "--save-every", "2"))
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "lo')                           # a kill in the middle of a write
    T.main(["--out", str(tmp_path), "--resume", "--steps", "6"])
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_one_run_per_out_with_a_lock_that_a_kill_cannot_leave_stuck(demo_data, tmp_path, capsys):
    # The owner holds the lock as a run does (checkpoint.lock_run): locked, with its pid inside.
    lock = tmp_path / "busy" / "train.lock"
    os.makedirs(tmp_path / "busy")
    owner = start("-c", "import fcntl, os, socket, sys, time; "
                  "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                  "fcntl.flock(fd, fcntl.LOCK_EX); "
                  "os.write(fd, f'{os.getpid()} {socket.gethostname()}'.encode()); "
                  "time.sleep(60)", str(lock))
    try:
        deadline = time.time() + 60
        while not (lock.exists() and lock.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(SystemExit) as e:
            T.main(base_argv(demo_data, tmp_path / "busy"))
        assert e.value.code == 2
        assert one_error_line(capsys.readouterr().err) == (
            f"error: {tmp_path}/busy is in use by another run (pid {owner.pid} on "
            f"{socket.gethostname()}); wait for it to end, or choose another --out")
        assert os.listdir(tmp_path / "busy") == ["train.lock"]
    finally:
        owner.kill()
        owner.wait()
    # the owner is gone (as after kill -9): its lock is stale, taken over, and released at the end
    T.main(base_argv(demo_data, tmp_path / "busy", "--steps", "2", "--warmup", "1"))
    assert not (tmp_path / "busy" / "train.lock").exists()


def test_a_lock_won_on_the_file_its_run_just_removed_is_taken_again(tmp_path, monkeypatch):
    """Run B opens train.lock; run A ends (removes the file, then closes it); B's flock then
    succeeds, on a file no longer in OUT, where a third run would make a new train.lock and
    lock that too. B sees that what it locked is not OUT/train.lock, and locks that instead."""
    out, path = str(tmp_path), os.path.join(str(tmp_path), "train.lock")
    a = C.lock_run(out)
    flock, ended = fcntl.flock, []

    def a_ends_before_b_flocks(fd, operation):
        if not ended:
            ended.append(C.unlock_run(out, a))
        flock(fd, operation)
    monkeypatch.setattr(fcntl, "flock", a_ends_before_b_flocks)
    b = C.lock_run(out)
    monkeypatch.undo()
    assert ended and os.path.samestat(os.fstat(b), os.stat(path))
    with pytest.raises(ValueError) as e:
        C.lock_run(out)                                      # the third run
    assert str(e.value).startswith(f"{out} is in use by another run (pid {os.getpid()} on ")
    C.unlock_run(out, b)
    assert not os.path.exists(path)


def test_two_runs_started_together_on_one_out(demo_data, tmp_path):
    argv = ["train.py", *base_argv(demo_data, tmp_path, "--steps", "30")]
    first = start(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    second = python(*argv)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.returncode == 2
    line = one_error_line(second.stderr)
    assert "is in use by another run" in line or "already holds a run" in line
    assert sorted(losses(tmp_path)) == list(range(1, 31))     # one run's steps, once each


@pytest.mark.parametrize("damage", ["missing", "dangling"])
def test_a_lost_latest_neither_lets_a_new_run_in_nor_stops_resume(demo_data, tmp_path, capsys,
                                                                  damage):
    T.main(base_argv(demo_data, tmp_path, "--steps", "4", "--save-every", "2"))
    pointer = tmp_path / "checkpoints" / "latest"
    pointer.unlink() if damage == "missing" else pointer.write_text("step-000099")
    before = losses(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        T.main(base_argv(demo_data, tmp_path, "--steps", "4"))
    assert e.value.code == 2
    assert one_error_line(capsys.readouterr().err).endswith(
        "; pass --resume to continue it, or choose another --out")
    assert losses(tmp_path) == before                          # nothing deleted
    resumed = T.main(["--out", str(tmp_path), "--resume", "--steps", "6"])
    assert sorted(resumed["losses"]) == [5, 6]                 # from step-000004, the newest
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-000004",
                                                            "step-000006"]


def test_a_corrupt_latest_falls_back_to_the_one_before(demo_data, tmp_path, monkeypatch,
                                                       capsys):
    straight = T.main(base_argv(demo_data, tmp_path / "straight", "--steps", "8"))["losses"]
    out = tmp_path / "run"
    real_clip, calls = P.clip_grad_norm, []

    def crash_at_step_7(*a, **k):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt("simulated crash")
        return real_clip(*a, **k)

    monkeypatch.setattr(P, "clip_grad_norm", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        T.main(base_argv(demo_data, out, "--steps", "8", "--save-every", "2"))
    monkeypatch.setattr(P, "clip_grad_norm", real_clip)
    weights = out / "checkpoints" / "step-000006" / "consolidated.00.pth"
    weights.write_bytes(weights.read_bytes()[:1000])           # truncated
    capsys.readouterr()
    resumed = T.main(["--out", str(out), "--resume"])
    said = capsys.readouterr().out
    assert f"cannot read checkpoint {out}/checkpoints/step-000006 (ValueError: cannot read " \
           f"{weights} (" in said
    assert "it is truncated, corrupt, or not a torch.save zip file; copy or convert it again); " \
           "falling back to the complete checkpoint before it" in said
    assert f"resumed from {out}/checkpoints/step-000004 at step 4" in said
    assert resumed["losses"] == pytest.approx({s: straight[s] for s in (5, 6, 7, 8)}, rel=1e-6)


def test_non_finite_weights_never_become_latest(demo_data, tmp_path, monkeypatch, capsys):
    real_step, calls = torch.optim.AdamW.step, []

    def poisons_on_the_third(self, *a, **k):
        out = real_step(self, *a, **k)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisons_on_the_third)
    with pytest.raises(SystemExit) as e:
        T.main(base_argv(demo_data, tmp_path, "--steps", "6", "--save-every", "2"))
    assert e.value.code == 1
    assert one_error_line(capsys.readouterr().err) == (
        f"error: the weights are not finite at step 4: not saved, the latest checkpoint is still "
        f"{tmp_path}/checkpoints/step-000002; lower --lr and resume")
    assert C.latest(str(tmp_path)).endswith("step-000002")
    assert not (tmp_path / "checkpoints" / "step-000004").exists()


# --- 3, 4. no silent wrong result, one line, never a traceback -----------------------------------

@pytest.mark.parametrize("extra,message", [
    (["--clip", "-1"], "--clip=-1.0 must be a positive global norm, e.g. 1.0 (a huge one, 1e9, "
                       "turns clipping off)"),
    (["--clip", "nan"], "--clip=nan must be a positive global norm, e.g. 1.0 (a huge one, 1e9, "
                        "turns clipping off)"),
    (["--lr", "inf"], "--lr=inf must be a positive number, e.g. 3e-4"),
    (["--weight-decay", "nan"], "--weight-decay=nan must be 0 or more, e.g. 0.1"),
    (["--beta2", "1"], "--beta2=1.0 must be in [0, 1), e.g. 0.95"),
    (["--timeout", "0"], "--timeout=0.0 must be positive seconds, e.g. 600"),
    (["--samples", "-1"], "--samples=-1 must be 0 to 3"),
    (["--seed", "-1"], "--seed=-1 must be 0 to 2**64 - 1"),
    (["--seed", str(2**64)], f"--seed={2**64} must be 0 to 2**64 - 1"),
])
def test_bad_numbers_are_refused_before_anything_is_written(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        T.main(base_argv(str(tmp_path / "no-data"), tmp_path / "out", *extra))
    assert e.value.code == 2
    assert one_error_line(capsys.readouterr().err) == f"error: {message}"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("script,argv,status", [
    ("train.py", ["--steps", "abc"], 2),
    ("generate.py", ["--ckpt", "ckpt", "--prompt", "the", "--max-new-tokens", "abc"], 1),
    ("planner.py", ["--gpus", "abc"], 2),
])
def test_a_bad_number_flag_is_refused_in_one_line_as_a_user_types_it(script, argv, status):
    run = python(script, *argv)
    assert run.returncode == status and run.stdout == ""
    assert run.stderr == (f"error: argument {argv[-2]}: invalid int value: 'abc'; see python "
                          f"{script} --help\n")


def test_an_out_that_is_a_file_is_refused(demo_data, tmp_path, capsys):
    (tmp_path / "out").write_text("my notes")
    with pytest.raises(SystemExit) as e:
        T.main(base_argv(demo_data, tmp_path / "out"))
    assert e.value.code == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: --out {tmp_path}/out cannot be written (File exists); choose a writable folder")
    assert (tmp_path / "out").read_text() == "my notes"


def generate_error(*argv) -> str:
    with pytest.raises(SystemExit) as e:
        G.main(list(argv))
    assert e.value.code not in (0, None)
    return e.value.code                                         # sys.exit's one-line message


def test_generate_reads_damaged_checkpoints_in_one_line(tmp_path, tok_path):  # noqa: F811
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_model(), tok_path)
    weights = os.path.join(ckpt, "consolidated.00.pth")
    good = open(weights, "rb").read()
    open(weights, "wb").write(good[:len(good) // 2])
    assert generate_error("--ckpt", ckpt, "--prompt", "the").startswith(
        f"error: cannot read {weights} (")
    torch.save(tiny_model().state_dict(), weights, _use_new_zipfile_serialization=False)
    assert generate_error("--ckpt", ckpt, "--prompt", "the").endswith(
        "it is truncated, corrupt, or not a torch.save zip file; copy or convert it again")
    open(weights, "wb").write(good)
    params = os.path.join(ckpt, "params.json")
    json.dump({**json.load(open(params)), "dim": "64"}, open(params, "w"))
    assert generate_error("--ckpt", ckpt, "--prompt", "the") == (
        f"error: {params}: ModelArgs.dim='64' must be an integer")
    open(params, "w").write("{not json")
    assert generate_error("--ckpt", ckpt, "--prompt", "the").startswith(
        f"error: {params} is not valid JSON (")


def test_a_damaged_params_json_says_where_to_get_it_again(tmp_path, tok_path):  # noqa: F811
    """A release's params.json is restored from the release; a run's step folder (its
    train_config.json beside it) has no release: its params.json is the same in every
    checkpoint of the run."""
    release = write_checkpoint(tmp_path / "release", tiny_model(), tok_path)
    step = write_checkpoint(tmp_path / "run" / "checkpoints" / "step-000006", tiny_model(),
                            tok_path)
    open(os.path.join(step, "train_config.json"), "w").write("{}")
    for folder, fix in ((release, "restore it from the release"),
                        (step, "copy it from another checkpoint of the run")):
        params = os.path.join(folder, "params.json")
        open(params, "w").write('{"dim": 6')                     # cut short
        with pytest.raises(ValueError) as e:
            C.read_params(folder)
        assert str(e.value).startswith(f"{params} is not valid JSON (")
        assert str(e.value).endswith(f"); {fix}")


@pytest.mark.parametrize("extra,message", [
    (["--max-new-tokens", "0"], "--max-new-tokens=0 must be 1 or more"),
    (["--temperature", "-1"], "--temperature=-1.0 must be 0 (greedy) or more"),
    (["--top-p", "1.5"], "--top-p=1.5 must be in (0, 1]; 1 turns it off"),
    (["--top-k", "-2"], "--top-k=-2 must be 0 (off) or more"),
    (["--tp", "0"], "--tp=0 must be 1 or more"),
    (["--device", "tpu9"], "--device 'tpu9' is not a device; use cpu or cuda"),
    (["--prompt", "caf\udce9"], "--prompt 'caf\\udce9' is not valid UTF-8 text; give it as "
                                "UTF-8"),
])
def test_generate_refuses_bad_options_before_reading_weights(tmp_path, extra, message):
    assert generate_error("--ckpt", str(tmp_path / "nowhere"), "--prompt", "the",
                          *extra) == f"error: {message}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_generate_on_cuda_without_cuda(tmp_path):
    assert generate_error("--ckpt", str(tmp_path), "--prompt", "x", "--device", "cuda") == (
        "error: --device cuda but no CUDA device is visible; use --device cpu")


def test_export_hf_checks_its_folder_before_any_work(tmp_path, tok_path):  # noqa: F811
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_model(), tok_path)
    (tmp_path / "file").write_text("x")
    assert generate_error("--ckpt", ckpt, "--export-hf", str(tmp_path / "file")) == (
        f"error: --export-hf {tmp_path}/file exists and is not an empty folder; give a new "
        "folder (nothing is overwritten)")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    assert "is not an empty folder" in generate_error("--ckpt", ckpt, "--export-hf",
                                                      str(tmp_path / "full"))
    assert (tmp_path / "file").read_text() == "x"
    assert os.listdir(tmp_path / "full") == ["config.json"]


@pytest.mark.parametrize("argv,message", [
    (["--gpus", "0"], "--gpus=0 must be 1 or more"),
    (["--n-heads", "0"], "--n-heads=0 must be 1 or more"),
    (["--micro-batch", "-1"], "--micro-batch=-1 must be 1 or more"),
    (["--train-tokens", "lots"], "--train-tokens 'lots' must be a positive count such as 4M or "
                                 "1.4T"),
    (["--global-batch-tokens", "nan"], "--global-batch-tokens 'nan' must be a positive count "
                                       "such as 4M or 1.4T"),
])
def test_planner_refuses_bad_numbers_in_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        planner.main(argv)
    assert e.value.code == 2
    assert one_error_line(capsys.readouterr().err) == f"error: {message}"


# --- 5. distributed jobs end instead of hanging --------------------------------------------------

def test_a_frozen_rank_ends_the_job_within_the_timeout(demo_data, tmp_path):
    """Two ranks (dp 2) with --timeout 5; rank 1 is frozen with SIGSTOP mid-run. Rank 0 must
    stop within the timeout, in one line, instead of waiting 30 minutes."""
    port, procs = free_port(), []
    argv = ["train.py", *base_argv(demo_data, tmp_path, "--steps", "100000", "--timeout", "5",
                                   "--batch-size", "2")]
    for rank in range(2):
        env = dict(os.environ, **torchrun_env(rank, 2, port), OMP_NUM_THREADS="1")
        procs.append(start(*argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    try:
        wait_for_step(tmp_path, 3, procs[0])
        procs[1].send_signal(signal.SIGSTOP)
        t = time.monotonic()
        code = procs[0].wait(timeout=120)
        err = procs[0].stderr.read()
        assert code == 1, err
        assert time.monotonic() - t < 60
        line = [l for l in err.splitlines() if l.startswith("error:")]
        assert len(line) == 1, err
        assert line[0].startswith("error: rank 0: ") and line[0].endswith(
            "; a rank is stuck (more than --timeout 5 s) or gone: see the other ranks' messages, "
            "then --resume")
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_torchrun_restarts_after_a_killed_worker_and_finishes_the_run(demo_data, tmp_path):
    one = T.main(base_argv(demo_data, tmp_path / "one", "--steps", "30"))["losses"]
    out = tmp_path / "two"
    job = torchrun("--nproc_per_node=2", "--max-restarts=1", "train.py",
                   *base_argv(demo_data, out, "--steps", "30", "--save-every", "5",
                              "--batch-size", "2", "--log-every", "1"))
    wait_for_step(out, 12, job)
    os.kill(children(job.pid)[-1], signal.SIGKILL)              # one worker dies, hard
    log = job.communicate(timeout=300)[0]
    assert job.returncode == 0, log
    assert log.count("resumed from") == 1                       # once, by the restarted round
    assert sorted(losses(out)) == list(range(1, 31))
    assert losses(out) == pytest.approx(one, rel=1e-4)          # dp 2 = one process


def test_an_impossible_configuration_does_not_loop_through_restarts(tmp_path):
    t = time.monotonic()
    job = torchrun("--nproc_per_node=2", "--max-restarts=3", "train.py", "--data",
                   str(tmp_path / "none"), "--out", str(tmp_path / "out"), "--tp", "3",
                   "--device", "cpu")
    log = job.communicate(timeout=120)[0]
    assert job.returncode != 0 and time.monotonic() - t < 60
    message = "error: tp=3 must divide n_heads=8; use one of 1, 2, 4"     # whatever the world
    assert log.count(message) == 1, log                          # said once: no restart
    assert not (tmp_path / "out").exists()


def test_a_mistyped_flag_under_torchrun_is_not_restarted(tmp_path):
    job = torchrun("--nproc_per_node=2", "--max-restarts=3", "train.py", "--steps", "abc",
                   "--out", str(tmp_path / "out"), "--device", "cpu")
    log = job.communicate(timeout=120)[0]
    assert job.returncode != 0
    assert 1 <= log.count("error: argument --steps") <= 2, log  # one round: no restart
    assert not (tmp_path / "out").exists()


# --- 6. beyond one machine -----------------------------------------------------------------------

def test_two_nodes_with_c10d_rendezvous_equal_one_process(demo_data, tmp_path):
    """The README's multi-node command, its two nodes played by two launchers on localhost."""
    one = T.main(base_argv(demo_data, tmp_path / "one", "--steps", "6"))["losses"]
    port = free_port()
    nodes = [torchrun("--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                      f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=test-job", "train.py",
                      *base_argv(demo_data, tmp_path / "two", "--steps", "6", "--batch-size",
                                 "2"))
             for _ in range(2)]
    for node in nodes:
        log = node.communicate(timeout=300)[0]
        assert node.returncode == 0, log
    assert losses(tmp_path / "two") == pytest.approx(one, rel=1e-4)


# --- 7. a stop inside a step; a run never continues on other data -------------------------------

def test_a_stop_between_micro_batches_drops_the_step_and_resume_redoes_it(demo_data, tmp_path,
                                                                         monkeypatch, capsys):
    """SIGTERM in the second of four micro-batches of step 4: steps 1-3 are saved, step 4 is
    dropped, and --resume does it again: the losses are those of a run never stopped."""
    def argv(out):
        return base_argv(demo_data, out, "--steps", "6", "--batch-size", "2",
                         "--micro-batches", "4")
    straight = T.main(argv(tmp_path / "straight"))["losses"]
    calls = sigterm_in_micro_batch(monkeypatch, 3 * 4 + 2)    # the second one of step 4
    out = tmp_path / "stopped"
    stopped = T.main(argv(out))
    assert stopped["stopped_at"] == 3 and sorted(stopped["losses"]) == [1, 2, 3]
    assert len(calls) == 14                              # its last two micro-batches never ran
    assert "signal received in step 4: it is dropped; saving step 3 and stopping" in (
        capsys.readouterr().out)
    assert C.latest(str(out)).endswith("step-000003") and sorted(losses(out)) == [1, 2, 3]
    monkeypatch.undo()
    resumed = T.main(["--out", str(out), "--resume"])
    assert sorted(resumed["losses"]) == [4, 5, 6]
    assert losses(out) == straight                       # equal, bit for bit


def sigterm_in_micro_batch(monkeypatch, n: int) -> list:
    """SIGTERM sent to this process in its n-th training micro-batch (parallel.loss_fn patched);
    the list grows by one per training micro-batch run."""
    real_loss, calls = P.loss_fn, []

    def loss(logits, targets, grid):
        if torch.is_grad_enabled():                      # a training micro-batch
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(logits, targets, grid)
    monkeypatch.setattr(P, "loss_fn", loss)
    return calls


@pytest.mark.parametrize("step,says", [
    (1, "signal received in step 1: it is dropped, and no step has finished, so there is nothing "
        "to save; run the same command again to start over"),
    (3, "signal received in step 3: it is dropped; step 2 is saved already; stopping")])
def test_a_stop_mid_step_says_what_is_saved(demo_data, tmp_path, monkeypatch, capsys, step, says):
    """In step 1 nothing has finished: nothing is saved. In step 3, step 2 is saved already (by
    --save-every 2): it is not saved again."""
    calls = sigterm_in_micro_batch(monkeypatch, (step - 1) * 4 + 2)   # the second of `step`
    out = tmp_path / "run"
    stopped = T.main(base_argv(demo_data, out, "--steps", "6", "--batch-size", "2",
                               "--micro-batches", "4", "--save-every", "2"))
    assert says in capsys.readouterr().out
    assert stopped["stopped_at"] == step - 1 and len(calls) == (step - 1) * 4 + 2
    assert C.latest(str(out)) is None if step == 1 else C.latest(str(out)).endswith("step-000002")


def test_a_damaged_dataset_json_is_named(demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    T.main(base_argv(demo_data, out, "--steps", "4", "--save-every", "4"))
    ckpt = f"{out}/checkpoints/step-000004"
    with open(f"{ckpt}/dataset.json", "w") as fh:
        fh.write('{"splits": 3}')
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        T.main(["--out", str(out), "--resume", "--steps", "6"])
    assert e.value.code == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: cannot resume {ckpt}: --data {demo_data} changed since it was saved: {ckpt}/"
        "dataset.json does not say what it was (the file is damaged); resume on the data the run "
        "was trained on (prepare it again as it was), or start a new run from these weights with "
        f"--init-from {ckpt}")

def prepare_again(demo_data, folder, **options):
    """The demo's own raw files prepared once more into `folder`, in place of what was there:
    the same sources and tokenizer, with other prepare options."""
    new = folder + ".new"
    data.prepare([f"{name}:{kind}={demo_data}/raw/{name}" for name, kind in
                  data.DEMO_KINDS.items()], new, tokenizer=os.path.join(demo_data,
                                                                        "tokenizer.model"),
                 quiet=True, workers=1, **{"weights": data.DEMO_WEIGHTS, **options})
    shutil.rmtree(folder)
    os.rename(new, folder)


def first_change(was: dict, now: dict) -> str:
    """The first source and split, in name order, whose token or document count differs between
    two manifests, said as the refusal says it."""
    for name in sorted(was["sources"]):
        for split in ("train", "val"):
            a, b = was["sources"][name][split], now["sources"][name][split]
            if a != b:
                return (f"source {name}'s {split} split held {a['tokens']:,} tokens in "
                        f"{a['documents']:,} documents, now {b['tokens']:,} in "
                        f"{b['documents']:,}")


@pytest.mark.parametrize("options", [
    dict(val_every=20), dict(weights={"code": 0.2, "docs": 0.3, "reference": 0.5})])
def test_resume_refuses_data_prepared_again_in_place(demo_data, tmp_path, capsys, options):
    """--val-every changed the split the run trains on without a word; another mixture was
    refused as "cannot read checkpoint ... falling back", then "no checkpoint can be read"."""
    ds = str(tmp_path / "ds")
    shutil.copytree(demo_data, ds)
    prepare_again(demo_data, ds)                          # as the demo built it: no change
    out = tmp_path / "run"
    T.main(base_argv(ds, out, "--steps", "4", "--save-every", "2"))
    was = data.load_manifest(ds)
    prepare_again(demo_data, ds, **options)
    changed = (first_change(was, data.load_manifest(ds)) if "val_every" in options else
               "its default mixture was {'code': 0.5, 'docs': 0.3, 'reference': 0.2}, now "
               "{'code': 0.2, 'docs': 0.3, 'reference': 0.5}")
    before = (sorted(os.listdir(out / "checkpoints")), losses(out))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        T.main(["--out", str(out), "--resume", "--steps", "6"])
    assert e.value.code == 2
    ckpt = f"{out}/checkpoints/step-000004"
    assert one_error_line(capsys.readouterr().err) == (
        f"error: cannot resume {ckpt}: --data {ds} changed since it was saved: {changed}; resume "
        "on the data the run was trained on (prepare it again as it was), or start a new run "
        f"from these weights with --init-from {ckpt}")
    assert (sorted(os.listdir(out / "checkpoints")), losses(out)) == before


# --- 8. nothing is allocated before it is checked --------------------------------------------

@pytest.mark.parametrize("field,value,says", [
    ("n_layers", 10000, "{ckpt}/consolidated.00.pth holds 4 layers but {ckpt}/params.json says "
                        "n_layers=10000: the weights and {ckpt}/params.json come from different "
                        "models; restore {ckpt}/params.json beside its weights"),
    ("dim", 2**20, "tok_embeddings.weight in {ckpt}/consolidated.00.pth has shape (512, 256) but "
                   "{ckpt}/params.json (dim=1048576, n_layers=4, n_heads=8, n_kv_heads=4) "
                   "implies (512, 1048576): the weights and {ckpt}/params.json come from "
                   "different models"),
])
def test_resume_compares_params_json_with_the_weights_before_building(demo_data, tmp_path,
                                                                     monkeypatch, capsys, field,
                                                                     value, says):
    T.main(base_argv(demo_data, tmp_path, "--steps", "2", "--warmup", "1"))
    ckpt = C.latest(str(tmp_path))
    params = json.load(open(os.path.join(ckpt, "params.json")))
    json.dump({**params, field: value}, open(os.path.join(ckpt, "params.json"), "w"))
    real_init, built = M.Transformer.__init__, []

    def allocates(self, args, *a, **k):         # a model of those shapes, off the meta device
        if getattr(args, field) == value and torch.get_default_device().type != "meta":
            built.append(args)
            raise MemoryError(f"a model of {field}={value} was built")
        return real_init(self, args, *a, **k)

    monkeypatch.setattr(M.Transformer, "__init__", allocates)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        T.main(["--out", str(tmp_path), "--resume", "--steps", "4"])
    assert e.value.code == 2 and built == []
    assert one_error_line(capsys.readouterr().err) == f"error: {says.format(ckpt=ckpt)}"


def test_a_first_step_that_cannot_fit_is_refused_before_it_starts(demo_data, tmp_path):
    """--batch-size 100000 was killed by the system at 20 GB, without a word. The process is
    capped at 16 GiB here, so that code without the check fails fast instead of filling the
    machine."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))
    out = tmp_path / "out"
    run = python("train.py", *base_argv(demo_data, out, "--batch-size", "100000", "--seq-len",
                                        "128"), preexec_fn=cap)
    assert run.returncode == 2, run.stderr
    line = one_error_line(run.stderr)
    args = M.preset("tiny", vocab_size=512)                # the demo's tokenizer
    state = 12 * planner.stage_parameters(args, 1, 1)      # fp32 weights, m and v: one
    held = planner.stage_activation_bytes(args, 100000, 128)  # micro-batch, no gradient yet
    assert C.size_text(state) == "37 MiB" and C.size_text(held) == "1,039.6 GiB"
    assert line.startswith("error: the first step needs at least 37 MiB for the weights and "
                           "AdamW state (with the gradients and bf16 copies held at its fullest) "
                           "and 1,039.6 GiB of activations "
                           "(--batch-size 100000 x --seq-len 128; planner.py's accounting), but "
                           "cpu has ")
    assert line.endswith(" free; lower --batch-size (and raise --micro-batches to keep the "
                         "global batch), or add --recompute full")
    assert os.listdir(out) == []                           # no metrics, no checkpoint, no lock


def test_the_memory_check_is_planner_accounting_against_what_is_free(monkeypatch):
    """The figures of the refusal are planner.py's: the stage's parameters at 16 bytes in fp32
    (weights, gradients, AdamW's two moments) and stage_activation_bytes."""
    args = M.preset("tiny", vocab_size=512)
    cfg = T.TrainConfig(batch_size=16, seq_len=128, micro_batches=8)
    grid, world = P.make_grid(P.Dist(), tp=1, pp=1), P.Dist()
    need = (16 * planner.stage_parameters(args, 1, 1)
            + planner.stage_activation_bytes(args, 16, 128, micro_batches=8))
    monkeypatch.setattr(T, "available_memory", lambda device: need)
    T.check_memory(cfg, args, grid, world, torch.float32)            # exactly fits
    monkeypatch.setattr(T, "available_memory", lambda device: need - 1)
    with pytest.raises(T.ConfigError, match="^the first step needs at least"):
        T.check_memory(cfg, args, grid, world, torch.float32)
    monkeypatch.setattr(T, "available_memory", lambda device: None)  # unknown: not refused
    T.check_memory(cfg, args, grid, world, torch.float32)


# --- 9. advice that is true ----------------------------------------------------------------------

def test_a_run_killed_before_its_first_checkpoint_starts_again(demo_data, tmp_path, monkeypatch,
                                                              capsys):
    """--resume and a new run no longer send the user to each other."""
    real_clip, calls = P.clip_grad_norm, []

    def killed_in_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_clip(*a, **k)

    monkeypatch.setattr(P, "clip_grad_norm", killed_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        T.main(base_argv(demo_data, tmp_path, "--steps", "6", "--save-every", "100"))
    monkeypatch.setattr(P, "clip_grad_norm", real_clip)
    assert sorted(losses(tmp_path)) == [1, 2] and not C.checkpoints(str(tmp_path))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        T.main(["--out", str(tmp_path), "--resume"])
    assert e.value.code == 2 and one_error_line(capsys.readouterr().err) == (
        f"error: --resume: {tmp_path} holds no complete checkpoint to continue (a run stopped "
        "before its first save, or none was started); start the run again without --resume, "
        "with its flags")
    again = T.main(base_argv(demo_data, tmp_path, "--steps", "6", "--save-every", "100"))
    assert f"{tmp_path} holds a run that saved no checkpoint ({tmp_path}/metrics.jsonl): it " \
           "starts again from step 0, and its metrics are replaced" in capsys.readouterr().out
    assert sorted(again["losses"]) == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def hold_lock(path, names: str):
    """A process that holds `path` locked as a run does, the file naming `names` (a pid and a
    host that need not be its own)."""
    owner = start("-c", "import fcntl, os, sys, time; "
                  "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                  "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, sys.argv[2].encode()); "
                  "time.sleep(60)", str(path), names)
    deadline = time.time() + 60
    while not (path.exists() and path.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    return owner


@pytest.mark.parametrize("names", ["1 {host}", "4242 another-host"])
def test_a_lock_naming_another_process_says_which_holds_it(demo_data, tmp_path, capsys, names):
    """The pid a lock names can be reused (after a reboot) or live on another host, while a
    process that inherited the lock holds it: the message names the holder, and how to end it."""
    os.makedirs(tmp_path / "busy")
    lock = tmp_path / "busy" / "train.lock"
    names = names.format(host=socket.gethostname())
    owner = hold_lock(lock, names)
    try:
        with pytest.raises(SystemExit) as e:
            T.main(base_argv(demo_data, tmp_path / "busy"))
        named = names.split()
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: {tmp_path}/busy is in use: {lock} is held by pid "
                               f"{owner.pid} (")
        assert line.endswith(f"), though it names pid {named[0]} on {named[1]}; if that process "
                             f"is no run of {tmp_path}/busy, end it (kill {owner.pid}) and run "
                             "again, or choose another --out")
        assert e.value.code == 2 and os.listdir(tmp_path / "busy") == ["train.lock"]
    finally:
        owner.kill()
        owner.wait()


@pytest.mark.parametrize("names,says", [
    ("77 far-host", "{out} is in use by a run on far-host (pid 77), through a shared filesystem; "
                    "wait for it to end or end it there (the file server releases the lock of a "
                    "machine that went down within minutes), or choose another --out"),
    ("77 {host}", "{out} is in use by another run (pid 77 on {host}); `fuser -v {lock}` names the "
                  "process that holds it: wait for it to end, or end it; or choose another --out")])
def test_a_lock_no_process_here_is_seen_holding_says_where_to_look(tmp_path, monkeypatch, names,
                                                                  says):
    """No process of this machine is seen holding the lock (/proc does not show it): held from
    another host through a shared filesystem, or by a process /proc does not let us see."""
    host, out = socket.gethostname(), str(tmp_path)
    lock = tmp_path / "train.lock"
    lock.write_text(names.format(host=host))
    monkeypatch.setattr(C, "lock_holders", lambda path: [])
    assert C.held_by(out, str(lock)) == says.format(out=out, host=host, lock=lock)

def test_a_lock_that_is_a_folder_is_named(demo_data, tmp_path, capsys):
    os.makedirs(tmp_path / "out" / "train.lock")
    with pytest.raises(SystemExit) as e:
        T.main(base_argv(demo_data, tmp_path / "out"))
    assert e.value.code == 2 and one_error_line(capsys.readouterr().err) == (
        f"error: {tmp_path}/out/train.lock is a folder (or not a file), where a run keeps its "
        f"lock file; move it out of {tmp_path}/out, then run again")


def test_a_latest_that_is_a_folder_is_refused_before_the_run_trains(demo_data, tmp_path,
                                                                    capsys):
    """`cp -r step-000004 latest`: a run could never replace it, and would fail at each save."""
    T.main(base_argv(demo_data, tmp_path, "--steps", "4", "--save-every", "2"))
    root = tmp_path / "checkpoints"
    os.remove(root / "latest")
    shutil.copytree(root / "step-000004", root / "latest")
    before = losses(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        T.main(["--out", str(tmp_path), "--resume", "--steps", "6"])
    assert e.value.code == 2 and one_error_line(capsys.readouterr().err) == (
        f"error: {root}/latest is a folder, where a run names its newest checkpoint in a file; "
        f"move it out of {root}, then run again")
    assert losses(tmp_path) == before and sorted(os.listdir(root)) == [
        "latest", "step-000002", "step-000004"]                # nothing trained, nothing written


@pytest.mark.parametrize("content,says", [
    ('{"lr": "abc"}', "{path}: lr is 'abc', not a number: the file was edited or damaged; fix the "
                      "value, or copy the file from another checkpoint of the run"),
    ("{not json", "{path} is not valid JSON (Expecting property name enclosed in double quotes: "
                  "line 1 column 2 (char 1)); copy it from another checkpoint of the run"),
])
def test_train_config_edited_by_hand_is_named(demo_data, tmp_path, capsys, content, says):
    T.main(base_argv(demo_data, tmp_path, "--steps", "2", "--warmup", "1"))
    path = os.path.join(C.latest(str(tmp_path)), "train_config.json")
    saved = json.load(open(path))
    open(path, "w").write(json.dumps({**saved, **json.loads(content)}) if content.startswith(
        '{"') else content)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        T.main(["--out", str(tmp_path), "--resume", "--steps", "3"])
    assert e.value.code == 2
    assert one_error_line(capsys.readouterr().err) == f"error: {says.format(path=path)}"


@pytest.mark.parametrize("extra,message", [
    (["--pp-schedule", "afab"], "--pp-schedule afab orders a pipeline's micro-batches, and --pp 1 "
                                "has no pipeline: drop --pp-schedule, or add --pp 2 or more"),
    (["--warmup", "40"], "--warmup 40 is longer than the run's --steps 12: the learning rate "
                         "would never reach its peak --lr 0.003 nor decay; give --warmup 12 or "
                         "less"),
])
def test_flags_that_would_be_ignored_are_refused(demo_data, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        T.main(base_argv(demo_data, tmp_path / "out", *extra))
    assert e.value.code == 2
    assert one_error_line(capsys.readouterr().err) == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_an_unreadable_dataset_file_says_what_to_do_not_resume(demo_data, tmp_path, monkeypatch,
                                                               capsys):
    manifest, real = os.path.join(demo_data, "manifest.json"), builtins.open

    def no_access(path, *a, **k):             # what a file without read permission gives
        if str(path) == manifest:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(builtins, "open", no_access)
    with pytest.raises(SystemExit) as e:
        T.main(base_argv(demo_data, tmp_path / "out"))
    assert e.value.code == 1
    assert one_error_line(capsys.readouterr().err) == (
        f"error: cannot read manifest {manifest}: permission denied; give your user read access "
        "to it (chmod u+r), then run again")


@pytest.mark.parametrize("out", ["ds", "ds/run"])
def test_an_out_that_is_or_lies_inside_the_data_is_refused(demo_data, tmp_path, capsys, out):
    ds = str(tmp_path / "ds")
    shutil.copytree(demo_data, ds)
    before = sorted(os.listdir(ds))
    with pytest.raises(SystemExit) as e:
        T.main(base_argv(ds, tmp_path / out))
    assert e.value.code == 2 and one_error_line(capsys.readouterr().err) == (
        f"error: --out {tmp_path / out} {'is' if out == 'ds' else 'lies inside'} --data {ds}: "
        "writing it would overwrite what this command reads; choose an --out outside it")
    assert sorted(os.listdir(ds)) == before


def test_a_rendezvous_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = python("train.py", "--out", str(tmp_path / "out"), "--device", "cpu",
                     env=dict(os.environ, **torchrun_env(0, 2, port)))
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr == (f"error: the rendezvous port {port} on 127.0.0.1 is in use by another "
                          "process (another job?); give this job a free one (torchrun "
                          "--master-port N, or MASTER_PORT=N)\n")


# --- 10. generate.py and eval.py read what a run writes, while it writes -------------------------

def test_a_checkpoint_being_read_outlives_a_rotation(demo_data, tmp_path, monkeypatch):
    """generate.py reads OUT/checkpoints/latest while the run saves its next step with --keep 1:
    the folder being read stays until the save after, instead of vanishing mid-load ("tokenizer
    model not found; train one with tokenizer.py")."""
    T.main(base_argv(demo_data, tmp_path, "--steps", "4", "--save-every", "2", "--keep", "1"))
    root = tmp_path / "checkpoints"

    def save_step(step):                 # what the run does at its next save, files and all
        tmp, fd = C.start_build(C.step_folder(str(tmp_path), step))
        for name in os.listdir(root / "step-000004"):
            shutil.copyfile(root / "step-000004" / name, os.path.join(tmp, name))
        C.publish(str(tmp_path), tmp, step, keep=1)
        os.close(fd)

    real_load, saved = C.load_weights, []

    def a_save_meanwhile(path):
        state = real_load(path)
        if not saved:
            saved.append(6)
            save_step(6)                             # latest moves on, --keep 1 rotates
        return state

    monkeypatch.setattr(C, "load_weights", a_save_meanwhile)
    model, tok = G.load_model(str(root / "latest"))
    assert model.args.n_layers == 4 and tok.n_words == 512
    assert sorted(os.listdir(root)) == ["latest", "step-000004", "step-000006"]   # held
    monkeypatch.setattr(C, "load_weights", real_load)
    save_step(8)
    assert sorted(os.listdir(root)) == ["latest", "step-000008"]


def test_a_latest_that_leads_out_of_its_run_is_refused(demo_data, tmp_path, capsys):
    T.main(base_argv(demo_data, tmp_path / "run", "--steps", "2", "--warmup", "1"))
    shutil.copytree(C.latest(str(tmp_path / "run")), tmp_path / "elsewhere")
    pointer = tmp_path / "run" / "checkpoints" / "latest"
    pointer.write_text("../../elsewhere")
    said = generate_error("--ckpt", str(pointer), "--prompt", "def ", "--max-new-tokens", "2")
    assert said == (f"error: {pointer} names '../../elsewhere', not a step-NNNNNN folder beside "
                    "it: it is damaged; write the name of the newest complete step folder into "
                    "it, or give that folder as --ckpt")
    resumed = T.main(["--out", str(tmp_path / "run"), "--resume", "--steps", "3"])
    assert sorted(resumed["losses"]) == [3]              # train.py passes over it, as before


def test_a_state_dict_holding_a_string_is_one_line(tmp_path, tok_path):  # noqa: F811
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_model(), tok_path)
    weights = os.path.join(ckpt, "consolidated.00.pth")
    torch.save({**torch.load(weights, weights_only=True), "output.weight": "abc"}, weights)
    assert generate_error("--ckpt", ckpt, "--prompt", "the") == (
        f"error: output.weight in {weights} is str, not a tensor: not a model's weights; "
        "re-download or re-save them")


def test_an_unreadable_checkpoint_is_not_called_corrupt(tmp_path, tok_path,  # noqa: F811
                                                       monkeypatch):
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_model(), tok_path)
    weights, real = os.path.join(ckpt, "consolidated.00.pth"), builtins.open

    def no_access(path, *a, **k):             # what a file without read permission gives
        if str(path) == weights:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(builtins, "open", no_access)
    assert generate_error("--ckpt", ckpt, "--prompt", "the") == (
        f"error: cannot read weights file {weights}: permission denied; give your user read "
        "access to it (chmod u+r), then run again")


def test_export_hf_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, tok_path,  # noqa
                                                                 monkeypatch):
    from safetensors import SafetensorError
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_model(), tok_path)

    def full_disk(tensors, path, **k):          # what safetensors 0.8 raises on a full disk
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os "
                              "error 28)")
    monkeypatch.setattr(C, "save_file", full_disk)
    assert generate_error("--ckpt", ckpt, "--export-hf", str(tmp_path / "hf")) == (
        f"error: could not write {tmp_path}/.tmp-hf/model.safetensors (Error while serializing: "
        "I/O error: No space left on device (os error 28)): is the disk full?")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]     # neither .tmp-hf nor hf: nothing made


def test_an_export_inside_its_checkpoint_is_refused(tmp_path, tok_path):  # noqa: F811
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_model(), tok_path)
    assert generate_error("--ckpt", ckpt, "--export-hf", f"{ckpt}/hf") == (
        f"error: --export-hf {ckpt}/hf lies inside --ckpt {ckpt}: writing it would overwrite "
        "what this command reads; choose an --export-hf outside it")
    assert sorted(os.listdir(ckpt)) == ["consolidated.00.pth", "params.json", "tokenizer.model"]


def test_an_exported_model_file_gets_the_mode_of_any_new_file(tmp_path, tok_path):  # noqa
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_model(), tok_path)
    G.main(["--ckpt", ckpt, "--export-hf", str(tmp_path / "hf")])
    umask = os.umask(0o022)
    os.umask(umask)
    for name in os.listdir(tmp_path / "hf"):                   # safetensors writes 0600
        assert os.stat(tmp_path / "hf" / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_a_library_message_that_opens_with_a_blank_line_is_quoted_from_its_first_text():
    """safetensors' errors begin with a newline: the quote inside our one line is its text."""
    e = RuntimeError("\n   Error while serializing: I/O error (os error 28)\n  details")
    assert cli.first_line(e, 200) == "Error while serializing: I/O error (os error 28)"
    assert cli.first_line(e, 5) == "Error"
    assert cli.first_line(RuntimeError(""), 10) == ""
