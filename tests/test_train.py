"""Tests for train.py: the schedule, the optimizer's and clipping's flags, accumulation equality,
the validation mean, exact resume after a crash, a crash in the middle of a save, non-finite
steps, refused configurations, the default data another run builds, a falling loss, the CPU's
peak timed again and counted per device, and freed memory kept by the allocator."""

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint as C
import cli
import data
import model as M
import parallel as P
import planner
import train as T
from distributed import losses, start, wait_for_step


def base_argv(data_dir, out, *extra):
    return ["--data", data_dir, "--out", str(out), "--preset", "tiny", "--seq-len", "32",
            "--batch-size", "4", "--steps", "12", "--warmup", "3", "--lr", "3e-3",
            "--eval-every", "100", "--eval-windows", "8", "--save-every", "100", "--samples", "0",
            "--device", "cpu", *extra]


def read_metrics(out):
    """metrics.jsonl's rows, read as strict JSON: NaN and Infinity are no JSON."""
    def no_constant(name):
        raise ValueError(f"metrics.jsonl holds {name}, which is not JSON")
    return [json.loads(l, parse_constant=no_constant)
            for l in open(os.path.join(out, "metrics.jsonl"))]


# --- the schedule ------------------------------------------------------------------------------

def test_lr_schedule_warmup_peak_cosine_floor():
    cfg = T.TrainConfig(lr=1.0, warmup=10, steps=110, min_lr_ratio=0.1)
    assert T.lr_at(0, cfg) == pytest.approx(0.1)            # 1/10 of the way up
    assert T.lr_at(4, cfg) == pytest.approx(0.5)
    assert T.lr_at(9, cfg) == pytest.approx(1.0)            # the peak ends the warmup
    assert T.lr_at(10, cfg) == pytest.approx(1.0)           # cosine starts at the peak
    mid = 10 + (110 - 1 - 10) / 2
    assert T.lr_at(mid, cfg) == pytest.approx(0.55)         # halfway: (peak + floor) / 2
    assert T.lr_at(109, cfg) == pytest.approx(0.1)          # last step: the 10% floor
    lrs = [T.lr_at(s, cfg) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))        # monotone decay
    assert min(lrs) == pytest.approx(0.1)


@pytest.mark.parametrize("steps,warmup", [(10, 0), (10, 8), (10, 9), (10, 10), (1, 0), (1, 1)])
def test_lr_schedule_at_its_edges_follows_the_closed_form(steps, warmup):
    peak, floor = 1.0, 0.1
    cfg = T.TrainConfig(lr=peak, warmup=warmup, steps=steps, min_lr_ratio=0.1)

    def closed_form(s):
        if s < warmup:
            return peak * (s + 1) / warmup
        if warmup >= steps - 1:                              # no step left to decay over
            return peak
        return floor + (peak - floor) * (1 + math.cos(math.pi * (s - warmup)
                                                      / (steps - 1 - warmup))) / 2
    assert [T.lr_at(s, cfg) for s in range(steps)] == pytest.approx(
        [closed_form(s) for s in range(steps)])
    last = floor if warmup < steps - 1 else peak             # lr_at's docstring
    assert T.lr_at(steps - 1, cfg) == pytest.approx(last)


def test_weight_decay_only_on_matrices():
    import model as M
    m = M.Transformer(M.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, multiple_of=8))
    opt = T.make_optimizer(m, T.TrainConfig())
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and len(decay["params"]) == 2 + 7
    assert all(p.dim() == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 3
    assert opt.defaults["betas"] == (0.9, 0.95)
    # The flags, not the defaults: other values reach the optimizer.
    opt = T.make_optimizer(m, T.TrainConfig(weight_decay=0.03, beta1=0.8, beta2=0.99))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.03 and no_decay["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.8, 0.99)


def test_clip_is_the_max_norm_the_gradients_are_clipped_to(demo_data, tmp_path, monkeypatch):
    real_clip, max_norms = P.clip_grad_norm, []

    def recording(model, max_norm, grid):
        max_norms.append(max_norm)
        return real_clip(model, max_norm, grid)

    monkeypatch.setattr(P, "clip_grad_norm", recording)
    T.main(base_argv(demo_data, tmp_path, "--steps", "2", "--warmup", "1", "--clip", "0.5"))
    assert max_norms == [0.5, 0.5]


# --- the loop ----------------------------------------------------------------------------------

def test_accumulation_equals_larger_batch_and_loss_falls(demo_data, tmp_path):
    one = T.main(base_argv(demo_data, tmp_path / "a", "--batch-size", "8"))
    two = T.main(base_argv(demo_data, tmp_path / "b", "--batch-size", "4", "--micro-batches", "2"))
    for step in one["losses"]:
        assert two["losses"][step] == pytest.approx(one["losses"][step], rel=1e-5)
    assert one["val_losses"][12] < one["val_losses"][0] - 0.5
    rows = read_metrics(tmp_path / "a")
    train_rows = [r for r in rows if "loss" in r]
    # The losses alone would match with gradients summed over the micro-batches, not averaged
    # (AdamW is blind to their scale, clipping rescales them): the norms tell.
    accumulated = [r for r in read_metrics(tmp_path / "b") if "loss" in r]
    assert [r["grad_norm"] for r in accumulated] == pytest.approx(
        [r["grad_norm"] for r in train_rows], rel=1e-5)
    # Step s (counted from 1) runs at the schedule's lr_at(s - 1).
    cfg = T.TrainConfig(lr=3e-3, warmup=3, steps=12)
    assert [r["lr"] for r in train_rows] == [T.lr_at(r["step"] - 1, cfg) for r in train_rows]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens_by_source"):
        assert key in train_rows[0]
    assert sum(train_rows[-1]["tokens_by_source"].values()) == 12 * 8 * 33


def test_validation_loss_is_the_mean_over_windows_with_an_uneven_last_batch(demo_data,
                                                                              tmp_path):
    # 5 windows in batches of 4: a chunk of 4 and a chunk of 1, each window weighing the same.
    result = T.main(base_argv(demo_data, tmp_path, "--steps", "1", "--warmup", "1",
                              "--eval-windows", "5"))
    args = C.read_checkpoint(C.latest(str(tmp_path)))[0]
    torch.manual_seed(T.TrainConfig().seed)                   # the run's untrained model
    model = M.Transformer(args)
    val = data.validation_windows(demo_data, 32, 5, seed=T.TrainConfig().seed)
    assert len(val) == 5
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(val[:, :-1]).flatten(0, 1),
                                                 val[:, 1:].flatten()).item()
    assert result["val_losses"][0] == pytest.approx(want, rel=1e-5)


def test_resume_after_crash_equals_uninterrupted(demo_data, tmp_path, monkeypatch):
    straight = T.main(base_argv(demo_data, tmp_path / "straight"))
    out = tmp_path / "crashed"
    real_clip, calls = P.clip_grad_norm, []

    def crash_at_step_8(*a, **k):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt("simulated crash")         # not caught by main
        return real_clip(*a, **k)

    monkeypatch.setattr(P, "clip_grad_norm", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        T.main(base_argv(demo_data, out, "--save-every", "6"))
    monkeypatch.setattr(P, "clip_grad_norm", real_clip)
    assert C.latest(str(out)).endswith("step-000006")
    resumed = T.main(base_argv(demo_data, out, "--save-every", "6", "--resume"))
    assert sorted(resumed["losses"]) == list(range(7, 13))
    for step, loss in resumed["losses"].items():
        assert loss == pytest.approx(straight["losses"][step], rel=1e-6, abs=0)
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == list(range(1, 13))        # step 7 of the crashed run is logged once


def test_a_run_started_from_other_weights_resumes_with_out_and_resume_alone(demo_data, tmp_path):
    # The saved options hold --init-from: the run's own, not a flag given beside --resume.
    T.main(base_argv(demo_data, tmp_path / "base", "--steps", "2", "--warmup", "1",
                     "--save-every", "2"))
    ckpt = str(tmp_path / "base" / "checkpoints" / "step-000002")
    straight = T.main(base_argv(demo_data, tmp_path / "straight", "--steps", "4",
                                "--init-from", ckpt))
    out = tmp_path / "tuned"
    T.main(base_argv(demo_data, out, "--steps", "4", "--save-every", "2", "--init-from", ckpt))
    shutil.rmtree(out / "checkpoints" / "step-000004")             # as if it crashed at step 3
    (out / "checkpoints" / "latest").write_text("step-000002")
    resumed = T.main(["--out", str(out), "--resume"])
    assert sorted(resumed["losses"]) == [3, 4]
    for step, loss in resumed["losses"].items():
        assert loss == pytest.approx(straight["losses"][step], rel=1e-6, abs=0)


def test_a_run_resumes_exactly_on_its_data_moved_and_refuses_other_data(demo_data, tmp_path,
                                                                         capsys):
    # The checkpoint's dataset.json knows the data by its content: --data may name where it lies
    # now; a folder of other tokens is refused by that identity, whatever its path.
    straight = T.main(base_argv(demo_data, tmp_path / "straight", "--steps", "4"))
    old, new, out = tmp_path / "old", tmp_path / "new", tmp_path / "run"
    shutil.copytree(demo_data, old)
    T.main(base_argv(str(old), out, "--steps", "4", "--save-every", "2"))
    shutil.rmtree(out / "checkpoints" / "step-000004")             # as if it crashed at step 3
    (out / "checkpoints" / "latest").write_text("step-000002")
    old.rename(new)                                                 # the data moved, unchanged

    other = tmp_path / "other"                                      # same layout, other tokens
    shutil.copytree(new, other)
    shard = other / "code" / "train.bin"
    np.fromfile(shard, dtype=np.uint16)[::-1].tofile(shard)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        T.main(["--out", str(out), "--resume", "--data", str(other)])
    assert e.value.code == 2
    ckpt = out / "checkpoints" / "step-000002"
    assert capsys.readouterr().err == (
        f"error: cannot resume {ckpt}: --data {other} is not the data the run was trained on "
        f"(as {old}): source code's train split holds other tokens (a sample differs); give "
        "--data with the folder that data lies in now, or drop --data\n")
    with pytest.raises(SystemExit) as e:              # the path it was trained on is gone
        T.main(["--out", str(out), "--resume"])
    assert capsys.readouterr().err == (
        f"error: --data {old} does not exist; give --data with the folder the run's data "
        f"(trained on as {old}) lies in now\n")

    resumed = T.main(["--out", str(out), "--resume", "--data", str(new)])
    assert sorted(resumed["losses"]) == [3, 4]
    for step, loss in resumed["losses"].items():
        assert loss == pytest.approx(straight["losses"][step], rel=1e-6, abs=0)

    ckpt = out / "checkpoints" / "step-000004"          # saved before dataset.json was: by path
    (ckpt / "dataset.json").unlink()
    with pytest.raises(SystemExit):
        T.main(["--out", str(out), "--resume", "--data", str(other)])
    assert capsys.readouterr().err.startswith(
        f"error: cannot resume {ckpt} with --data {other}: the run was trained with --data "
        f"'{new}', and another value would not continue it; drop --data")


@pytest.mark.parametrize("damaged", ["params.json", "train_config.json", "dataset.json",
                                     "consolidated.00.pth"])
def test_a_checkpoint_whose_files_cannot_be_read_is_passed_over(demo_data, tmp_path, capsys,
                                                                damaged):
    # The run resumes from the checkpoint before it, and the message about the recomputed decay
    # describes that one, whichever file was damaged (the settings are read as the run opens,
    # the weights later).
    T.main(base_argv(demo_data, tmp_path, "--steps", "4", "--save-every", "2"))
    newest, before = (os.path.join(tmp_path, "checkpoints", f"step-00000{s}") for s in (4, 2))
    path = os.path.join(newest, damaged)
    open(path, "w").write('{"dim": 6')                                # cut short
    capsys.readouterr()
    resumed = T.main(["--out", str(tmp_path), "--resume", "--steps", "5"])
    assert sorted(resumed["losses"]) == [3, 4, 5]
    lines = capsys.readouterr().out.splitlines()
    why = "" if damaged.endswith(".pth") else f"ValueError: {path} is not valid JSON ("
    assert lines[0].startswith(f"cannot read checkpoint {newest} ({why}")
    assert lines[0].endswith("); falling back to the complete checkpoint before it")
    planned, now = (T.TrainConfig(lr=3e-3, warmup=3, steps=s) for s in (4, 5))
    i = lines.index(f"resumed from {before} at step 2")
    assert lines[i + 1] == (f"--steps 5: the run was planned for 4 steps; the cosine decay is "
                            f"recomputed over 5, so the learning rate goes from "
                            f"{T.lr_at(1, planned):.3g} at step 2 to {T.lr_at(2, now):.3g} at "
                            "step 3, and reaches its floor at step 5")
    assert sum("the run was planned for" in line for line in lines) == 1


def test_checkpoint_is_meta_layout(demo_data, tmp_path):
    T.main(base_argv(demo_data, tmp_path, "--steps", "2", "--warmup", "1"))
    ckpt = C.latest(str(tmp_path))
    assert sorted(os.listdir(ckpt)) == ["consolidated.00.pth", "dataset.json", "params.json",
                                        "tokenizer.model", "train_config.json",
                                        "train_state.00.pth"]
    assert json.load(open(os.path.join(ckpt, "dataset.json"))) == data.dataset_identity(demo_data)
    params = json.load(open(os.path.join(ckpt, "params.json")))
    assert params["dim"] == 256 and params["n_layers"] == 4
    state = torch.load(os.path.join(ckpt, "consolidated.00.pth"), weights_only=True)
    assert "layers.3.feed_forward.w2.weight" in state and "output.weight" in state


def test_crash_during_save_keeps_previous_checkpoint(demo_data, tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def dies_on_second_train_state(obj, path, *a, **k):
        if "step-000004" in str(path) and "train_state" in str(path):
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", dies_on_second_train_state)
    with pytest.raises(SystemExit) as e:
        T.main(base_argv(demo_data, tmp_path, "--steps", "6", "--save-every", "2"))
    assert e.value.code == 1
    assert capsys.readouterr().err == ("error: disk full (simulated) (then --resume continues the "
                                       "run)\n")
    monkeypatch.setattr(torch, "save", real_save)
    root = tmp_path / "checkpoints"
    assert C.latest(str(tmp_path)).endswith("step-000002")
    # the failed save's folder is gone with the space it took: the advice above holds at once
    assert sorted(os.listdir(root)) == ["latest", "step-000002"]
    resumed = T.main(base_argv(demo_data, tmp_path, "--steps", "6", "--save-every", "2", "--resume"))
    assert sorted(resumed["losses"]) == [3, 4, 5, 6]


def test_the_progress_line_on_a_terminal_clears_what_a_longer_one_left():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    screen = Terminal()
    bar = cli.Progress("", 2, stream=screen, every=0)
    bar.show(1, "|g| 11.861 MFU 22.7%")
    bar.show(2, "|g| 2.366 MFU 22.7%", final=True)
    drawn = screen.getvalue().split("\r")[-1]
    assert drawn.endswith("MFU 22.7%\x1b[K\n")       # ESC[K: the rest of the old line cleared


def test_non_finite_steps_are_skipped_then_stop_the_run(demo_data, tmp_path, monkeypatch,
                                                         capsys):
    real_loss, calls = P.loss_fn, []

    def nan_on_steps_3_and_4(logits, targets, grid):
        loss = real_loss(logits, targets, grid)
        if logits.requires_grad:
            calls.append(1)
            if len(calls) in (3, 4):
                return loss * float("nan")
        return loss

    monkeypatch.setattr(P, "loss_fn", nan_on_steps_3_and_4)
    result = T.main(base_argv(demo_data, tmp_path / "a", "--steps", "6"))
    rows = [r for r in read_metrics(tmp_path / "a") if "loss" in r]
    assert [r["skipped"] for r in rows] == [False, False, True, True, False, False]
    assert all(math.isfinite(result["losses"][s]) for s in (1, 2, 5, 6))

    monkeypatch.setattr(P, "loss_fn", lambda lo, ta, g: real_loss(lo, ta, g) * float("nan"))
    asked = []             # a restart would resume the same state and stop the same way
    monkeypatch.setattr(P, "stop_restarts", lambda: asked.append(1))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        T.main(base_argv(demo_data, tmp_path / "b", "--steps", "6", "--max-bad-steps", "3"))
    assert e.value.code == 1 and asked == [1]
    assert capsys.readouterr().err == ("error: 3 non-finite steps in a row at step 3: lower --lr, "
                                       "or resume from an earlier checkpoint\n")
    rows = [r for r in read_metrics(tmp_path / "b") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]          # the step that stops it has its row
    assert [(r["loss"], r["grad_norm"], r["skipped"]) for r in rows] == [(None, None, True)] * 3


# --- refused before any work -------------------------------------------------------------------

@pytest.mark.parametrize("extra,message", [
    (["--tp", "3"], "tp=3 must divide n_heads=8; use one of 1, 2, 4"),   # whatever the world
    (["--tp", "2"], "world size 1 is not divisible by --tp 2 x --pp 1 = 2"),
    (["--sp"], "add --tp 2"),
    (["--recompute", "some"], "choose none, selective or full"),
    (["--attention", "flash"], "--attention 'flash': choose auto, xformers, sdpa, math"),
    (["--preset", "huge"], "choose one of tiny"),
    (["--batch-size", "0"], "--batch-size=0 must be positive"),
    (["--resume"], "no complete checkpoint"),
    (["--resume", "--init-from", "x"], "give one of them"),
])
def test_bad_configs_are_refused_in_one_line(demo_data, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        T.main(base_argv(demo_data, tmp_path, *extra))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "train.lock").exists()


def test_a_malformed_mix_is_refused_before_out_or_the_demo_data_is_made(tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.chdir(tmp_path)               # the default --data, data/demo, would be built here
    with pytest.raises(SystemExit) as e:
        T.main(["--mix", "code", "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "error: bad mixture item 'code' in 'code': write NAME=WEIGHT pairs separated by commas, "
        "e.g. 'code=0.6,docs=0.3,reference=0.1'\n")
    assert os.listdir(tmp_path) == []         # no --out folder, no data built


def demo_argv(out):
    """A tiny run on the default --data, data/demo, which it builds where it is missing."""
    return ["--out", str(out), "--preset", "tiny", "--seq-len", "32", "--batch-size", "4",
            "--steps", "2", "--warmup", "1", "--eval-every", "100", "--eval-windows", "4",
            "--samples", "0", "--device", "cpu"]


def test_a_run_whose_default_data_another_run_is_building_is_told_to_wait(tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.chdir(tmp_path)
    os.makedirs("data/.tmp-demo")
    held = C.lock("data/.tmp-demo")           # another run's build of data/demo, still running
    try:
        with pytest.raises(SystemExit) as e:
            T.main(demo_argv(tmp_path / "run"))
    finally:
        os.close(held)
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: --data data/demo is being built by another process "
                                       "right now; wait for it to finish, then run again\n")
    assert sorted(os.listdir("data")) == [".tmp-demo"] and os.listdir(tmp_path / "run") == []


def test_a_run_whose_default_data_another_run_built_meanwhile_trains_on_it(demo_data, tmp_path,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)

    def built_by_another_run(out_dir, *args, **kwargs):
        shutil.copytree(demo_data, out_dir)    # its build lands between our look and our own
        data.check_new(out_dir)                # "... already holds a prepared dataset; delete it"
    monkeypatch.setattr(data, "prepare_demo", built_by_another_run)
    assert sorted(T.main(demo_argv(tmp_path / "run"))["losses"]) == [1, 2]


def test_the_pp_schedule_help_lists_every_schedule_it_accepts(capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split("--pp-schedule PP_SCHEDULE")[-1].split())
    listed = text.split(" (")[0].split(" | ")
    assert listed == ["auto", *P.PIPELINE_SCHEDULES]


def test_compile_is_the_default_for_one_cuda_process_only(demo_data, tmp_path, monkeypatch):
    # Unset, --compile means: on for a single CUDA process (measured faster there), off on CPU
    # and under torchrun; --compile and --no-compile decide themselves.
    cfg, given = T.parse_args([])
    assert cfg.compile is None and given == {}
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert T.uses_compile(cfg, cuda) and not T.uses_compile(cfg, cuda, world_size=2)
    assert not T.uses_compile(cfg, cpu)
    assert not T.uses_compile(T.parse_args(["--no-compile"])[0], cuda)
    assert T.uses_compile(T.parse_args(["--compile"])[0], cpu)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)
    T.main(base_argv(demo_data, tmp_path / "a", "--steps", "1", "--warmup", "1"))
    assert compiled == []
    T.main(base_argv(demo_data, tmp_path / "b", "--steps", "1", "--warmup", "1",
                     "--compile"))
    assert len(compiled) == 1


def test_existing_run_is_not_overwritten_and_incompatible_resume_refused(demo_data, tmp_path, capsys):
    T.main(base_argv(demo_data, tmp_path, "--steps", "2", "--warmup", "1"))
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(SystemExit):
        T.main(base_argv(demo_data, tmp_path, "--steps", "2", "--warmup", "1"))
    assert "pass --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.main(base_argv(demo_data, tmp_path, "--steps", "4", "--resume", "--seq-len", "512"))
    assert "cannot resume" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_a_resume_with_steps_below_the_runs_warmup_asks_for_more_steps(demo_data, tmp_path,
                                                                        capsys):
    # --warmup is fixed on resume: the advice is about --steps, the one flag that may change.
    T.main(base_argv(demo_data, tmp_path, "--steps", "3", "--warmup", "3"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        T.main(["--out", str(tmp_path), "--resume", "--steps", "2"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "error: --warmup 3 is longer than the run's --steps 2: the learning rate would never "
        "reach its peak --lr 0.003 nor decay; give --steps 3 or more\n")


def test_missing_data_dir_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        T.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert "does not exist" in capsys.readouterr().err


def test_resume_starts_with_the_runs_own_device_and_timeout(demo_data, tmp_path, monkeypatch):
    T.main(base_argv(demo_data, tmp_path, "--steps", "2", "--warmup", "1", "--timeout",
                     "123"))
    launched, real = [], P.init_distributed
    monkeypatch.setattr(P, "init_distributed", lambda **kw: launched.append(kw) or real(**kw))
    T.main(["--out", str(tmp_path), "--resume", "--steps", "3"])
    T.main(["--out", str(tmp_path), "--resume", "--steps", "4", "--timeout", "77"])
    assert launched == [dict(device="cpu", timeout_s=123.0), dict(device="cpu", timeout_s=77.0)]


def test_generate_reads_the_checkpoint_that_latest_names(demo_data, tmp_path):
    T.main(base_argv(demo_data, tmp_path, "--steps", "4", "--save-every", "2"))
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step-000004"
    args, state, _ = C.read_checkpoint(str(root / "latest"))
    newest = C.read_checkpoint(str(root / "step-000004"))[1]
    assert args.n_layers == 4 and state.keys() == newest.keys()
    assert all(torch.equal(state[k], newest[k]) for k in state)


def test_torchrun_restart_resumes_by_itself(demo_data, tmp_path, monkeypatch):
    T.main(base_argv(demo_data, tmp_path, "--steps", "4", "--save-every", "2"))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")          # what torchrun sets on restart
    resumed = T.main(base_argv(demo_data, tmp_path, "--steps", "6", "--save-every", "2"))
    assert sorted(resumed["losses"]) == [5, 6]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(demo_data, tmp_path):
    proc = start("train.py", *base_argv(demo_data, tmp_path, "--steps", "100000"),
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_step(tmp_path, 1, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert "saving step" in output
    ckpt = C.latest(str(tmp_path))
    assert ckpt.endswith(f"step-{max(losses(tmp_path)):06d}")


def memory_check_refuses(monkeypatch, cfg, args, free, dtype=torch.float32):
    """The one-line refusal of T.check_memory with `free` bytes free, or None if it lets the
    step through."""
    monkeypatch.setattr(T, "available_memory", lambda device: free)
    try:
        T.check_memory(cfg, args, P.make_grid(P.Dist(), tp=1, pp=1), P.Dist(), dtype)
    except T.ConfigError as e:
        return str(e)


@pytest.mark.parametrize("batch,dtype,recompute", [
    (16, torch.float32, "none"), (1, torch.float32, "none"), (16, torch.bfloat16, "none"),
    (16, torch.bfloat16, "selective"), (16, torch.bfloat16, "full"), (1, torch.bfloat16, "full")])
def test_the_memory_check_counts_gradients_with_activations_only_from_a_second_micro_batch(
        monkeypatch, batch, dtype, recompute):
    """A lower bound of a step: with one micro-batch the backward makes the gradients as it
    frees the activations (and autocast's bf16 copies of the blocks' matrices, which their graph
    holds), so the step needs the fp32 weights and AdamW's m and v (12 bytes per parameter) plus
    the larger of the gradients (4) and the copies and activations; with two, all at once. Full
    recomputation keeps no copy (the blocks' forward runs without autograd)."""
    args = M.preset("tiny", vocab_size=512)
    params = planner.stage_parameters(args, 1, 1)
    with torch.device("meta"):
        blocks = M.Transformer(args).layers
    matrices = sum(p.numel() for p in blocks.parameters() if p.dim() == 2)
    copies = 2 * matrices if dtype == torch.bfloat16 and recompute != "full" else 0
    held = planner.stage_activation_bytes(args, batch, 128, recompute=recompute,
                                          bytes_per_el=2 if dtype == torch.bfloat16 else 4)
    one = 12 * params + max(4 * params, copies + held)
    for m, need in ((1, one), (2, 16 * params + copies + held)):
        cfg = T.TrainConfig(batch_size=batch, seq_len=128, micro_batches=m, recompute=recompute)
        assert memory_check_refuses(monkeypatch, cfg, args, need + 1, dtype) is None
        refusal = memory_check_refuses(monkeypatch, cfg, args, need - 1, dtype)
        assert refusal.startswith("the first step needs at least "), refusal
    if 4 * params < copies + held:               # the refusal names what its worst moment holds
        state, activations = C.size_text(12 * params + copies), C.size_text(held)
        cfg = T.TrainConfig(batch_size=batch, seq_len=128, recompute=recompute)
        assert memory_check_refuses(monkeypatch, cfg, args, one - 1, dtype).startswith(
            f"the first step needs at least {state} for the weights and AdamW state (with the "
            f"gradients and bf16 copies held at its fullest) and {activations} of activations "
            f"(--batch-size {batch} x --seq-len 128; ")


@pytest.mark.parametrize("recompute,micro_batches,peak_gib", [
    ("none", 1, 29.40), ("selective", 1, 26.30), ("full", 1, 18.47),
    ("none", 2, 33.34), ("selective", 2, 30.42), ("full", 2, 25.27)])
def test_the_memory_check_lets_through_the_readmes_measured_1b_steps(monkeypatch, recompute,
                                                                     micro_batches, peak_gib):
    """The README's GPU table: 1b, batch 4 x sequence 2048, bf16 autocast, eager, measured
    peaks. A device with that much free runs the step, so the lower bound lets it through (with
    one micro-batch it refused them, at 31.75, 28.65 and 19.37 GiB)."""
    cfg = T.TrainConfig(preset="1b", batch_size=4, seq_len=2048, recompute=recompute,
                        micro_batches=micro_batches, compile=False)
    assert memory_check_refuses(monkeypatch, cfg, M.preset("1b"), peak_gib * 2**30,
                                torch.bfloat16) is None


# --- measuring: the CPU's peak, the allocator --------------------------------------------------

def test_a_peak_timed_too_low_is_timed_again(demo_data, tmp_path, monkeypatch, capsys):
    """A busy neighbour can slow the whole timing of the CPU's peak (train.peak_flops): the
    first step that beats it has it timed again, and no MFU over 100% is logged."""
    key, slowed = ("cpu", torch.float32), (1e6, "a timing slowed by a neighbour")
    monkeypatch.setitem(T._timed_peaks, key, slowed)
    T.main(base_argv(demo_data, tmp_path, "--steps", "3"))
    assert T._timed_peaks[key][0] > 1e9
    steps = [r for r in read_metrics(tmp_path) if "mfu" in r]
    assert len(steps) == 3 and all(0 < r["mfu"] <= 1 for r in steps)
    assert "peak timed again, as step 1 ran faster" in capsys.readouterr().out


def test_the_peak_of_a_run_counts_every_device():
    # MFU's denominator: the peak per device times the devices (peak_flops is timed once and
    # kept, so both calls use the same figure).
    args, cpu = M.preset("tiny", vocab_size=512), torch.device("cpu")
    one = T.peak_tokens_per_s(args, 32, cpu, torch.float32, devices=1)
    four = T.peak_tokens_per_s(args, 32, cpu, torch.float32, devices=4)
    assert four[0] == pytest.approx(4 * one[0], rel=1e-12)
    assert four[1].endswith(" x 4 devices)")


def test_freed_memory_is_used_again_without_page_faults():
    """train.keep_freed_memory: a 32 MiB tensor (the logits of a 2,048-token step at vocab 4096)
    freed and allocated again is mapped afresh under malloc's defaults, a fault for each page,
    and reused once the thresholds are raised. In a fresh interpreter: the setting holds for the
    whole process and cannot be undone."""
    code = ("import resource, torch, train\n"
            "def faults():\n"
            "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    for _ in range(8):\n"
            "        torch.ones(2048, 4096)         # allocated, written, freed\n"
            "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
            "faults()\n"
            "default = faults()\n"
            "applied = train.keep_freed_memory()\n"
            "faults(), faults()\n"
            "print(default, int(applied), faults())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    default, applied, kept = map(int, out.stdout.split())
    if not applied:
        pytest.skip("not glibc: malloc is left as it is")
    assert default >= 8 * 32 * 2**20 // (2 * 2**20)     # at least a fault per 2 MiB huge page
    assert kept * 4 <= default        # a Python object left in the freed block can still make
                                      # one allocation map fresh memory; most are reused
