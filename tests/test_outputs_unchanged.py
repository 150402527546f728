"""What the project writes is the same bytes it wrote before the two-layer redesign (checkpoint.py,
cli.py, each file's teaching core first), and what it wrote then still loads and resumes now.

The code of commit BEFORE is taken from this repository's history (git archive) and run beside
the working tree on the same machine, with the same inputs, through the same command lines: a
prepared demo dataset, a two-step training run's checkpoint, and its Hugging Face export. Then
today's train.py resumes the run the old code saved, and today's generate.py reads it.
"""

import os
import subprocess
import sys

import pytest

from distributed import ROOT

pytestmark = pytest.mark.slow

BEFORE = "5017d00"          # the last commit before the redesign


def run(tree, cwd, script, *args):
    proc = subprocess.run([sys.executable, os.path.join(tree, script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=tree))
    assert proc.returncode == 0, f"{tree}/{script} {args}: {proc.stderr[-2000:]}"
    return proc.stdout


def produce(tree, work):
    """A dataset, a checkpoint and an export, written by the code in `tree` into `work`."""
    os.makedirs(work)
    run(tree, work, "data.py", "prepare", "--demo", "--scale", "0.02", "--vocab-size", "512",
        "--workers", "1", "--out", "data", "--quiet")
    run(tree, work, "train.py", "--data", "data", "--out", "run", "--preset", "tiny",
        "--seq-len", "32", "--batch-size", "2", "--steps", "2", "--warmup", "1",
        "--save-every", "2", "--eval-every", "100", "--eval-windows", "2", "--samples", "0",
        "--device", "cpu")
    run(tree, work, "generate.py", "--ckpt", "run/checkpoints/latest", "--export-hf", "hf",
        "--device", "cpu")


def files(folder):
    """{relative path: bytes} of every file under folder."""
    out = {}
    for where, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(where, n)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


@pytest.fixture(scope="module")
def before_and_now(tmp_path_factory):
    root = tmp_path_factory.mktemp("unchanged")
    old = root / "old-code"
    old.mkdir()
    archive = subprocess.run(["git", "-C", ROOT, "archive", BEFORE], capture_output=True)
    if archive.returncode:
        pytest.skip(f"commit {BEFORE} is not in this clone's history (a shallow clone?)")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    produce(str(old), str(root / "before"))
    produce(ROOT, str(root / "now"))
    return root


@pytest.mark.parametrize("what", ["data", "run/checkpoints/step-000002", "hf"])
def test_the_same_bytes_as_before(before_and_now, what):
    before, now = files(before_and_now / "before" / what), files(before_and_now / "now" / what)
    assert sorted(before) == sorted(now)
    assert [name for name in before if before[name] != now[name]] == []


def test_a_run_saved_before_resumes_and_loads(before_and_now):
    old_run = str(before_and_now / "before")
    out = run(ROOT, old_run, "train.py", "--out", "run", "--resume", "--steps", "3")
    assert "resumed from" in out and "step-000002" in out
    assert os.path.isdir(os.path.join(old_run, "run", "checkpoints", "step-000003"))
    text = run(ROOT, old_run, "generate.py", "--ckpt", "run/checkpoints/step-000002",
               "--prompt", "def ", "--max-new-tokens", "4", "--device", "cpu")
    assert text.startswith("def ")
