"""What the project writes is the same bytes it wrote before the two-layer redesign (checkpoint.py,
cli.py, each file's teaching core first), and what it wrote then still loads and resumes now.

The code of commit BEFORE is taken from this repository's history (git archive) and run beside
the working tree on the same machine, with the same inputs, through the same command lines: a
prepared demo dataset, a two-step training run's checkpoint, and its Hugging Face export. Every
file is the same bytes, except the two that hold the run's options, which lack --bench (moved to
tests/bench_step.py) and are otherwise equal, and the export's three settings files, which add
its pad token (and tokenizer_config.json its split_special_tokens). The old code runs as on a
16-core machine (a sitecustomize.py in its tree): SentencePiece stores the thread count it
trained with, the machine's cores then, 16 on every machine since. Then today's train.py
resumes the run the old code saved, and today's generate.py reads it.
"""

import io
import json
import os
import subprocess
import sys

import pytest
import torch

import data
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
    (old / "sitecustomize.py").write_text("import os\nos.cpu_count = lambda: 16\n")
    produce(str(old), str(root / "before"))
    produce(ROOT, str(root / "now"))
    return root


ADDED_SINCE = {"config.json": {"pad_token_id": 0}, "generation_config.json": {"pad_token_id": 0},
               "tokenizer_config.json": {"pad_token": "<unk>", "padding_side": "left",
                                         "model_input_names": ["input_ids", "attention_mask"],
                                         "split_special_tokens": True}}


def same(a, b) -> bool:
    """Equal values: tensors element for element, containers item by item."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def without_bench(saved: dict) -> dict:
    """The run's options as saved before, less --bench: that flag left train.py for
    tests/bench_step.py in the redesign, so the options saved now lack it."""
    return {k: v for k, v in saved.items() if k != "bench"}


@pytest.mark.parametrize("what", ["data", "run/checkpoints/step-000002", "hf"])
def test_the_same_bytes_as_before(before_and_now, what):
    before, now = files(before_and_now / "before" / what), files(before_and_now / "now" / what)
    if what.startswith("run/"):      # the one file added: the identity of the data beside it
        identity = data.dataset_identity(str(before_and_now / "now" / "data"))
        assert json.loads(now.pop("dataset.json")) == identity
    assert sorted(before) == sorted(now)
    differ = [name for name in before if before[name] != now[name]]
    # The two files that hold the run's options: equal once --bench is left out of the old.
    if "train_config.json" in differ:
        differ.remove("train_config.json")
        assert without_bench(json.loads(before["train_config.json"])) == json.loads(
            now["train_config.json"])
    # The export's three settings files: the same, plus its pad token (<unk>, padding on the
    # left) and the tokenizer's model_input_names, added since for transformers' generate(),
    # and split_special_tokens, so that "<s>" typed in a text is encoded as text.
    for name, added in ADDED_SINCE.items():
        if name in differ:
            differ.remove(name)
            assert {**json.loads(before[name]), **added} == json.loads(now[name]), name
    for name in [n for n in differ if n.startswith("train_state.")]:
        differ.remove(name)
        old, new = (torch.load(io.BytesIO(x[name]), weights_only=True) for x in (before, now))
        assert same(dict(old, config=without_bench(old["config"])), new)
    assert differ == []


def test_a_run_saved_before_resumes_and_loads(before_and_now):
    old_run = str(before_and_now / "before")
    out = run(ROOT, old_run, "train.py", "--out", "run", "--resume", "--steps", "3")
    assert "resumed from" in out and "step-000002" in out
    assert os.path.isdir(os.path.join(old_run, "run", "checkpoints", "step-000003"))
    text = run(ROOT, old_run, "generate.py", "--ckpt", "run/checkpoints/step-000002",
               "--prompt", "def ", "--max-new-tokens", "4", "--device", "cpu")
    assert text.startswith("def ")
