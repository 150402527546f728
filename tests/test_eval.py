"""Tests for eval.py: every task's fixture in its original layout and in its Hugging Face one
reads to the same examples; the prompt strings byte for byte (HellaSwag's clean-up, few-shot QA,
MMLU); batched, padded scoring against a brute-force scorer written here; each rule's picks and
metrics recomputed plainly (acc_norm's denominator included); MMLU's subject and category
averages; QA answers cut at each stop string, with decoding that stops once every row has
answered; perplexity; standard errors against their definition and against
lm-evaluation-harness's own figures on a shared set; several tasks in one run, each section its
one-task report; the report; bad input refused in one line before any work, nothing written."""

import json
import math
import os
import random
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import checkpoint as C
import eval as E
import generate as G
from test_generate import tiny_model, tok_path, write_checkpoint  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")        # tests/conftest.py

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "eval")
ORIGINAL_AND_HF = {     # task -> (original release's layout, Hugging Face's), read alike
    "boolq": ("boolq.jsonl", "hf/boolq.jsonl"), "piqa": ("piqa.jsonl", "hf/piqa.jsonl"),
    "siqa": ("siqa.jsonl", "hf/siqa.jsonl"), "hellaswag": ("hellaswag.jsonl", "hf/hellaswag.jsonl"),
    "winogrande": ("winogrande.jsonl", "hf/winogrande.jsonl"),
    "arc_easy": ("arc_easy.jsonl", "hf/arc_easy.jsonl"),
    "arc_challenge": ("arc_challenge.jsonl", "hf/arc_challenge.jsonl"),
    "openbookqa": ("openbookqa.jsonl", "hf/openbookqa.jsonl"), "nq": ("nq.jsonl", "hf/nq.jsonl"),
    "triviaqa": ("triviaqa.json", "hf/triviaqa.jsonl"), "mmlu": ("mmlu/test", "hf/mmlu_test.jsonl"),
}
LABELS = {              # task -> labels of the fixture's examples, as written by hand
    "boolq": [1, 0, 0], "piqa": [0, 1], "siqa": [1, 2], "hellaswag": [0, 1, 0],
    "winogrande": [1, 0], "arc_easy": [0, 1], "arc_challenge": [1], "openbookqa": [0, 2],
    "mmlu": [3, 0, 1, 0, 0, 0],
}
CHOICE_TASKS = sorted(set(LABELS) - {"mmlu"})


def fixture(name):
    return os.path.join(FIXTURES, name)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok_path):  # noqa: F811
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny",
                            tiny_model(max_seq_len=128), tok_path)


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory, tok_path):  # noqa: F811
    """Room for 5-shot MMLU and few-shot QA prompts: the tiny tokenizer spells words out."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "long",
                            tiny_model(seed=1, max_seq_len=1024), tok_path)


@pytest.fixture(scope="module")
def loaded(ckpt):
    return G.load_model(ckpt)


# --- readers and prompts -----------------------------------------------------------------------

@pytest.mark.parametrize("task", sorted(ORIGINAL_AND_HF))
def test_both_layouts_read_to_the_same_examples(task):
    original, hf = (E.read_task(task, fixture(f)) for f in ORIGINAL_AND_HF[task])
    assert original == hf
    if task in LABELS:
        assert [e.label for e in original] == LABELS[task]
        assert all(len(e.choices) >= 2 and (e.question or len(e.contexts) == len(e.choices))
                   for e in original)          # MMLU's contexts wait for the shots
    else:
        assert all(e.answers and e.question for e in original)


def test_reader_strings():
    wino = E.read_task("winogrande", fixture("winogrande.jsonl"))
    assert wino[0].contexts == ["The cat sat on the mat because the cat",
                                "The cat sat on the mat because the mat"]
    assert wino[0].continuations == [" was soft.", " was soft."]        # partial evaluation
    assert wino[1].contexts[0].endswith("because the fish")             # option1 first
    boolq = E.read_task("boolq", fixture("boolq.jsonl"))[0]
    assert boolq.contexts[0] == ("Sun -- The sun is the star at the center of the solar system."
                                 "\nQuestion: is the sun a star?\nAnswer:")
    assert boolq.continuations == [" no", " yes"]
    assert E.read_task("piqa", fixture("piqa.jsonl"))[0].contexts[0] == (
        "Question: To dry a wet dog,\nAnswer:")
    assert E.read_task("siqa", fixture("siqa.jsonl"))[0].contexts[0] == (
        "Q: The dog ate the fish on the mat. How would the cat feel?\nA:")
    assert E.read_task("arc_easy", fixture("arc_easy.jsonl"))[0].contexts[0] == (
        "Question: What gives light in the day?\nAnswer:")
    obqa = E.read_task("openbookqa", fixture("openbookqa.jsonl"))[0]
    assert obqa.contexts[0] == "A tree needs" and obqa.continuations[0] == " water"
    trivia = E.read_task("triviaqa", fixture("triviaqa.json"))
    assert trivia[0].answers == ["Fish", "fish", "Fishes"]
    assert trivia[1].answers == ["The Sun", "Sun", "sun"]
    nq = E.read_task("nq", fixture("nq.jsonl"))
    assert nq[0].question == "Who sat on the mat?" and nq[0].answers == ["the cat", "a cat"]


def test_a_boolq_dev_record_puts_its_title_before_the_passage_as_superglue(tmp_path):
    """The harness scores SuperGLUE's BoolQ, "{{passage}}\nQuestion: {{question}}?\nAnswer:",
    whose passage is "TITLE -- PASSAGE"; BoolQ's dev.jsonl keeps the title in a field of its own,
    and HF google/boolq has none (its prompt lacks the title, the harness's has it)."""
    passage = ("All biomass goes through at least some of these steps: it needs to be grown, "
               "collected, dried, fermented, distilled, and burned.")
    question = "does ethanol take more energy make that produces"
    dev = {"question": question, "title": "Ethanol fuel", "answer": False, "passage": passage}
    superglue = {"question": question, "passage": "Ethanol fuel -- " + passage, "idx": 0,
                 "label": False}
    google = {"question": question, "answer": False, "passage": passage}
    both = {**dev, "passage": superglue["passage"]}              # the title in both places
    path = write(tmp_path, "boolq.jsonl", [json.dumps(r) for r in (dev, superglue, google, both)])
    harness = ("Ethanol fuel -- All biomass goes through at least some of these steps: it needs to "
               "be grown, collected, dried, fermented, distilled, and burned.\n"
               "Question: does ethanol take more energy make that produces?\nAnswer:")
    contexts = [e.contexts for e in E.read_task("boolq", path)]
    assert contexts[0] == contexts[1] == [harness] * 2
    assert contexts[2] == [passage + "\nQuestion: " + question + "?\nAnswer:"] * 2
    assert contexts[3] == [harness] * 2                     # the title is not written twice


def test_hellaswag_strings_are_the_harness():
    """Worked by hand from the harness's rules: " [title]" -> ". ", other tags deleted, one pass
    of double spaces -> one; ctx_b capitalized (the rest lower-cased) before the clean-up."""
    plain, steps, titles = E.read_task("hellaswag", fixture("hellaswag.jsonl"))
    assert plain.contexts[0] == "Feeding a cat: A man puts food in a bowl. The cat"
    assert steps.contexts[0] == "Home and Garden: How to water a tree. Fill a can with water. pour"
    assert steps.continuations[1] == " the water at the roots of the tree."
    assert titles.contexts[0] == (
        "Personal Care and Style: How to dry hair. Towel it evenly.. comb it out.")
    assert titles.choices == [" Unscrew the dryer's cap. Plug it in.", "Comb it gently.",
                              " Wait an hour.", "Dance."]
    assert titles.continuations[0] == "  Unscrew the dryer's cap. Plug it in."
    assert E.hellaswag_clean("[header] How to dry hair [title] Towel it.") == (
        " How to dry hair. Towel it.")


def test_qa_prompts_byte_for_byte():
    darwin = E.read_task("nq", fixture("nq.jsonl"))[2]
    sinatra = E.read_task("nq", fixture("nq_train.jsonl"))[0]
    assert E.qa_prompt(darwin.question, []) == (
        "Answer these questions:\nQ: Who wrote the book the origin of species?\nA:")
    assert E.qa_prompt(darwin.question, [sinatra]) == (          # the paper's Figure 3
        "Answer these questions:\n"
        "Q: Who sang who wants to be a millionaire in high society?\nA: Frank Sinatra\n"
        "Q: Who wrote the book the origin of species?\nA:")
    # The shots come from the pool, never the question itself: here only one shot can be drawn.
    examples = E.read_task("nq", fixture("nq.jsonl"))
    E.add_prompts("nq", examples[2:], [examples[2], sinatra], 1, same_file=True)
    assert examples[2].contexts == [E.qa_prompt(darwin.question, [sinatra])]
    with pytest.raises(ValueError, match="holds 2 questions, too few for 2-shot"):
        E.add_prompts("nq", examples[2:], [examples[2], sinatra], 2, same_file=True)


def test_qa_shots_are_the_harness_draws_from_its_seeded_generator():
    # lm-evaluation-harness: one random.Random(1234) for the whole task; per question it draws
    # n shots from a separate split, n + 1 from the split scored (then leaves the question out).
    pool = [E.Example([], [], answers=[f"answer {i}"], question=f"Train question {i}?")
            for i in range(100)]
    for same_file in (False, True):
        questions = [E.Example([], [], answers=["x"], question=f"Dev question {i}?")
                     for i in range(5)]
        E.add_prompts("nq", questions, pool, 5, same_file=same_file)
        rng = random.Random(1234)
        for q in questions:
            shots = [s for s in rng.sample(pool, 5 + same_file) if s.question != q.question][:5]
            assert q.contexts == [E.qa_prompt(q.question, shots)]


def test_mmlu_prompt_byte_for_byte_and_limit_per_subject():
    test = E.read_task("mmlu", fixture("mmlu/test"), limit=1)
    assert [e.subject for e in test] == ["abstract_algebra", "world_religions"]
    E.add_prompts("mmlu", test, E.read_task("mmlu", fixture("mmlu/dev")), 2)
    assert test[1].contexts == [
        "The following are multiple choice questions (with answers) about world religions.\n\n"
        "Where is Mecca?\nA. Saudi Arabia\nB. Italy\nC. Peru\nD. Japan\nAnswer: A\n\n"
        "What day is the Sabbath in Judaism?\nA. Monday\nB. Saturday\nC. Tuesday\n"
        "D. Friday noon\nAnswer: B\n\n"
        "What is the capital of the Vatican?\nA. Vatican City\nB. Rome, Italy\nC. Paris\n"
        "D. Oslo\nAnswer:"] * 4                       # the question stripped, as the harness
    assert test[1].continuations == [" A", " B", " C", " D"]


# --- scoring -----------------------------------------------------------------------------------

def plain_stderr(hits):
    """The standard error of a mean of 0/1 hits from its definition: the sample variance (divided
    by n - 1) over n, square-rooted -- what the harness's mean_stderr computes."""
    n, p = len(hits), sum(hits) / len(hits)
    return math.sqrt(sum((h - p) ** 2 for h in hits) / (n - 1) / n)


def brute_force_loglik(model, context, continuation, tok):
    """log P(continuation | context), plainly: the context's trailing spaces moved to the
    continuation and the context's own tokens counted off the joint ones (the harness's split),
    one sequence, token by token, in float64."""
    stripped = context.rstrip()
    ids = tok.encode(stripped + context[len(stripped):] + continuation, bos=True)
    n_context = len(tok.encode(stripped, bos=True))
    logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), -1)   # (T-1, V)
    return sum(logp[t - 1, ids[t]].item() for t in range(n_context, len(ids)))


def test_encode_pair_splits_at_the_context(loaded):
    _, tok = loaded
    ids, n = E.encode_pair(tok, "Question: is it true\nAnswer:", " yes it is", 128)
    assert ids == tok.encode("Question: is it true\nAnswer: yes it is", bos=True)
    assert tok.decode(ids[:-n]) == "Question: is it true\nAnswer:"
    assert tok.decode(ids[-n:]).strip() == "yes it is"
    ids, n = E.encode_pair(tok, "the cat sat " * 40, " on the mat", 16)   # over-long: keep the end
    assert len(ids) == 17 and tok.decode(ids[-n:]).strip() == "on the mat"
    ids, n = E.encode_pair(tok, "A tree needs ", "water", 128)   # the space goes with "water"
    assert ids[-n:] == tok.encode("A tree needs water", bos=True)[-n:]
    assert tok.decode(ids[:-n]) == "A tree needs"


def test_a_context_cut_on_the_left_is_said(loaded, capsys):
    model, tok = loaded
    long = ("the cat sat " * 60, " on the mat")                 # far more than 128 tokens
    E.loglikelihoods(model, tok, [("A tree needs", " water"), long, long], label="piqa")
    assert capsys.readouterr().err.startswith(
        "warning: piqa: 1 of 2 sequences are longer than the model's max_seq_len 128; their "
        "contexts were cut on the left, so they score shorter prompts\n")
    E.loglikelihoods(model, tok, [("A tree needs", " water")], label="piqa")
    assert "warning" not in capsys.readouterr().err


def test_batched_scores_equal_brute_force(loaded):
    model, tok = loaded
    pairs = [("A tree needs ", "water")]
    for task in ("hellaswag", "winogrande", "boolq", "arc_easy"):
        for e in E.read_task(task, fixture(task + ".jsonl")):
            pairs += list(zip(e.contexts, e.continuations))
    pairs.append(pairs[1])                                    # a duplicate is scored once
    batched = E.loglikelihoods(model, tok, pairs, batch_size=5)   # mixed lengths: padding
    for (context, continuation), got in zip(pairs, batched):
        assert got == pytest.approx(brute_force_loglik(model, context, continuation, tok),
                                    abs=1e-3)
    assert len(set(len(E.encode_pair(tok, c, x, 128)[0]) for c, x in pairs)) > 3


def test_acc_norm_counts_the_choice_not_the_delimiter():
    # Per character of the choice: -2/1 < -4.2/3, so "abc" wins; counting the continuation's
    # space (" a" 2, " abc" 4) would give -1 > -1.05 and pick "a".
    assert E.choose([-2.0, -4.2], ["a", "abc"]) == {"acc": 0, "acc_norm": 1}
    short, long = "a", "a much longer choice"
    assert E.choose([-3.0, -6.0], [short, long]) == {"acc": 0, "acc_norm": 1}
    # P(c | "Answer:") says the long choice is likely anywhere: dividing it out flips to 0 ...
    picks = E.choose([-3.0, -6.0], [short, long], lls_answer=[-5.0, -1.0])
    assert picks == {"acc": 0, "acc_norm": 1, "acc_answer": 0}
    # ... and the same context likelihoods with another prior flip acc's choice.
    assert E.choose([-3.0, -6.0], [short, long], lls_answer=[-1.0, -8.0])["acc_answer"] == 1


@pytest.mark.parametrize("task", CHOICE_TASKS)
def test_choice_tasks_against_brute_force(loaded, task):
    """Every log-likelihood, every rule's pick and every metric, recomputed plainly."""
    model, tok = loaded
    examples = E.read_task(task, fixture(ORIGINAL_AND_HF[task][1]))
    report = E.evaluate_choices(model, tok, task, examples, batch_size=3)
    rules = {"winogrande": ["acc"], "boolq": ["acc", "acc_norm", "acc_answer"],
             "openbookqa": ["acc", "acc_norm", "acc_answer"]}.get(task, ["acc", "acc_norm"])
    assert list(report["metrics"]) == rules and report["paper_metric"] == E.TASKS[task].metric
    hits = {rule: [] for rule in rules}
    for e, row in zip(examples, report["examples"]):
        lls = [brute_force_loglik(model, c, " " + x, tok) for c, x in zip(e.contexts, e.choices)]
        assert row["loglik"] == pytest.approx(lls, abs=1e-3)
        scores = {"acc": lls, "acc_norm": [ll / len(x) for ll, x in zip(lls, e.choices)]}
        if "acc_answer" in rules:
            prior = [brute_force_loglik(model, "Answer:", " " + x, tok) for x in e.choices]
            assert row["loglik_answer"] == pytest.approx(prior, abs=1e-3)
            scores["acc_answer"] = [ll - p for ll, p in zip(lls, prior)]
        for rule in rules:
            pick = int(np.argmax(scores[rule]))
            assert row["picks"][rule] == pick
            hits[rule].append(pick == e.label)
        assert row["choices"] == e.choices and row["label"] == e.label    # choice order
        assert row.get("contexts", [row.get("context")] * len(e.choices)) == e.contexts
    assert report["metrics"] == {rule: sum(hits[rule]) / len(examples) for rule in rules}
    assert report["stderr"] == {rule: None if len(examples) == 1 else
                                pytest.approx(plain_stderr(hits[rule])) for rule in rules}


def test_winogrande_report_keeps_contexts_in_choice_order(loaded):
    model, tok = loaded
    examples = E.read_task("winogrande", fixture("winogrande.jsonl"))
    row = E.evaluate_choices(model, tok, "winogrande", examples)["examples"][1]
    assert row["contexts"] == ["The dog could not eat the fish because the fish",   # not sorted
                               "The dog could not eat the fish because the dog"]
    assert row["choices"] == ["was too big."] * 2


def test_mmlu_two_subjects_against_brute_force(long_ckpt, capsys):
    argv = ["--ckpt", long_ckpt, "--task", "mmlu", "--batch-size", "5"]
    report = E.main(argv + ["--data", fixture("mmlu/test"), "--shots-from", fixture("mmlu/dev")])
    model, tok = G.load_model(long_ckpt)
    test = E.read_task("mmlu", fixture("mmlu/test"))
    E.add_prompts("mmlu", test, E.read_task("mmlu", fixture("mmlu/dev")), 5)
    right = {}
    for e, row in zip(test, report["examples"]):
        lls = [brute_force_loglik(model, e.contexts[0], " " + x, tok) for x in "ABCD"]
        assert row["picks"]["acc"] == int(np.argmax(lls)) and row["subject"] == e.subject
        right.setdefault(e.subject, []).append(int(np.argmax(lls)) == e.label)
    assert report["subjects"] == {s: np.mean(r) for s, r in right.items()}
    assert report["categories"] == {"humanities": np.mean(right["world_religions"]),
                                    "stem": np.mean(right["abstract_algebra"])}
    assert report["metrics"] == {"acc": np.mean(sum(right.values(), []))}
    assert report["stderr"] == {"acc": pytest.approx(plain_stderr(sum(right.values(), [])))}
    assert report["subjects_stderr"] == {s: pytest.approx(plain_stderr(r))
                                         for s, r in right.items()}
    assert report["categories_stderr"] == {
        "humanities": pytest.approx(plain_stderr(right["world_religions"])),
        "stem": pytest.approx(plain_stderr(right["abstract_algebra"]))}
    assert report["shots"] == 5 and report["llama_7b_paper"] == 35.1
    out = capsys.readouterr().out
    assert re.search(r"\n  humanities +\d+\.\d ± \d+\.\d   LLaMA-7B 34\.0\n"
                     r"  stem +\d+\.\d ± \d+\.\d   LLaMA-7B 30\.5\n", out)
    assert "the paper's Table 9 uses acc" in out and "LLaMA-7B 35.1" in out
    hf = E.main(argv + ["--data", fixture("hf/mmlu_test.jsonl"),
                        "--shots-from", fixture("hf/mmlu_dev.jsonl")])
    assert hf["metrics"] == report["metrics"] and hf["subjects"] == report["subjects"]


# --- closed-book QA ----------------------------------------------------------------------------

def test_answer_extraction_at_each_stop():
    assert E.extract_answer(" Paris\nQ: What is the capital of Italy?") == "Paris"
    assert E.extract_answer(" Frank Sinatra. He sang it in 1956") == "Frank Sinatra"
    assert E.extract_answer(" Charles Darwin, in 1859") == "Charles Darwin"
    assert E.extract_answer(" 1859, the year. Then\n") == "1859"      # the first stop wins
    assert E.extract_answer(" no stop at all ") == "no stop at all"
    assert E.normalize_answer("The  Sun!") == E.normalize_answer("sun") == "sun"
    assert E.normalize_answer("an apple, a day") == "apple day"
    # SQuAD's rule finds an article between word boundaries: beside a curly quote or a dash too.
    assert E.normalize_answer("“The Sting”") == E.normalize_answer("“ Sting”") == "“ sting”"
    assert E.normalize_answer("Hall–the Oates") == "hall– oates"


class ScriptedModel(torch.nn.Module):
    """A stand-in for a Transformer: after each prompt it 'generates' a fixed list of tokens
    (logits with all the mass on the next one, then EOS), and counts its forward calls."""

    def __init__(self, scripts: dict, vocab_size: int, eos_id: int):
        super().__init__()
        self.scripts, self.eos_id, self.calls = scripts, eos_id, 0
        self.args = SimpleNamespace(max_seq_len=256, vocab_size=vocab_size)
        self.output = torch.nn.Linear(1, 1)          # generate_tokens reads its device

    def setup_cache(self, batch, seq_len):
        self.seen = [[] for _ in range(batch)]

    def clear_cache(self):
        pass

    def forward(self, tokens, start_pos=0):
        self.calls += 1
        logits = torch.zeros(*tokens.shape, self.args.vocab_size)          # (B, T, V)
        for b, seen in enumerate(self.seen):
            seen += tokens[b].tolist()
            for prompt, answer in self.scripts.items():
                k = len(seen) - len(prompt)
                if k >= 0 and tuple(seen[:len(prompt)]) == prompt:
                    logits[b, -1, answer[k] if k < len(answer) else self.eos_id] = 1.0
        return logits


def test_decoding_stops_once_every_row_has_answered(loaded):
    _, tok = loaded
    texts = {"Q: where?\nA:": " Paris\nQ: What is the capital of Italy?\nA: Rome",
             "Q: who sang it?\nA:": " Frank Sinatra. He sang it in a film in the fifties",
             "Q: who wrote it, then?\nA:": " Charles Darwin, who sailed on the Beagle for years"}
    prompts = [tok.encode(p, bos=True) for p in texts]
    answers = [tok.encode(t, bos=False) for t in texts.values()]
    model = ScriptedModel({tuple(p): a for p, a in zip(prompts, answers)}, tok.n_words, tok.eos_id)
    generations = E.greedy_generations(model, tok, prompts, max_new_tokens=40)
    assert [E.extract_answer(g) for g in generations] == ["Paris", "Frank Sinatra",
                                                          "Charles Darwin"]
    # Row i needs k_i tokens to show its stop, the k-th written at column len_i + k - 1.
    needed = [min(k for k in range(1, len(a) + 1) if any(s in tok.decode(a[:k]) for s in "\n.,"))
              for a in answers]
    last = max(len(p) + k - 1 for p, k in zip(prompts, needed))
    start = min(len(p) for p in prompts)
    assert model.calls == last - start + 1 < max(len(p) for p in prompts) + 40 - start


def test_qa_answers_equal_plain_greedy_decoding(loaded):
    model, tok = loaded
    examples = E.read_task("nq", fixture("nq.jsonl"))
    E.add_prompts("nq", examples, None, 0)
    report = E.evaluate_qa(model, tok, examples, batch_size=2, max_new_tokens=12)
    for e, row in zip(examples, report["examples"]):
        full = G.generate_tokens(model, [tok.encode(e.contexts[0])], 12, temperature=0.0,
                                 eos_id=tok.eos_id)[0]
        assert row["prediction"] == E.extract_answer(tok.decode(full))
        assert row["prompt"] == e.contexts[0] and "\n" not in row["prediction"]
    examples[0].answers = ["The " + report["examples"][0]["prediction"].upper() + "!"]
    examples[1].answers = [report["examples"][1]["prediction"] + " extra words"]
    again = E.evaluate_qa(model, tok, examples, batch_size=2, max_new_tokens=12)
    assert [r["exact_match"] for r in again["examples"]][:2] == [True, False]
    assert again["stderr"] == {"exact_match": pytest.approx(
        plain_stderr([r["exact_match"] for r in again["examples"]]))}


def test_few_shot_qa_from_the_command_line(long_ckpt, capsys):
    argv = ["--ckpt", long_ckpt, "--task", "nq_open", "--data", fixture("hf/nq.jsonl"),
            "--shots-from", fixture("nq_train.jsonl"), "--max-new-tokens", "6"]
    report = E.main(argv + ["--shots", "1"])
    assert report["task"] == "nq" and report["shots"] == 1 and report["llama_7b_paper"] == 18.7
    for row in report["examples"]:
        assert row["prompt"].startswith("Answer these questions:\nQ: ")
        assert row["prompt"].count("\nA: ") == 1 and row["prompt"].endswith("?\nA:")
    assert "the paper's Table 4 uses exact_match" in capsys.readouterr().out
    report = E.main(argv + ["--shots", "2"])
    assert report["llama_7b_paper"] is None
    assert "no 2-shot LLaMA-7B number" in capsys.readouterr().out


# --- perplexity --------------------------------------------------------------------------------

def test_perplexity_equals_plain_computation_on_text_and_shards(loaded, tmp_path):
    model, tok = loaded
    text = open(fixture("heldout.txt")).read()
    ids = tok.encode(text, bos=True)
    assert len(ids) > 129                                     # more than one window of 128
    nll, count = 0.0, 0
    for s in range(0, len(ids) - 1, 128):            # each window alone, unpadded
        window = ids[s:s + 129]
        logp = torch.log_softmax(model(torch.tensor([window[:-1]]))[0].double(), -1)
        nll -= sum(logp[t - 1, window[t]].item() for t in range(1, len(window)))
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


# --- standard errors; several tasks in one run --------------------------------------------------

def test_standard_error_is_the_harness_formula():
    """mean_stderr against its definition written here (the harness's mean_stderr: sample
    standard deviation over sqrt(n)) and against its closed form for an accuracy p of n
    examples, sqrt(p (1 - p) / (n - 1)); one example has none, as the harness's N/A."""
    rng = random.Random(0)
    for n in (2, 3, 20, 500):
        hits = [rng.random() < 0.3 for _ in range(n)]
        p = sum(hits) / n
        assert E.mean_stderr(hits) == pytest.approx(plain_stderr(hits), rel=1e-12)
        assert E.mean_stderr(hits) == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), rel=1e-12)
    assert E.mean_stderr([True]) is None
    assert 100 * E.mean_stderr([True] * 286 + [False] * 214) == pytest.approx(2.215, abs=1e-3)
    assert E.plus_minus(0.5, 0.25, 100, 1) == "50.0 ± 25.0" and E.plus_minus(1.0, None) == (
        "1.0000 ± N/A")


# lm-evaluation-harness 0.4.13's figures on the shared set, tests/fixtures/eval/shared (20
# examples a task, Hugging Face's layout), for this module's `ckpt` model exported by
# generate.py --export-hf, from the run:
#   lm_eval --model hf --model_args pretrained=HF,dtype=float32 --device cpu --batch_size 1 \
#           --include_path TASKS --tasks shared_boolq,shared_piqa,...,shared_openbookqa
# with each task's YAML the harness's own, but for `dataset_path: json` and its data_files the
# shared file (boolq and siqa also list acc_norm). Its picks were ours on all 160 examples, its
# log-likelihoods ours within 1e-3. (task, rule): (accuracy, standard error) from its results.
HARNESS = {
    ("boolq", "acc"): (0.55, 0.11413288653790232),
    ("boolq", "acc_norm"): (0.55, 0.11413288653790232),
    ("piqa", "acc"): (0.6, 0.11239029738980327),
    ("piqa", "acc_norm"): (0.35, 0.10942433098048308),
    ("siqa", "acc"): (0.35, 0.10942433098048311),
    ("siqa", "acc_norm"): (0.25, 0.09933992677987828),
    ("hellaswag", "acc"): (0.35, 0.1094243309804831),
    ("hellaswag", "acc_norm"): (0.05, 0.049999999999999975),
    ("winogrande", "acc"): (0.55, 0.11413288653790232),
    ("arc_easy", "acc"): (0.35, 0.10942433098048308),
    ("arc_easy", "acc_norm"): (0.25, 0.09933992677987828),
    ("arc_challenge", "acc"): (0.3, 0.10513149660756935),
    ("arc_challenge", "acc_norm"): (0.25, 0.09933992677987828),
    ("openbookqa", "acc"): (0.1, 0.06882472016116853),
    ("openbookqa", "acc_norm"): (0.3, 0.10513149660756933),
}


def test_one_run_of_table3_gives_the_harness_figures(ckpt, capsys):
    report = E.main(["--ckpt", ckpt, "--task", "common_sense", "--data", fixture("shared")])
    assert list(report["tasks"]) == E.SUITES["common_sense"] == [
        "boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
        "openbookqa"]                                        # the columns of the paper's Table 3
    for (task, rule), (acc, stderr) in HARNESS.items():
        section = report["tasks"][task]
        assert (section["metrics"][rule], section["stderr"][rule]) == (acc, stderr), (task, rule)
    out = capsys.readouterr().out
    assert re.search(r"\nhellaswag +20  acc_norm +5\.0 ± 5\.0  76\.1\n", out)   # 100 x HARNESS


def test_several_tasks_load_once_and_report_as_one_task_runs(ckpt, tmp_path, capsys,
                                                            monkeypatch):
    loads, load = [], E.load_model
    monkeypatch.setattr(E, "load_model", lambda *a, **k: loads.append(a) or load(*a, **k))
    out = str(tmp_path / "report.json")
    report = E.main(["--ckpt", ckpt, "--task", "piqa,nq_open,BoolQ", "--data", fixture(""),
                     "--data", "nq=" + fixture("hf/nq.jsonl"), "--max-new-tokens", "4",
                     "--out", out])
    assert len(loads) == 1 and json.load(open(out)) == report
    printed = capsys.readouterr().out
    singles = [E.main(["--ckpt", ckpt, "--task", task, "--data", path, "--max-new-tokens", "4"])
               for task, path in (("piqa", fixture("piqa.jsonl")), ("nq", fixture("hf/nq.jsonl")),
                                  ("boolq", fixture("boolq.jsonl")))]
    assert list(report["tasks"]) == ["piqa", "nq", "boolq"]
    for single in singles:                  # each section is the report of a one-task run
        section = report["tasks"][single["task"]]
        for timing in ("seconds", "examples_per_s"):
            del section[timing], single[timing]
        assert section == single
    assert report["table"] == [dict(task=s["task"], shots=0, n=s["n"], metric=s["paper_metric"],
                                    ours=s["paper_value"], stderr=s["paper_stderr"],
                                    llama_7b=s["llama_7b_paper"]) for s in singles]
    table = printed[printed.index("\ntask "):].splitlines()[2:]
    piqa = E.plus_minus(singles[0]["paper_value"], singles[0]["paper_stderr"], 100, 1)
    assert re.fullmatch(rf"piqa +2  acc_norm +{re.escape(piqa)}  79\.8", table[0])
    assert re.fullmatch(r"nq +3  exact_match +\d+\.\d ± \d+\.\d  16\.8", table[1])
    assert re.fullmatch(r"boolq +3  acc_answer +\d+\.\d ± \d+\.\d  76\.5", table[2])
    assert re.fullmatch(r"3 tasks in \d+\.\d s, the model loaded once", table[3])


def test_a_zero_shot_task_beside_a_few_shot_one_stays_zero_shot(long_ckpt):
    report = E.main(["--ckpt", long_ckpt, "--task", "boolq,nq", "--data", fixture(""),
                     "--shots", "1", "--shots-from", fixture("nq_train.jsonl"),
                     "--max-new-tokens", "4"])
    assert [(t["task"], t["shots"]) for t in report["table"]] == [("boolq", 0), ("nq", 1)]
    assert report["tasks"]["nq"]["shots_from"] == fixture("nq_train.jsonl")
    assert report["table"][1]["llama_7b"] == 18.7


@pytest.mark.parametrize("argv,message", [
    (["--task", "piqa,boolq", "--data", fixture("piqa.jsonl")],
     f"--data {fixture('piqa.jsonl')} is not a folder: with several tasks give TASK=FILE for "
     "each, or a folder holding TASK.jsonl files"),
    (["--task", "piqa,boolq", "--data", "piqa=" + fixture("piqa.jsonl")],
     "--data: give a file for each task as TASK=FILE, or a folder holding TASK.jsonl files; "
     "boolq has none"),
    (["--task", "piqa", "--data", "boolq=" + fixture("boolq.jsonl")],
     f"--data boolq={fixture('boolq.jsonl')}: boolq is not among --task piqa"),
    (["--task", "piqa", "--data", "piqa=" + fixture("piqa.jsonl"), "--data", fixture("")],
     f"--data {fixture('')}: every task has its file already; leave it out"),
    (["--task", "boolq,common_sense", "--data", fixture("")],
     "--task names boolq twice; score each task once"),
    (["--task", "piqa,mmlu", "--data", fixture("hf")],
     f"--data {fixture('hf')} is a folder without mmlu.jsonl or mmlu.json; give mmlu's file "
     "(eval.py's section 6 names it), or put it there under that name"),
    (["--task", "nq,triviaqa", "--data", fixture(""), "--shots", "1", "--shots-from",
      fixture("nq_train.jsonl")],
     "--shots-from: with several few-shot tasks (nq, triviaqa) give TASK=FILE for each"),
    (["--task", "piqa,hellaswag", "--data", fixture(""), "--batch-size", "0"],
     "--batch-size 0: give at least 1 (sequences per forward)"),
])
def test_several_tasks_refused_in_one_line_before_any_work(tmp_path, argv, message):
    assert refused(["--ckpt", str(tmp_path / "no-such-ckpt"), *argv], tmp_path) == (
        f"error: {message}")


# --- the command line --------------------------------------------------------------------------

def test_paper_numbers_are_llama_7b():
    """LLaMA-7B's published scores [LLaMA Tables 3, 4, 5, 9], as printed in the paper."""
    table3 = {"boolq": 76.5, "piqa": 79.8, "siqa": 48.9, "hellaswag": 76.1, "winogrande": 70.1,
              "arc_easy": 72.8, "arc_challenge": 47.6, "openbookqa": 57.2}
    for task, score in table3.items():
        assert E.TASKS[task].llama_7b == {0: score}
    assert E.TASKS["nq"].llama_7b == {0: 16.8, 1: 18.7, 5: 22.0, 64: 26.1}
    assert E.TASKS["triviaqa"].llama_7b == {0: 50.0, 1: 53.4, 5: 56.3, 64: 57.6}
    assert E.TASKS["mmlu"].llama_7b == {5: 35.1}
    assert E.MMLU_LLAMA_7B == {"humanities": 34.0, "stem": 30.5, "social_sciences": 38.3,
                               "other": 38.1}
    assert sorted(len(s) for s in E.MMLU_SUBJECTS.values()) == [12, 13, 13, 19]
    assert len(set(sum(E.MMLU_SUBJECTS.values(), []))) == 57


def test_main_writes_the_report(ckpt, tmp_path, capsys):
    out = str(tmp_path / "report.json")
    E.main(["--ckpt", ckpt, "--task", "BoolQ", "--data", fixture("boolq.jsonl"), "--out", out])
    report = json.load(open(out))
    assert report["task"] == "boolq" and report["n"] == 3 and report["paper_metric"] == "acc_answer"
    assert set(report["metrics"]) == {"acc", "acc_norm", "acc_answer"}
    assert report["paper_rule"] == "argmax P(continuation | context) / P(continuation | 'Answer:')"
    assert report["llama_7b_paper"] == 76.5
    assert report["examples_per_s"] == pytest.approx(3 / report["seconds"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("the paper's Table 3 uses acc_answer")
    assert re.fullmatch(r"3 examples in \d+\.\d s \(\d+\.\d examples/s\)", lines[2])
    assert os.listdir(tmp_path) == ["report.json"]            # no temporary file left
    E.main(["--ckpt", ckpt, "--task", "arc-challenge", "--data", fixture("arc_challenge.jsonl"),
            "--limit", "1", "--out", out])
    assert len(json.load(open(out))["examples"][0]["loglik"]) == 4
    report = E.main(["--ckpt", ckpt, "--task", "triviaqa", "--data", fixture("triviaqa.json"),
                     "--max-new-tokens", "4"])
    assert report["n"] == 2 and report["llama_7b_paper"] == 50.0


def test_inference_scripts_leave_cudnn_attention_out(ckpt):
    """eval.py and generate.py switch cuDNN's SDPA kernel off: it builds a plan for every new
    shape, and their shapes change with every batch and step (model.plan_free_attention)."""
    try:
        for main, argv in ((E.main, ["--task", "BoolQ", "--data", fixture("boolq.jsonl")]),
                           (G.main, ["--prompt", "a", "--max-new-tokens", "2"])):
            torch.backends.cuda.enable_cudnn_sdp(True)
            main(["--ckpt", ckpt, "--device", "cpu", *argv])
            assert not torch.backends.cuda.cudnn_sdp_enabled(), main.__module__
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


# --- bad input: one line, a non-zero exit, nothing written -------------------------------------

def refused(argv, tmp_path):
    """main's one-line error for argv; the report it was given is not written."""
    out = tmp_path / "report.json"
    out.write_text("an earlier report")
    with pytest.raises(SystemExit) as info:
        E.main(argv + ["--out", str(out)])
    message = info.value.code
    assert isinstance(message, str) and "\n" not in message    # a str exits with status 1
    assert out.read_text() == "an earlier report"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".eval-")]   # no temporary
    return message


@pytest.mark.parametrize("flag,value,message", [
    ("--batch-size", "-2", "--batch-size -2: give at least 1 (sequences per forward)"),
    ("--batch-size", "-1", "--batch-size -1: give at least 1 (sequences per forward)"),
    ("--batch-size", "0", "--batch-size 0: give at least 1 (sequences per forward)"),
    ("--limit", "0", "--limit 0: give at least 1 example, or leave it out for all"),
    ("--max-new-tokens", "0", "--max-new-tokens 0: give at least 1 (an answer's length in "
                              "tokens, 24 by default)"),
    ("--shots", "-1", "--shots -1: give 0 or more solved examples (the paper: 0, 1, 5, 64 for "
                      "QA, 5 for MMLU)"),
    ("--shots", "5", "--shots 5: boolq is zero-shot in the paper; few-shot prompts are for nq, "
                     "triviaqa and mmlu"),
    ("--batch-size", "two", "argument --batch-size: invalid int value: 'two'; see python "
                            "eval.py --help"),
])
def test_numeric_flags_are_checked_before_any_work(tmp_path, flag, value, message):
    argv = ["--ckpt", str(tmp_path / "no-such-ckpt"), "--task", "boolq",
            "--data", fixture("boolq.jsonl"), flag, value]
    assert refused(argv, tmp_path) == f"error: {message}"


def test_shots_need_their_file_and_mmlu_has_five(tmp_path):
    base = ["--ckpt", str(tmp_path / "no-such-ckpt"), "--data", fixture("nq.jsonl")]
    assert refused(base + ["--task", "nq", "--shots", "5"], tmp_path) == (
        "error: --shots 5 needs --shots-from, the file the solved examples come from (a QA "
        "train file, or MMLU's dev split)")
    assert refused(base + ["--task", "nq", "--shots-from", fixture("nq_train.jsonl")],
                   tmp_path) == ("error: --shots-from is read only for few-shot prompts: give "
                                 "--shots N too")
    assert refused(["--ckpt", str(tmp_path / "no-such-ckpt"), "--data", fixture("piqa.jsonl"),
                    "--task", "piqa", "--shots-from", fixture("nq_train.jsonl")], tmp_path) == (
        "error: --shots-from: piqa reads no shots (zero-shot in the paper); leave it out")
    assert refused(["--ckpt", str(tmp_path / "no-such-ckpt"), "--data", fixture("heldout.txt"),
                    "--task", "perplexity", "--shots-from", fixture("nq_train.jsonl")],
                   tmp_path) == "error: --shots-from: perplexity reads no shots; leave it out"
    assert refused(base + ["--task", "mmlu", "--shots", "6"], tmp_path) == (
        "error: --shots 6: MMLU's dev split has 5 questions a subject; give 0 to 5")
    assert refused(base + ["--task", "mmlu"], tmp_path) == (     # 5 shots, but none was typed
        "error: mmlu is 5-shot by default, as in the paper: give --shots-from with MMLU's dev "
        "split (data/dev), or --shots 0")


def test_a_folder_for_a_one_file_task_says_so(ckpt, tmp_path):
    """Only MMLU reads a folder of CSV files; any other task finds its file in a folder by its
    name, or is told so in its own words."""
    for folder in (fixture("mmlu"), fixture("mmlu/test")):     # the second holds CSV files
        assert refused(["--ckpt", ckpt, "--task", "piqa", "--data", folder], tmp_path) == (
            f"error: --data {folder} is a folder without piqa.jsonl or piqa.json; give piqa's "
            "file (eval.py's section 6 names it), or put it there under that name")
    assert refused(["--ckpt", ckpt, "--task", "nq", "--data", fixture("nq.jsonl"), "--shots",
                    "1", "--shots-from", fixture("hf")], tmp_path) == (
        f"error: task file {fixture('hf')} is a folder; give nq's file itself (eval.py's section "
        "6 names it)")
    report = E.main(["--ckpt", ckpt, "--task", "piqa", "--data", fixture("")])
    assert report["data"] == fixture("piqa.jsonl") and report["n"] == 2


def test_a_bad_flag_exits_with_status_1_and_one_line(tmp_path):
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "eval.py", "--ckpt", "x", "--task", "piqa", "--data",
                          fixture("piqa.jsonl"), "--batch-size", "-2"], cwd=cwd,
                         capture_output=True, text=True)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr == "error: --batch-size -2: give at least 1 (sequences per forward)\n"


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_bytes(b"".join(line if isinstance(line, bytes) else (line + "\n").encode()
                              for line in lines))
    return str(path)


def test_bad_records_are_refused_in_one_line(tmp_path):
    base = ["--ckpt", str(tmp_path / "no-such-ckpt"), "--data"]
    need = {task: E.TASKS[task].fields for task in E.TASKS}
    hella = {"activity_label": "x", "ctx_a": "A man", "ctx_b": "the cat",
             "endings": ["a", "b", "c", "d"], "label": 0}
    path = write(tmp_path, "hella.jsonl", [json.dumps(hella), json.dumps({**hella, "label": 7})])
    assert refused(base + [path, "--task", "hellaswag"], tmp_path) == (
        f"error: {path} line 2: field label is 7; it must be a number from 0 to 3; hellaswag "
        f"records need {need['hellaswag']}")
    assert len(E.read_task("hellaswag", path, limit=1)) == 1        # line 2 is never read
    path = write(tmp_path, "hella.jsonl", [json.dumps({**hella, "endings": "a b c d"})])
    assert refused(base + [path, "--task", "hellaswag"], tmp_path) == (
        f"error: {path} line 1: field endings must be a list of strings, not a string; "
        f"hellaswag records need {need['hellaswag']}")
    boolq = {"question": "is it", "passage": "It is.", "label": "false"}
    path = write(tmp_path, "boolq.jsonl", [json.dumps(boolq)])
    assert refused(base + [path, "--task", "boolq"], tmp_path) == (
        f"error: {path} line 1: field label is 'false'; it must be true or false (or 1 or 0); "
        f"boolq records need {need['boolq']}")
    siqa = write(tmp_path, "dev.jsonl", open(fixture("siqa.jsonl")).read().splitlines())
    write(tmp_path, "dev-labels.lst", ["1", "4"])                  # SIQA's labels are 1-3
    assert refused(base + [siqa, "--task", "siqa"], tmp_path) == (
        f"error: {siqa} line 2: field label is '4'; it must be a number from 1 to 3; siqa "
        f"records need {need['siqa']}")
    arc = {"question": "Why?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
           "answerKey": "C"}
    path = write(tmp_path, "arc.jsonl", [json.dumps(arc)])
    assert refused(base + [path, "--task", "arc_easy"], tmp_path) == (
        f"error: {path} line 1: field answerKey is 'C', not one of the choices' labels "
        f"['A', 'B']; arc_easy records need {need['arc_easy']}")
    path = write(tmp_path, "nq.jsonl", [json.dumps({"question": "who"}), "{broken"])
    assert refused(base + [path, "--task", "nq"], tmp_path) == (
        f"error: {path} line 1: missing field answer; nq records need {need['nq']}")
    path = write(tmp_path, "nq.jsonl", [json.dumps({"question": "who", "answer": ["x"]}),
                                        "{broken"])
    assert refused(base + [path, "--task", "nq"], tmp_path) == (
        f"error: {path} line 2 is not valid JSON (Expecting property name enclosed in double "
        "quotes); expect one object per line")
    mmlu = write(tmp_path, "virology_test.csv", ["What is it?,a,b,c,d,E"])
    assert refused(base + [mmlu, "--task", "mmlu", "--shots", "0"], tmp_path) == (
        f"error: {mmlu} row 1: field answer is 'E'; it must be a letter A-D or an index 0-3; "
        f"mmlu records need {need['mmlu']}")


def test_records_that_would_fail_later_are_refused_in_one_line(tmp_path):
    """A question without an answer (scored a miss whatever the model says, and no shot), an
    MMLU answer 2.0 (a CSV column with a gap: in range(4), but no index), and an ARC record whose
    choices hold more labels than texts, each said as what it is."""
    base = ["--ckpt", str(tmp_path / "no-such-ckpt"), "--data"]
    need = {task: E.TASKS[task].fields for task in E.TASKS}
    path = write(tmp_path, "nq.jsonl", [json.dumps({"question": "who", "answer": []})])
    assert refused(base + [path, "--task", "nq"], tmp_path) == (
        f"error: {path} line 1: field answer is an empty list; a question needs one answer or "
        f"more; nq records need {need['nq']}")
    mmlu = {"question": "Which?", "subject": "virology", "choices": ["a", "b", "c", "d"]}
    path = write(tmp_path, "mmlu.jsonl", [json.dumps({**mmlu, "answer": 2.0})])
    assert refused(base + [path, "--task", "mmlu", "--shots", "0"], tmp_path) == (
        f"error: {path} line 1: field answer is 2.0; it must be a letter A-D or an index 0-3; "
        f"mmlu records need {need['mmlu']}")
    assert E.read_task("mmlu", write(tmp_path, "ok.jsonl", [json.dumps({**mmlu, "answer": 2})])
                       )[0].label == 2
    arc = {"question": "Why?", "choices": {"text": ["a", "b"], "label": ["A", "B", "C"]},
           "answerKey": "A"}
    path = write(tmp_path, "arc.jsonl", [json.dumps(arc)])
    assert refused(base + [path, "--task", "arc_easy"], tmp_path) == (
        f"error: {path} line 1: field choices holds 2 texts but 3 labels; arc_easy records need "
        f"{need['arc_easy']}")


def test_invalid_utf8_is_one_line(tmp_path):
    base = ["--ckpt", str(tmp_path / "no-such-ckpt"), "--data"]
    good = json.dumps({"question": "who", "answer": ["x"]})
    path = write(tmp_path, "nq.jsonl", [good, b'{"question": "caf\xe9"}\n'])
    assert refused(base + [path, "--task", "nq"], tmp_path) == (
        f"error: {path} line 2 is not UTF-8 (invalid continuation byte, byte 18 of the line); "
        "re-download the file or convert it to UTF-8")
    path = write(tmp_path, "text.txt", ["fine", b"caf\xe9 au lait\n"])
    assert refused(base + [path, "--task", "perplexity"], tmp_path) == (
        f"error: {path} line 2 is not UTF-8 (invalid continuation byte, byte 4 of the line); "
        "re-download the file or convert it to UTF-8")


def test_bad_files_and_outputs(ckpt, tmp_path):
    base = ["--ckpt", ckpt, "--data"]
    empty = write(tmp_path, "empty.txt", [])
    assert refused(base + [empty, "--task", "perplexity"], tmp_path) == (
        f"error: {empty} holds no text to score; give a text file, or a .npy/.bin token shard")
    nothing = write(tmp_path, "nothing.jsonl", ["", "  "])
    assert refused(base + [nothing, "--task", "piqa"], tmp_path) == (
        f"error: {nothing} holds no piqa examples")
    assert refused(base + [fixture("piqa.jsonl"), "--task", "mmlu", "--shots", "0"],
                   tmp_path).startswith(
        f"error: {fixture('piqa.jsonl')} line 1: missing field subject; mmlu records need ")
    assert refused(base + [fixture("piqa.jsonl"), "--task", "gsm8k"], tmp_path).startswith(
        "error: unknown task 'gsm8k'; choose one of boolq, piqa")
    assert refused(base + [str(tmp_path / "no.jsonl"), "--task", "piqa"], tmp_path) == (
        f"error: task file {tmp_path / 'no.jsonl'} does not exist; eval.py's section 6 names "
        "which piqa file to download")
    np.save(tmp_path / "bad.npy", np.array([5, 9999]))                    # ids beyond 320
    assert "another tokenizer" in refused(base + [str(tmp_path / "bad.npy"), "--task",
                                                  "perplexity"], tmp_path)
    # --out is checked first: its error comes before the missing checkpoint's.
    argv = ["--ckpt", str(tmp_path / "no-such-ckpt"), "--data", fixture("piqa.jsonl"), "--task",
            "piqa", "--out"]
    with pytest.raises(SystemExit) as info:
        E.main(argv + [str(tmp_path)])
    assert info.value.code == (f"error: --out {tmp_path} is a folder; give a file name such as "
                               f"{tmp_path / 'report.json'}")
    with pytest.raises(SystemExit) as info:
        E.main(argv + [str(tmp_path / "missing" / "r.json")])
    assert info.value.code == (f"error: --out {tmp_path / 'missing' / 'r.json'}: "
                               f"{tmp_path / 'missing'} is not a folder; create it, or choose "
                               "another place")


def test_a_token_shard_is_checked_before_the_model_is_loaded(tmp_path):
    """A shard that cannot be scored is refused before the checkpoint is read (here there is
    none): a suite does not score its other tasks for hours and then lose their report. Only the
    ids' range waits for the tokenizer (test_bad_files_and_outputs)."""
    base = ["--ckpt", str(tmp_path / "no-such-ckpt"), "--task", "perplexity", "--data"]
    np.save(tmp_path / "2d.npy", np.zeros((2, 3), dtype=np.int64))
    np.save(tmp_path / "float.npy", np.array([1.5, 2.0]))
    np.save(tmp_path / "negative.npy", np.array([3, -1]))
    np.save(tmp_path / "one.npy", np.array([3]))
    for name in ("2d.npy", "float.npy", "negative.npy", "one.npy"):
        path = tmp_path / name
        assert refused(base + [str(path)], tmp_path) == (
            f"error: {path} must be a 1-D array of at least 2 token ids (whole numbers, 0 or "
            "more); was it prepared with another tokenizer?")
    assert refused(base + [str(tmp_path / "missing.npy")], tmp_path) == (
        f"error: data file {tmp_path / 'missing.npy'} does not exist")
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "odd.bin").write_bytes(b"abc")                  # no whole uint16 ids
    (tmp_path / "text.npy").write_bytes(b"not an array")
    for name in ("empty.bin", "odd.bin", "text.npy"):
        message = refused(base + [str(tmp_path / name)], tmp_path)
        assert message.startswith(f"error: {tmp_path / name} is not a token shard (")
        assert message.endswith("); give a 1-D .npy array, or a .bin of ids as data.py writes "
                                "them")
    np.array([3, 5], dtype=np.uint16).tofile(tmp_path / "ok.bin")
    assert refused(base + [str(tmp_path / "ok.bin")], tmp_path) == (    # then the checkpoint
        f"error: checkpoint folder {tmp_path / 'no-such-ckpt'} does not exist")


def test_a_device_that_is_not_there_is_refused_before_any_work(tmp_path):
    base = ["--ckpt", str(tmp_path / "no-such-ckpt"), "--task", "piqa", "--data",
            fixture("piqa.jsonl"), "--device"]
    assert refused(base + ["gpu"], tmp_path) == (
        "error: --device 'gpu' is not a device; use cpu or cuda")
    if not torch.cuda.is_available():
        assert refused(base + ["cuda"], tmp_path) == (
            "error: --device cuda but no CUDA device is visible; use --device cpu")


def test_an_unwritable_out_is_found_before_any_work(tmp_path, monkeypatch):
    def refuse(**kwargs):             # what mkstemp meets in a folder we may not write to
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(E.tempfile, "mkstemp", refuse)
    with pytest.raises(SystemExit) as info:              # before the missing checkpoint
        E.main(["--ckpt", str(tmp_path / "no-such-ckpt"), "--data", fixture("piqa.jsonl"),
                "--task", "piqa", "--out", str(tmp_path / "r.json")])
    assert info.value.code == (f"error: --out {tmp_path / 'r.json'}: cannot write in {tmp_path} "
                               "(Permission denied); choose another place")
    assert os.listdir(tmp_path) == []


def test_a_prompt_too_long_for_the_model_is_refused_before_decoding(ckpt, tmp_path):
    argv = ["--ckpt", ckpt, "--task", "nq", "--data", fixture("nq.jsonl"), "--shots", "2",
            "--shots-from", fixture("nq_train.jsonl"), "--max-new-tokens", "100"]
    message = refused(argv, tmp_path)
    assert re.fullmatch(r"error: example \d's prompt is \d+ tokens; with --max-new-tokens 100 it "
                        r"exceeds the model's max_seq_len 128: use fewer --shots or new tokens",
                        message)


# --- an output never overwrites an input; a file is read with a bound ---------------------------

def test_an_out_that_is_an_input_is_refused_before_any_work(ckpt, tmp_path):
    data = write(tmp_path, "hs.jsonl", open(fixture("hellaswag.jsonl")).read().splitlines())
    before = open(data, "rb").read()
    for out, flag, what in ((data, "--data", data), (os.path.join(ckpt, "report.json"), "--ckpt",
                                                    ckpt)):
        with pytest.raises(SystemExit) as info:
            E.main(["--ckpt", ckpt, "--task", "hellaswag", "--data", data, "--out", out])
        relation = "is" if out == data else "lies inside"
        assert info.value.code == (f"error: --out {out} {relation} {flag} {what}: writing it "
                                   "would overwrite what this command reads; choose an --out "
                                   "outside it")
    assert open(data, "rb").read() == before and os.listdir(ckpt).count("report.json") == 0


def test_an_empty_out_is_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit) as info:                  # before the missing checkpoint
        E.main(["--ckpt", str(tmp_path / "no-such-ckpt"), "--task", "piqa", "--data",
                fixture("piqa.jsonl"), "--out", ""])
    assert info.value.code == ("error: --out '' names no file; give a file name such as "
                               "report.json, or leave --out out to print the report only")


def run_eval_capped(*argv, timeout=60):
    """eval.py in its own process, its memory capped at 4 GiB: a reader without a bound meets
    MemoryError there in seconds instead of filling this machine."""
    import resource

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "eval.py", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=cap)


@pytest.mark.parametrize("task,make", [
    ("hellaswag", lambda path: os.symlink("/dev/zero", path)),
    ("perplexity", lambda path: os.symlink("/dev/zero", path)),
    ("hellaswag", os.mkfifo),                                  # a reader would wait forever
])
def test_dev_zero_or_a_fifo_as_data_is_one_line(tmp_path, task, make):
    path = tmp_path / "data.jsonl"
    make(str(path))
    run = run_eval_capped("--ckpt", str(tmp_path / "no-such-ckpt"), "--task", task, "--data",
                          str(path))
    what = "task file" if task != "perplexity" else "data file"
    assert run.returncode == 1 and run.stderr == (
        f"error: {what} {path} is not a regular file but a FIFO, a device or a socket, which "
        "cannot be read to an end; give a file\n")


def test_a_task_file_larger_than_the_bound_is_one_line(tmp_path, monkeypatch):
    import checkpoint as C
    monkeypatch.setattr(C, "TEXT_LIMIT", 100, raising=False)   # the bound, at test size
    message = refused(["--ckpt", str(tmp_path / "no-such-ckpt"), "--task", "piqa", "--data",
                       fixture("piqa.jsonl")], tmp_path)
    size = os.path.getsize(fixture("piqa.jsonl"))
    assert message == (f"error: task file {fixture('piqa.jsonl')} holds {size:,} bytes, more "
                       "than the 100 bytes read at once; split it into smaller files")


def test_an_unreadable_data_file_says_what_to_do(tmp_path, monkeypatch):
    import builtins
    data, real = fixture("piqa.jsonl"), builtins.open

    def no_access(path, *a, **k):              # what a file without read permission gives
        if str(path) == data:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(builtins, "open", no_access)
    assert refused(["--ckpt", str(tmp_path / "no-such-ckpt"), "--task", "piqa", "--data", data],
                   tmp_path) == (f"error: cannot read task file {data}: permission denied; give "
                                 "your user read access to it (chmod u+r), then run again")


# --- no silent wrong result ---------------------------------------------------------------------

def test_a_multiple_choice_record_with_one_choice_is_refused(tmp_path):
    hella = {"activity_label": "x", "ctx_a": "A man", "ctx_b": "the cat", "endings": ["a"],
             "label": 0}                             # one choice: right whatever the model says
    path = write(tmp_path, "one.jsonl", [json.dumps(hella)])
    assert refused(["--ckpt", str(tmp_path / "no-such-ckpt"), "--task", "hellaswag", "--data",
                    path], tmp_path) == (
        f"error: {path} line 1 has 1 choice(s): a multiple-choice record needs 2 or more, or it "
        "is scored right whatever the model does; fix or remove the record")


@pytest.mark.parametrize("name", ["piqa.jsonl", "mmlu/test/world_religions_test.csv"])
def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path, name):
    raw = open(fixture(name), "rb").read()
    path = tmp_path / os.path.basename(name)
    path.write_bytes(b"\xef\xbb\xbf" + raw)                  # what Windows editors write first
    if name.startswith("piqa"):
        (tmp_path / "piqa-labels.lst").write_bytes(
            b"\xef\xbb\xbf" + open(fixture("piqa-labels.lst"), "rb").read())
    task = "piqa" if name.startswith("piqa") else "mmlu"
    with_bom, without = E.read_task(task, str(path)), E.read_task(task, fixture(name))
    assert [(e.contexts, e.choices, e.label, e.question) for e in with_bom] == [
        (e.contexts, e.choices, e.label, e.question) for e in without]


def test_a_failed_report_write_says_the_scores_are_complete(ckpt, tmp_path, capsys,
                                                            monkeypatch):
    out = tmp_path / "report.json"

    def temporary_file_on_a_full_disk(prefix, suffix, dir):    # the kernel's full disk
        tmp = os.path.join(dir, f"{prefix}full{suffix}")
        os.symlink("/dev/full", tmp)
        return os.open(tmp, os.O_WRONLY), tmp
    monkeypatch.setattr(C.tempfile, "mkstemp", temporary_file_on_a_full_disk)
    with pytest.raises(SystemExit) as info:
        E.main(["--ckpt", ckpt, "--task", "boolq", "--data", fixture("boolq.jsonl"), "--out",
                str(out)])
    assert info.value.code == (f"error: the scores above are complete, but the report could not "
                               f"be written to {out} (No space left on device); free some space "
                               "or choose another --out, and run again to keep it")
    assert "boolq (3 examples): acc" in capsys.readouterr().out      # the scores were printed
    assert sorted(os.listdir(tmp_path)) == []                   # no report, no .tmp left


def test_a_new_report_gets_the_mode_of_any_new_file(ckpt, tmp_path):
    out = tmp_path / "report.json"
    E.main(["--ckpt", ckpt, "--task", "boolq", "--data", fixture("boolq.jsonl"), "--out",
            str(out)])
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask      # not the 0600 of a temporary


def test_a_rewritten_report_keeps_its_mode(ckpt, tmp_path):
    out = tmp_path / "report.json"
    out.write_text("an earlier report")
    os.chmod(out, 0o640)
    E.main(["--ckpt", ckpt, "--task", "boolq", "--data", fixture("boolq.jsonl"), "--out",
            str(out)])
    assert json.load(open(out))["task"] == "boolq" and os.stat(out).st_mode & 0o777 == 0o640


def test_an_out_that_is_a_fifo_or_a_device_is_refused_not_replaced(tmp_path):
    """The report is renamed over --out: a FIFO (or, run as root, /dev/null) would be replaced
    by a file."""
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(SystemExit) as info:                  # before the missing checkpoint
        E.main(["--ckpt", str(tmp_path / "no-such-ckpt"), "--task", "piqa", "--data",
                fixture("piqa.jsonl"), "--out", str(tmp_path / "pipe")])
    assert info.value.code == (f"error: --out {tmp_path / 'pipe'} is not a regular file (a "
                               "device, a FIFO); give the name of a file to write the report to")
    assert os.path.exists(tmp_path / "pipe") and not os.path.isfile(tmp_path / "pipe")
