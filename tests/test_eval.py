"""Tests for eval.py: the hand-written fixtures of every benchmark format parse to the right
labels; batched, padded scoring equals a brute-force one-token-at-a-time computation; the three
choice rules on cases where they disagree; perplexity and exact match; the CLI's JSON report;
one-line errors on malformed task files."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import eval as E
import generate as G
from test_generate import one_thread, tiny_model, tok_path, write_checkpoint  # noqa: F401

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "eval")
CHOICE_TASKS = {           # task -> labels of the fixture's examples, as written by hand
    "boolq": [1, 0, 0], "piqa": [0, 1], "siqa": [1, 2], "hellaswag": [0, 1],
    "winogrande": [1, 1], "arc_easy": [0, 1], "arc_challenge": [1], "openbookqa": [0, 2],
}


def fixture(name):
    return os.path.join(FIXTURES, name)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok_path):  # noqa: F811
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny",
                            tiny_model(max_seq_len=128), tok_path)


@pytest.fixture(scope="module")
def loaded(ckpt):
    return G.load_model(ckpt)


# --- readers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("task", sorted(CHOICE_TASKS))
def test_each_fixture_parses_to_its_labels(task):
    examples = E.read_task(task, fixture(task + ".jsonl"))
    assert [e.label for e in examples] == CHOICE_TASKS[task]
    for e in examples:
        assert len(e.contexts) == len(e.continuations) >= 2
    assert len(E.read_task(task, fixture(task + ".jsonl"), limit=1)) == 1


def test_reader_details():
    wino = E.read_task("winogrande", fixture("winogrande.jsonl"))[0]
    assert wino.contexts == ["The cat sat on the mat because the cat",
                             "The cat sat on the mat because the mat"]
    assert wino.continuations == [" was soft.", " was soft."]        # partial evaluation
    hella = E.read_task("hellaswag", fixture("hellaswag.jsonl"))[1]
    assert "[" not in hella.contexts[0]
    assert hella.contexts[0].endswith("How to water a tree. Fill a can with water. Pour")
    boolq = E.read_task("boolq", fixture("boolq.jsonl"))[0]
    assert boolq.contexts[0].endswith("Question: is the sun a star?\nAnswer:")
    assert boolq.continuations == [" no", " yes"]
    trivia = E.read_task("triviaqa", fixture("triviaqa.jsonl"))
    assert trivia[0].answers == ["Fish", "fish", "Fishes"]
    assert trivia[1].answers == ["The Sun", "sun"]
    nq = E.read_task("nq", fixture("nq.jsonl"))[0]
    assert nq.contexts[0].endswith("Q: who sat on the mat\nA:") and nq.answers[0] == "the cat"


# --- scoring -----------------------------------------------------------------------------------

def brute_force_loglik(model, ids, n):
    """Sum of log p over the last n tokens: one example alone, unpadded, token by token."""
    logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), -1)   # (T-1, V)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n, len(ids)))


def test_encode_pair_splits_at_the_context(loaded):
    _, tok = loaded
    ids, n = E.encode_pair(tok, "Question: is it true\nAnswer:", " yes it is", 128)
    assert ids == tok.encode("Question: is it true\nAnswer: yes it is", bos=True)
    assert tok.decode(ids[:-n]) == "Question: is it true\nAnswer:"
    assert tok.decode(ids[-n:]).strip() == "yes it is"
    ids, n = E.encode_pair(tok, "the cat sat " * 40, " on the mat", 16)   # over-long: keep the end
    assert len(ids) == 17 and tok.decode(ids[-n:]).strip() == "on the mat"


def test_batched_scores_equal_brute_force(loaded):
    model, tok = loaded
    pairs = []
    for task in ("hellaswag", "winogrande", "boolq", "arc_easy"):
        for e in E.read_task(task, fixture(task + ".jsonl")):
            pairs += list(zip(e.contexts, e.continuations))
    pairs.append(pairs[0])                                    # a duplicate is scored once
    batched = E.loglikelihoods(model, tok, pairs, batch_size=5)   # mixed lengths: padding
    for (context, continuation), got in zip(pairs, batched):
        ids, n = E.encode_pair(tok, context, continuation, 128)
        assert got == pytest.approx(brute_force_loglik(model, ids, n), abs=1e-3)
    assert len(set(len(E.encode_pair(tok, c, x, 128)[0]) for c, x in pairs)) > 3


def test_the_rules_on_cases_where_they_disagree():
    short, long = " a", " a much longer choice"                   # 2 and 21 characters
    # acc prefers the likelier short choice; per character the long one is better.
    assert E.choose([-3.0, -6.0], [short, long]) == {"acc": 0, "acc_norm": 1}
    # P(c | "Answer:") says the long choice is likely anywhere: dividing it out flips to 0.
    picks = E.choose([-3.0, -6.0], [short, long], lls_answer=[-5.0, -1.0])
    assert picks == {"acc": 0, "acc_norm": 1, "acc_answer": 0}
    # ... and the same context likelihoods with another prior flip acc's choice.
    assert E.choose([-3.0, -6.0], [short, long], lls_answer=[-1.0, -8.0])["acc_answer"] == 1


@pytest.mark.parametrize("task", ["openbookqa", "hellaswag"])
def test_report_is_consistent_with_its_logliks(loaded, task):
    model, tok = loaded
    examples = E.read_task(task, fixture(task + ".jsonl"))
    report = E.evaluate_choices(model, tok, task, examples, batch_size=3)
    assert report["paper_metric"] == E.TASKS[task].metric
    for rule in report["metrics"]:
        hits = 0
        for row in report["examples"]:
            scores = row["loglik"]
            if rule == "acc_norm":
                scores = [ll / len(c) for ll, c in zip(scores, row["continuations"])]
            if rule == "acc_answer":
                scores = [ll - u for ll, u in zip(scores, row["loglik_answer"])]
            hits += int(np.argmax(scores)) == row["label"]
        assert report["metrics"][rule] == hits / len(examples)
    if task == "openbookqa":   # the "Answer:" rule: P(c | "Answer:") is really that
        row = report["examples"][0]
        assert row["loglik_answer"] == pytest.approx(
            E.loglikelihoods(model, tok, [("Answer:", c) for c in row["continuations"]]), abs=1e-4)
    else:
        assert "acc_answer" not in report["metrics"]


def test_perplexity_equals_plain_computation_on_text_and_shards(loaded, tmp_path):
    model, tok = loaded
    text = open(fixture("heldout.txt")).read()
    ids = tok.encode(text, bos=True)
    assert len(ids) > 129                                     # more than one window of 128
    nll, count = 0.0, 0
    for s in range(0, len(ids) - 1, 128):            # each window alone, unpadded
        window = ids[s:s + 129]
        nll -= brute_force_loglik(model, window, len(window) - 1)
        count += len(window) - 1
    report = E.evaluate_perplexity(model, tok, fixture("heldout.txt"), batch_size=2)
    assert report["metrics"]["tokens"] == count == len(ids) - 1
    assert report["metrics"]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert report["metrics"]["bits_per_byte"] == pytest.approx(
        nll / math.log(2) / len(text.encode()), rel=1e-4)
    np.save(tmp_path / "shard.npy", np.array(ids, dtype=np.uint16))
    np.array(ids, dtype=np.uint16).tofile(tmp_path / "shard.bin")   # data.py's layout
    for shard in ("shard.npy", "shard.bin"):
        other = E.evaluate_perplexity(model, tok, str(tmp_path / shard))
        assert other["metrics"]["perplexity"] == pytest.approx(report["metrics"]["perplexity"])


def test_exact_match_normalization_and_qa(loaded):
    assert E.normalize_answer("The  Sun!") == E.normalize_answer("sun") == "sun"
    assert E.normalize_answer("an apple, a day") == "apple day"
    model, tok = loaded
    examples = E.read_task("nq", fixture("nq.jsonl"))
    first = E.evaluate_qa(model, tok, examples, batch_size=2, max_new_tokens=6)
    pred = first["examples"][0]["prediction"]
    assert "\n" not in pred
    examples[0].answers = ["The " + pred.upper() + "!"]        # right after normalization
    examples[1].answers = [first["examples"][1]["prediction"] + " extra words"]
    report = E.evaluate_qa(model, tok, examples, batch_size=2, max_new_tokens=6)
    assert [r["exact_match"] for r in report["examples"]] == [True, False]
    assert report["metrics"]["exact_match"] == 0.5


# --- the command line --------------------------------------------------------------------------

def test_main_writes_the_report(ckpt, tmp_path, capsys):
    out = str(tmp_path / "report.json")
    E.main(["--ckpt", ckpt, "--task", "BoolQ", "--data", fixture("boolq.jsonl"), "--out", out])
    report = json.load(open(out))
    assert report["task"] == "boolq" and report["n"] == 3 and report["paper_metric"] == "acc_answer"
    assert set(report["metrics"]) == {"acc", "acc_norm", "acc_answer"}
    for row in report["examples"]:
        assert len(row["loglik"]) == len(row["loglik_answer"]) == 2
    assert report["paper_rule"] == "argmax P(continuation | context) / P(continuation | 'Answer:')"
    assert "the paper's table uses acc_answer" in capsys.readouterr().out
    E.main(["--ckpt", ckpt, "--task", "arc-challenge", "--data", fixture("arc_challenge.jsonl"),
            "--limit", "1", "--out", out])
    assert len(json.load(open(out))["examples"][0]["loglik"]) == 4
    report = E.main(["--ckpt", ckpt, "--task", "triviaqa", "--data", fixture("triviaqa.jsonl"),
                     "--max-new-tokens", "4"])
    assert report["n"] == 2 and "exact_match" in report["metrics"]


def exit_message(argv):
    with pytest.raises(SystemExit) as info:
        E.main(argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_bad_task_files_say_what_is_wrong(ckpt, tmp_path):
    base = ["--ckpt", ckpt, "--data"]
    msg = exit_message(base + [fixture("bad_json.jsonl"), "--task", "arc_easy"])
    assert "bad_json.jsonl line 2 is not valid JSON" in msg
    msg = exit_message(base + [fixture("bad_field.jsonl"), "--task", "hellaswag"])
    assert "line 1: missing or bad endings" in msg and "ctx_a, ctx_b, endings, label" in msg
    msg = exit_message(base + [fixture("piqa.jsonl"), "--task", "siqa"])   # another format
    assert "missing or bad context" in msg
    shutil.copy(fixture("piqa.jsonl"), tmp_path / "valid.jsonl")           # labels left behind
    assert "missing or bad label" in exit_message(base + [str(tmp_path / "valid.jsonl"),
                                                          "--task", "piqa"])
    assert "does not exist" in exit_message(base + [str(tmp_path / "nope.jsonl"), "--task", "piqa"])
    assert "unknown task 'mmlu'" in exit_message(base + [fixture("piqa.jsonl"), "--task", "mmlu"])
    np.save(tmp_path / "bad.npy", np.array([5, 9999]))                    # ids beyond 320
    assert "another tokenizer" in exit_message(base + [str(tmp_path / "bad.npy"),
                                                       "--task", "perplexity"])
