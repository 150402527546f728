"""
eval.py -- the LLaMA paper's benchmarks, scored as the paper and the public harness score them.

Multiple-choice tasks are scored by likelihood, not by generation [LLaMA §3]. Each choice is a
continuation of the example's context, written " " + choice (the harness's target delimiter);
its log-likelihood is the sum of log p(token) over the continuation's tokens, and the prediction
is the best choice under one of three rules:

    acc         argmax  log P(continuation | context)
    acc_norm    argmax  log P(continuation | context) / characters of the choice
    acc_answer  argmax  log P(continuation | context) - log P(continuation | "Answer:")

The paper uses acc_norm (Gao et al.'s: the characters of the choice as written, the delimiter's
space not counted) everywhere except OpenBookQA and BoolQ, where it uses acc_answer (after
GPT-3) [LLaMA §3]. WinoGrande uses partial evaluation: the option fills the blank and ends the
context, the rest of the sentence is the one continuation both options share (so acc is its only
rule). MMLU [LLaMA Table 9] is 5-shot multiple choice over the answer letters. Closed-book QA
(NaturalQuestions, TriviaQA) is greedy generation, cut at the first line break, dot or comma,
matched exactly after normalization [LLaMA App. A], 0- to 64-shot. Perplexity is measured on
held-out text or a token shard. Every accuracy and exact match comes with its standard error,
as the harness computes it: the hits' sample standard deviation (n - 1) over sqrt(n).

    python eval.py --ckpt llama/7B --task hellaswag --data hellaswag_val.jsonl --limit 500
    python eval.py --ckpt llama/7B --task nq --data NQ-open.dev.jsonl --shots 5 \\
                   --shots-from NQ-open.train.jsonl --out nq5.json
    python eval.py --ckpt llama/7B --task mmlu --data data/test --shots-from data/dev
    python eval.py --ckpt out/tiny --task perplexity --data heldout.txt
    python eval.py --ckpt llama/7B --task common_sense --data benchmarks/   # Table 3, one load
    python eval.py --ckpt llama/7B --task piqa,boolq --data piqa=valid.jsonl --data boolq=dev.jsonl

Reading map
  1. Tasks            one reader per benchmark writes its prompt; the table of tasks; the shots
  2. Scoring          context + continuation tokenized together, batched by length, one
                      forward per batch; the continuation's log-probabilities summed
  3. Multiple choice  the three rules; standard errors; MMLU's averages by subject and category
  4. Closed-book QA   greedy answers that stop at the paper's stop strings; exact match
  5. Perplexity       non-overlapping windows of max_seq_len tokens
  ------------------------------------------------------------------------------ (the banner)
  6. Task files       the file each task reads, in its original or Hugging Face layout
  7. Command line     several tasks in one run (each task's file), the flag rules, the --out
                      check, the report (one section per task, the table beside LLaMA-7B), main

Shape legend: B batch, T sequence, V vocab.

Papers: LLaMA [Touvron et al. 2023, §3, App. A]; EleutherAI's lm-evaluation-harness 0.4 [Gao et
al.]; MMLU [Hendrycks et al. 2021]; partial evaluation [Trinh and Le 2018]. The harness's
prompts, clean-ups and rules are kept string for string, except: OpenBookQA and BoolQ also get
acc_answer, as the paper says; QA prompts and answer normalization are the paper's (Figure 3,
SQuAD's rule), shots drawn per question; context and continuation split at their longest shared
token prefix, the harness's split whenever the joint tokens start with the context's.

What this file leaves out: the paper's own prompts for the multiple-choice tasks (unpublished;
the harness's are used); RACE, GSM8k, MATH, HumanEval and MBPP; tensor-parallel evaluation (the
model is loaded on one device).
"""

import argparse
import codecs
import contextlib
import csv
import io
import json
import math
import os
import random
import re
import string
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from statistics import fmean

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

import checkpoint as C
from cli import OneLineParser, Progress, check
from generate import device_of, generate_tokens, load_model
from model import plan_free_attention
from tokenizer import token_dtype


# ---------------------------------------------------------------------------------------------
# 1. Tasks: examples and their prompts
# ---------------------------------------------------------------------------------------------

@dataclass
class Example:
    contexts: list                # one per choice; all equal except in WinoGrande
    choices: list                 # the choices as written; each is scored as " " + choice
    label: int = -1               # index of the right choice (-1 for QA)
    answers: list = field(default_factory=list)   # closed-book QA: accepted answers
    question: str = ""            # QA and MMLU: the question alone, to follow the shots
    subject: str = ""             # MMLU

    @property
    def continuations(self) -> list:
        return [" " + c for c in self.choices]


# A reader turns one record of a task file into an Example with the task's prompt. Its `r` is a
# Record (section 6): r.text("goal") is the field "goal", refused by name unless it is a string.

def read_boolq(r) -> Example:
    passage = r.text("passage")
    # SuperGLUE's passages, which the harness scores, open with "TITLE -- "; BoolQ's dev.jsonl
    # keeps the title apart, so it is put back the same way (section 6).
    title = r.data.get("title")
    if isinstance(title, str) and not passage.startswith(f"{title} -- "):
        passage = f"{title} -- {passage}"
    ctx = f"{passage}\nQuestion: {r.text('question')}?\nAnswer:"
    return Example([ctx] * 2, ["no", "yes"], int(r.flag("label", "answer")))


def read_piqa(r) -> Example:
    ctx = f"Question: {r.text('goal')}\nAnswer:"
    return Example([ctx] * 2, [r.text("sol1"), r.text("sol2")], r.label("label", 2))


def read_siqa(r) -> Example:
    ctx = f"Q: {r.text('context')} {r.text('question')}\nA:"
    choices = [r.text(k) for k in ("answerA", "answerB", "answerC")]
    return Example([ctx] * 3, choices, r.label("label", 3, first=1))    # NOTE: 1-based labels


def hellaswag_clean(text: str) -> str:
    """The harness's clean-up of HellaSwag's WikiHow markup, rule for rule, in its order:

        "[header] How to dry hair [title] Towel it."  ->  " How to dry hair. Towel it."

    " [title]" (a space before it) becomes ". ", any other [tag] is deleted, and one pass turns
    each double space into one. NOTE: a "[title]" opening the text keeps the space after it, and
    one after a period leaves ".."; the harness scores those strings, so they are kept.
    """
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(r) -> Example:
    endings = r.texts("endings")
    # NOTE: str.capitalize() also lower-cases the rest of ctx_b, as the harness's does.
    ctx = f"{r.text('activity_label')}: {r.text('ctx_a')} {r.text('ctx_b').capitalize()}"
    return Example([hellaswag_clean(ctx)] * len(endings), [hellaswag_clean(e) for e in endings],
                   r.label("label", len(endings)))


def read_winogrande(r) -> Example:
    before, blank, after = r.text("sentence").partition("_")
    if not blank:
        raise BadRecord("field sentence has no blank '_'")
    # PAPER: partial evaluation: score the words after the blank given each filled-in start.
    return Example([before + r.text("option1"), before + r.text("option2")], [after.strip()] * 2,
                   r.label("answer", 2, first=1))


def read_arc(r) -> Example:
    question, choices, label = ai2_question(r)                 # AI2's layout or HF's (section 6)
    return Example([f"Question: {question}\nAnswer:"] * len(choices), choices, label)


def read_openbookqa(r) -> Example:
    question, choices, label = ai2_question(r)
    return Example([question] * len(choices), choices, label)   # the stem alone, as the harness


def read_nq(r) -> Example:
    question, answers = r.text("question"), r.texts("answer")
    if not answers:                     # scored a miss whatever the model says; no shot's answer
        raise BadRecord("field answer is an empty list; a question needs one answer or more")
    # PAPER: Figure 3 writes NQ's lower-case questions capitalized, with "?" [LLaMA App. A].
    question = question[:1].upper() + question[1:] + ("" if question.endswith("?") else "?")
    return Example([], [], answers=answers, question=question)


def read_triviaqa(r) -> Example:
    # The release's {Question, Answer {Value, Aliases}}; HF's {question, answer {value, aliases}}.
    answers = [r.text("Answer.Value", "answer.value")] + r.texts("Answer.Aliases", "answer.aliases")
    return Example([], [], answers=list(dict.fromkeys(answers)),
                   question=r.text("Question", "question"))


LETTERS = ["A", "B", "C", "D"]


def read_mmlu(r) -> Example:
    subject, choices, label = mmlu_question(r)                 # CSV's layout or HF's (section 6)
    block = "".join(f"\n{x}. {c}" for x, c in zip(LETTERS, choices))
    return Example([], LETTERS, label, question=f"{r.text('question').strip()}{block}\nAnswer:",
                   subject=subject)


def qa_prompt(question: str, shots: list) -> str:
    """The paper's closed-book QA prompt (its Figure 3, 1-shot):

        Answer these questions:
        Q: Who sang who wants to be a millionaire in high society?
        A: Frank Sinatra
        Q: Who wrote the book the origin of species?
        A:
    """
    solved = "".join(f"Q: {s.question}\nA: {s.answers[0]}\n" for s in shots)
    # PAPER: the header is prepended in every setting, 0-shot included [LLaMA App. A].
    return f"Answer these questions:\n{solved}Q: {question}\nA:"


def mmlu_prompt(e: Example, shots: list) -> str:
    """The standard MMLU prompt, the harness's string for string (Hendrycks et al.'s, with one
    space after "about"): a header, then each solved shot as "QUESTION\\nA. ..\\nD. ..\\nAnswer: B"
    and a blank line, then the question, ending in "Answer:"."""
    header = ("The following are multiple choice questions (with answers) about "
              f"{e.subject.replace('_', ' ')}.\n\n")
    return header + "".join(f"{s.question} {LETTERS[s.label]}\n\n" for s in shots) + e.question


@dataclass
class Task:
    read: object          # Record -> Example
    metric: str           # the rule the paper's table uses
    rules: tuple          # the rules reported
    llama_7b: dict        # shots -> LLaMA-7B's score in the paper
    table: str            # where the paper prints it
    fields: str           # the format, for error messages
    max_shots: int = 0    # None: any number


ALL_RULES, NORM = ("acc", "acc_norm", "acc_answer"), ("acc", "acc_norm")
AI2_FIELDS = ("question.stem + question.choices, or question (or question_stem) + "
              "choices.text/label; answerKey")
# PAPER: LLaMA-7B's scores [LLaMA Tables 3, 4, 5 (filtered dev set), 9].
TASKS = {
    "boolq": Task(read_boolq, "acc_answer", ALL_RULES, {0: 76.5}, "Table 3",
                  "passage, question, label or answer (true/false)"),
    "piqa": Task(read_piqa, "acc_norm", NORM, {0: 79.8}, "Table 3",
                 "goal, sol1, sol2, label (0-1) or a X-labels.lst beside X.jsonl"),
    "siqa": Task(read_siqa, "acc_norm", NORM, {0: 48.9}, "Table 3",
                 "context, question, answerA, answerB, answerC, label (1-3) or a X-labels.lst"),
    "hellaswag": Task(read_hellaswag, "acc_norm", NORM, {0: 76.1}, "Table 3",
                      "activity_label, ctx_a, ctx_b, endings (a list of strings), label"),
    "winogrande": Task(read_winogrande, "acc", ("acc",), {0: 70.1}, "Table 3",
                       "sentence (with one '_'), option1, option2, answer ('1' or '2')"),
    "arc_easy": Task(read_arc, "acc_norm", NORM, {0: 72.8}, "Table 3", AI2_FIELDS),
    "arc_challenge": Task(read_arc, "acc_norm", NORM, {0: 47.6}, "Table 3", AI2_FIELDS),
    "openbookqa": Task(read_openbookqa, "acc_answer", ALL_RULES, {0: 57.2}, "Table 3", AI2_FIELDS),
    "nq": Task(read_nq, "exact_match", (), {0: 16.8, 1: 18.7, 5: 22.0, 64: 26.1}, "Table 4",
               "question, answer (a list of strings)", max_shots=None),
    "triviaqa": Task(read_triviaqa, "exact_match", (), {0: 50.0, 1: 53.4, 5: 56.3, 64: 57.6},
                     "Table 5 (filtered dev set)", "Question + Answer {Value, Aliases}, or "
                     "question + answer {value, aliases}", max_shots=None),
    "mmlu": Task(read_mmlu, "acc", ("acc",), {5: 35.1}, "Table 9",
                 "question, subject, choices (4 strings), answer (A-D or 0-3); or CSV rows "
                 "question, A, B, C, D, answer in SUBJECT_test.csv", max_shots=5),
    "perplexity": Task(None, "perplexity", (), {}, "", "text, or a .npy/.bin token shard"),
}
MMLU_LLAMA_7B = {"humanities": 34.0, "stem": 30.5, "social_sciences": 38.3, "other": 38.1}
# PAPER: LLaMA-7B 5-shot by category [LLaMA Table 9]; the average, 35.1, is in TASKS.
ALIASES = {"nq_open": "nq", "trivia_qa": "triviaqa", "social_iqa": "siqa"}   # HF's names
# PAPER: Table 3's common-sense reasoning set, in the paper's column order.
SUITES = {"common_sense": ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy",
                           "arc_challenge", "openbookqa"]}
FEWSHOT_SEED = 1234     # the harness's; the paper does not say how its shots were drawn


def add_prompts(name: str, examples: list, pool: list, shots: int, same_file: bool = False):
    """Write the context of each QA or MMLU example: zero-shot, or `shots` solved examples of
    `pool` (the train / dev file) first. MMLU takes the first of the same subject, in file order
    (its dev split has 5 a subject); QA draws its own shots for each question, from one seeded
    generator as the harness does: `shots` of them from another file, and one more from the file
    scored (same_file), so that the question itself can be left out if drawn."""
    if name == "mmlu":
        dev = defaultdict(list)
        for s in pool or []:
            dev[s.subject].append(s)
        for e in examples:
            if len(dev[e.subject]) < shots:
                raise ValueError(f"--shots-from holds {len(dev[e.subject])} {e.subject} "
                                 f"questions; {shots}-shot needs {shots}: give MMLU's dev split")
            e.contexts = [mmlu_prompt(e, dev[e.subject][:shots])] * len(e.choices)
        return
    rng = random.Random(FEWSHOT_SEED)
    for e in examples:
        # NOTE: the number drawn moves the generator on: the harness's draws need the harness's.
        drawn = rng.sample(pool, min(shots + same_file, len(pool))) if shots else []
        solved = [s for s in drawn if s.question != e.question][:shots]
        if len(solved) < shots:
            raise ValueError(f"--shots-from holds {len(pool)} questions, too few for "
                             f"{shots}-shot prompts; give the task's train file")
        e.contexts = [qa_prompt(e.question, solved)]


# ---------------------------------------------------------------------------------------------
# 2. Scoring by log-likelihood
# ---------------------------------------------------------------------------------------------

def encode_pair(tok, context: str, continuation: str, max_seq_len=None):
    """(token ids of context + continuation, how many of the last ones are the continuation),
    the ids cut to max_seq_len + 1 if given (keep_end)."""
    # NOTE: the context's trailing spaces go with the continuation, as in the harness: a
    # SentencePiece piece carries the space before its word.
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    whole = tok.encode(context + continuation, bos=True)
    ctx = tok.encode(context, bos=True)
    n = len(whole) - len(os.path.commonprefix([ctx, whole]))    # commonprefix takes lists too
    if n == 0:
        raise ValueError(f"continuation {continuation!r} has no tokens of its own")
    return (whole, n) if max_seq_len is None else keep_end(whole, n, max_seq_len)


def keep_end(ids: list, n: int, max_seq_len: int) -> tuple:
    """An over-long sequence keeps its end: all of the continuation, the nearest context (the
    harness cuts on the left too; it warns, and so does loglikelihoods)."""
    ids = ids[-(max_seq_len + 1):]
    return ids, min(n, len(ids) - 1)


@torch.inference_mode()
def score_tokens(model, seqs: list, batch_size: int = 8, label: str = "scoring") -> list:
    """Sum of log p(token) over the last n tokens of each (ids, n) in seqs: one float each.

    One forward per batch of similar lengths, right-padded with token 0. Right padding needs no
    mask: a causal model never lets a position see the padding after it.
    """
    device = model.output.weight.device

    def score(batch: list) -> list:
        x = pad_sequence([torch.tensor(ids[:-1]) for ids, _ in batch], batch_first=True)  # (B, T)
        logits = model(x.to(device))                                           # (B, T, V)
        sums = []
        for row, (ids, n) in enumerate(batch):
            L = len(ids) - 1                         # position L - 1 predicts the last token
            logp = logits[row, L - n:L].log_softmax(-1)                        # (n, V)
            target = torch.tensor(ids[-n:], device=device)
            sums.append(logp.gather(-1, target[:, None]).sum())
        return torch.stack(sums).tolist()                                      # one sync a batch
    return by_length(score, seqs, batch_size, label, size=lambda seq: len(seq[0]))


def loglikelihoods(model, tok, pairs: list, batch_size: int = 8, label: str = "scoring") -> list:
    """log P(continuation | context) for each (context, continuation) pair."""
    unique = list(dict.fromkeys(pairs))     # PERF: identical pairs (BoolQ's "Answer:" ones) once
    seqs, L = [encode_pair(tok, c, x) for c, x in unique], model.args.max_seq_len
    warn_cut(label, sum(len(ids) > L + 1 for ids, _ in seqs), len(seqs), L)      # below the banner
    seqs = [keep_end(ids, n, L) for ids, n in seqs]
    score = dict(zip(unique, score_tokens(model, seqs, batch_size, label)))
    return [score[p] for p in pairs]


def by_length(run, items: list, batch_size: int, label: str, size=len) -> list:
    """run(batch) over batches of items of similar size, longest first, with a progress line on
    stderr; returns one result per item, in the items' order.
    PERF: sorted by length, not in file order, a batch pads little; the longest batch comes first,
    so that a batch too large for memory fails at once, not at the end."""
    order = sorted(range(len(items)), key=lambda i: -size(items[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    results, bar = [None] * len(items), Progress(label, len(batches))
    for k, batch in enumerate(batches, 1):
        for i, result in zip(batch, run([items[i] for i in batch])):
            results[i] = result
        bar.show(k, f"{k}/{len(batches)} {bar.seconds():.0f}s", final=k == len(batches))
    return results


# ---------------------------------------------------------------------------------------------
# 3. Multiple choice
# ---------------------------------------------------------------------------------------------

def choose(lls: list, choices: list, lls_answer=None) -> dict:
    """The choice each rule picks: acc, acc_norm and, given P(c | "Answer:"), acc_answer."""
    # PAPER: characters of the choice as written, the delimiter's space not counted [Gao et al.].
    # NOTE: np.argmax picks the first of equal scores, as max() would.
    picks = {"acc": int(np.argmax(lls)),
             "acc_norm": int(np.argmax([ll / len(c) for ll, c in zip(lls, choices)]))}
    if lls_answer is not None:
        picks["acc_answer"] = int(np.argmax([ll - u for ll, u in zip(lls, lls_answer)]))
    return picks


def evaluate_choices(model, tok, name: str, examples: list, batch_size: int = 8) -> dict:
    task = TASKS[name]
    # PERF: MMLU's four one-token letters share a context: one forward and four logits would do
    # (Hendrycks et al.'s way), a quarter of the work; every task takes the one general path.
    pairs = [(c, x) for e in examples for c, x in zip(e.contexts, e.continuations)]
    lls = iter(loglikelihoods(model, tok, pairs, batch_size, name))
    uncond = None
    if "acc_answer" in task.rules:
        uncond = iter(loglikelihoods(model, tok, [("Answer:", x) for _, x in pairs], batch_size,
                                     name + " | Answer:"))
    rows = []
    for i, e in enumerate(examples):
        ll = [next(lls) for _ in e.choices]
        ua = [next(uncond) for _ in e.choices] if uncond else None
        picks = {rule: pick for rule, pick in choose(ll, e.choices, ua).items()
                 if rule in task.rules}
        shared = all(c == e.contexts[0] for c in e.contexts)    # WinoGrande's differ
        rows.append(dict(index=i, **({"context": e.contexts[0]} if shared else
                                     {"contexts": e.contexts}),
                         choices=e.choices, loglik=ll, loglik_answer=ua, picks=picks,
                         label=e.label, **({"subject": e.subject} if e.subject else {})))
    hits = {rule: [row["picks"][rule] == row["label"] for row in rows] for rule in task.rules}
    metrics = {rule: fmean(h) for rule, h in hits.items()}
    stderr = {rule: mean_stderr(h) for rule, h in hits.items()}
    report = dict(metrics=metrics, stderr=stderr, paper_metric=task.metric,
                  paper_value=metrics[task.metric], paper_stderr=stderr[task.metric], examples=rows)
    if name == "mmlu":
        report.update(mmlu_averages(rows))
    return report


def mean_stderr(hits: list):
    """The standard error of an accuracy, as the harness computes it (its mean_stderr): the sample
    standard deviation of the 0/1 hits (divided by n - 1) over sqrt(n), which for an accuracy p
    is sqrt(p (1 - p) / (n - 1)); None for one example. OpenBookQA's 500 questions at 57.2%
    give 57.2 ± 2.2: a difference of two points between two models means little."""
    n = len(hits)
    if n < 2:
        return None
    mean = sum(hits) / n                # NOTE: the harness's order of operations, to the last bit
    return math.sqrt(sum((x - mean) ** 2 for x in hits) / (n - 1)) / math.sqrt(n)


def mmlu_averages(rows: list) -> dict:
    """Accuracy per subject, and per category, each over its questions (not a mean of subjects:
    Hendrycks et al.'s evaluate.py and the harness average this way), with standard errors.
    NOTE: the harness's error for a group pools its subjects' variances (pooled_sample_stderr),
    leaving out how far the subjects' means lie apart; here it is that of the group's questions."""
    right = defaultdict(list)
    for row in rows:
        right[row["subject"]].append(row["picks"]["acc"] == row["label"])
    categories = {category: [hit for s in subjects for hit in right.get(s, [])]
                  for category, subjects in MMLU_SUBJECTS.items()}
    categories = {c: hits for c, hits in categories.items() if hits}
    subjects = dict(sorted(right.items()))
    return dict(subjects={s: fmean(hits) for s, hits in subjects.items()},
                categories={c: fmean(hits) for c, hits in categories.items()},
                subjects_stderr={s: mean_stderr(hits) for s, hits in subjects.items()},
                categories_stderr={c: mean_stderr(hits) for c, hits in categories.items()})


# MMLU's 57 subjects by the category the paper's Table 16 puts them in (the harness's grouping).
MMLU_SUBJECTS = {
    "humanities": """formal_logic high_school_european_history high_school_us_history
        high_school_world_history international_law jurisprudence logical_fallacies
        moral_disputes moral_scenarios philosophy prehistory professional_law
        world_religions""".split(),
    "stem": """abstract_algebra anatomy astronomy college_biology college_chemistry
        college_computer_science college_mathematics college_physics computer_security
        conceptual_physics electrical_engineering elementary_mathematics high_school_biology
        high_school_chemistry high_school_computer_science high_school_mathematics
        high_school_physics high_school_statistics machine_learning""".split(),
    "social_sciences": """econometrics high_school_geography high_school_government_and_politics
        high_school_macroeconomics high_school_microeconomics high_school_psychology
        human_sexuality professional_psychology public_relations security_studies sociology
        us_foreign_policy""".split(),
    "other": """business_ethics clinical_knowledge college_medicine global_facts human_aging
        management marketing medical_genetics miscellaneous nutrition professional_accounting
        professional_medicine virology""".split(),
}


# ---------------------------------------------------------------------------------------------
# 4. Closed-book QA
# ---------------------------------------------------------------------------------------------

QA_STOPS = ("\n", ".", ",")   # PAPER: "first line break, final dot or comma" [LLaMA App. A]


def extract_answer(generation: str) -> str:
    """The answer in a generation: the text before its first stop string, spaces stripped.
    NOTE: any dot stops, as in the harness: "St. Louis" answers "St"."""
    ends = [generation.find(s) for s in QA_STOPS if s in generation]
    return generation[:min(ends, default=len(generation))].strip()


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's exact-match rule)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    # NOTE: articles as SQuAD finds them, between word boundaries: "“the" (a curly quote is no
    # ASCII punctuation) loses its "the" as it does there.
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


class AllStopped(Exception):
    """Raised by greedy_generations' watcher to end generate_tokens' loop early."""


def greedy_generations(model, tok, prompts: list, max_new_tokens: int) -> list:
    """Greedy text after each prompt (token ids); decoding stops as soon as every row has
    produced a stop string or EOS, not after max_new_tokens."""
    new, stopped = [[] for _ in prompts], [False] * len(prompts)

    def watch(tokens):                       # generate_tokens' on_token: one step's new tokens
        for i, t in enumerate(tokens):
            if t is not None and not stopped[i]:
                new[i].append(t)
                stopped[i] = t == tok.eos_id or any(s in tok.decode(new[i]) for s in QA_STOPS)
        if all(stopped):
            raise AllStopped          # PERF: a batch ends with its last answer
    with contextlib.suppress(AllStopped):
        generate_tokens(model, prompts, max_new_tokens, temperature=0.0, eos_id=tok.eos_id,
                        on_token=watch)
    return [tok.decode([t for t in ids if t != tok.eos_id]) for ids in new]


def evaluate_qa(model, tok, examples: list, batch_size: int = 8, max_new_tokens: int = 24):
    prompts = [tok.encode(e.contexts[0], bos=True) for e in examples]
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    if len(prompts[longest]) + max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"example {longest + 1}'s prompt is {len(prompts[longest])} tokens; with "
                         f"--max-new-tokens {max_new_tokens} it exceeds the model's max_seq_len "
                         f"{model.args.max_seq_len}: use fewer --shots or new tokens")
    # PERF: prompts of similar length share a batch, so that few steps only read prompt tokens.
    generations = by_length(lambda batch: greedy_generations(model, tok, batch, max_new_tokens),
                            prompts, batch_size, "answering")
    rows = []
    for i, (e, generation) in enumerate(zip(examples, generations)):
        pred = extract_answer(generation)
        match = any(normalize_answer(pred) == normalize_answer(a) for a in e.answers)
        rows.append(dict(index=i, prompt=e.contexts[0], generation=generation, prediction=pred,
                         answers=e.answers, exact_match=match))
    em, se = fmean(r["exact_match"] for r in rows), mean_stderr([r["exact_match"] for r in rows])
    return dict(metrics={"exact_match": em}, stderr={"exact_match": se},
                paper_metric="exact_match", paper_value=em, paper_stderr=se, examples=rows)


# ---------------------------------------------------------------------------------------------
# 5. Perplexity
# ---------------------------------------------------------------------------------------------

def evaluate_perplexity(model, tok, path: str, batch_size: int = 8, limit=None) -> dict:
    """exp(mean negative log-likelihood per token) over non-overlapping windows.

    Window i holds tokens [i L, (i + 1) L] (L + 1 tokens; the first is context only), so every
    token after the first is predicted exactly once. NOTE: the first tokens of each window see
    little context, which makes this a little higher than a sliding-window perplexity.
    """
    ids, n_bytes = read_tokens(path, tok)                # (N,) ids; the text's bytes, if text
    L = model.args.max_seq_len
    starts = list(range(0, len(ids) - 1, L))[:limit]
    seqs = [(ids[s:s + L + 1].tolist(), len(ids[s:s + L + 1]) - 1) for s in starts]
    lls = score_tokens(model, seqs, batch_size, "perplexity")
    n_tokens = sum(n for _, n in seqs)
    nll = -sum(lls) / n_tokens
    metrics = {"perplexity": math.exp(nll), "nll_per_token": nll, "tokens": n_tokens}
    if n_bytes is not None and n_tokens == len(ids) - 1:       # the whole text was scored
        metrics["bits_per_byte"] = -sum(lls) / math.log(2) / n_bytes
    return dict(metrics=metrics, stderr={}, paper_metric="perplexity",
                paper_value=metrics["perplexity"], paper_stderr=None,
                examples=[dict(index=i, start=s, tokens=n, loglik=ll)
                          for i, (s, (_, n), ll) in enumerate(zip(starts, seqs, lls))])


# =============================================================================================
# Below: what running it on real files needs -- the task files in their two layouts, checked
# record by record, and the command line: flag rules, the --out check, the printed report.
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# 6. Task files
# ---------------------------------------------------------------------------------------------
# Files each task reads, in the original release's layout or in that of the Hugging Face dataset
# exported to JSON lines (`datasets.load_dataset(NAME, CONFIG)[SPLIT].to_json("x.jsonl")`); the
# layout is recognized record by record. --shots-from names the file the shots are drawn from.
#
#   boolq       BoolQ dev.jsonl (title, passage, question, answer) or SuperGLUE BoolQ
#               val.jsonl (passage "TITLE -- ...", question, label): the harness's prompts
#               HF super_glue boolq, validation: the same with label 0|1. NOTE: HF google/boolq
#               (question, answer, passage) carries no titles, so its prompts are not the harness's
#   piqa        PIQA valid.jsonl: goal, sol1, sol2; labels in valid-labels.lst beside it
#               HF piqa, validation: the same with label 0|1
#   siqa        Social IQa dev.jsonl: context, question, answerA..C; dev-labels.lst (1..3)
#               HF allenai/social_i_qa, validation: the same with label "1".."3"
#   hellaswag   hellaswag_val.jsonl: activity_label, ctx_a, ctx_b, endings [4], label
#               HF Rowan/hellaswag, validation: the same with label "0".."3"
#   winogrande  WinoGrande 1.1 dev.jsonl: sentence (one "_"), option1, option2, answer "1"|"2"
#               HF allenai/winogrande winogrande_xl, validation: the same
#   arc_easy,   ARC-V1-Feb2018 ARC-{Easy,Challenge}-Test.jsonl:
#   arc_challenge question {stem, choices [{text, label}]}, answerKey
#               HF allenai/ai2_arc, test: question, choices {text [..], label [..]}, answerKey
#   openbookqa  OpenBookQA-V1-Sep2018 Data/Main/test.jsonl: as ARC
#               HF allenai/openbookqa main, test: question_stem, choices, answerKey
#   nq          NQ-open.dev.jsonl (3610 questions): question, answer [..]
#               HF google-research-datasets/nq_open, validation: the same
#   triviaqa    TriviaQA qa/wikipedia-dev.json or web-dev.json: {"Data": [{Question,
#               Answer {Value, Aliases}}]}, or such records one a line
#               HF mandarjoshi/trivia_qa rc.nocontext, validation: question, answer {value,
#               aliases}. NOTE: the paper says "filtered dev set" and no more.
#   mmlu        Hendrycks et al.'s data/test (data/dev for the shots): SUBJECT_test.csv, rows of
#               question, A, B, C, D, answer letter
#               HF cais/mmlu all, test (dev for the shots): question, subject, choices [4],
#               answer 0..3
#   perplexity  UTF-8 text, or a token shard (.npy, or .bin of uint16 / uint32 ids)

class BadRecord(ValueError):
    """A field of one record is missing or malformed; read_task adds the file, line, format."""


def kind(value) -> str:
    """What a JSON value is, in words, for error messages."""
    names = {str: "a string", list: "a list", dict: "an object", bool: "true/false",
             type(None): "null"}
    return names.get(type(value), "a number")


class Record:
    """One record of a task file (a JSON object, or a CSV row made into one) with typed getters
    that refuse a wrong type by the field's name. A dotted name reaches inside: "question.stem"."""

    def __init__(self, data: dict):
        self.data = data

    def get(self, *names):
        """(name, value) of the first of `names` present."""
        for name in names:
            value = self.data
            for part in name.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value is not None:
                return name, value
        raise BadRecord(f"missing field {' or '.join(names)}")

    def text(self, *names) -> str:
        name, value = self.get(*names)
        if not isinstance(value, str):
            raise BadRecord(f"field {name} must be a string, not {kind(value)}")
        return value

    def texts(self, *names) -> list:
        name, value = self.get(*names)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadRecord(f"field {name} must be a list of strings, not {kind(value)}")
        return value

    def flag(self, *names) -> bool:
        """JSON true/false, or 1/0; not a string, where "false" would read as true."""
        name, value = self.get(*names)
        if isinstance(value, bool) or value in (0, 1) and isinstance(value, int):
            return bool(value)
        raise BadRecord(f"field {name} is {value!r}; it must be true or false (or 1 or 0)")

    def label(self, name: str, count: int, first: int = 0) -> int:
        """An index, written as a number or a string of digits, from `first` on; 0-based."""
        name, value = self.get(name)
        number = int(value) if isinstance(value, str) and value.strip().isdigit() else value
        # NOTE: type(), not isinstance(): bool is a subclass of int, and True is not a label.
        if type(number) is not int or not first <= number < first + count:
            raise BadRecord(f"field {name} is {value!r}; it must be a number from {first} to "
                            f"{first + count - 1}")
        return number - first


def ai2_question(r: Record) -> tuple:
    """(question, choice texts, label) of ARC or OpenBookQA, in AI2's layout or Hugging Face's."""
    layout, choices = r.get("question.choices", "choices")
    if layout == "question.choices":           # AI2: {question: {stem, choices: [{text, label}]}}
        question = r.text("question.stem")
        if not isinstance(choices, list) or not all(
                isinstance(c, dict) and isinstance(c.get("text"), str)
                and isinstance(c.get("label"), str) for c in choices):
            raise BadRecord("field question.choices must be a list of {text, label} strings")
        texts, keys = [c["text"] for c in choices], [c["label"] for c in choices]
    else:                                         # HF: {question, choices: {text: [], label: []}}
        question = r.text("question_stem", "question")
        texts, keys = r.texts("choices.text"), r.texts("choices.label")
    key = r.text("answerKey").strip()
    if len(texts) != len(keys):
        raise BadRecord(f"field choices holds {len(texts)} texts but {len(keys)} labels")
    if key not in keys:
        raise BadRecord(f"field answerKey is {key!r}, not one of the choices' labels {keys}")
    return question, texts, keys.index(key)


def mmlu_question(r: Record) -> tuple:
    """(subject, the 4 choices, label) of an MMLU row: the answer a letter (the CSV files) or an
    index (Hugging Face's), the subject one of the 57."""
    subject = r.text("subject")
    if not any(subject in subjects for subjects in MMLU_SUBJECTS.values()):
        raise BadRecord(f"field subject is {subject!r}, not one of MMLU's 57 (eval.MMLU_SUBJECTS)")
    choices = r.texts("choices")
    if len(choices) != 4:
        raise BadRecord(f"field choices holds {len(choices)} strings, not 4")
    _, answer = r.get("answer")
    # NOTE: type(), as Record.label: True is no index, and 2.0 (a CSV column with a gap) is in
    # range(4) but no list index.
    if answer not in LETTERS and (type(answer) is not int or answer not in range(4)):
        raise BadRecord(f"field answer is {answer!r}; it must be a letter A-D or an index 0-3")
    return subject, choices, LETTERS.index(answer) if answer in LETTERS else answer


def decode(raw: bytes, path: str, first_line: int = 1) -> str:
    """UTF-8 bytes -> str, or a one-line error that says where the first bad byte is."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw[:e.start].count(b"\n")
        column = e.start - raw.rfind(b"\n", 0, e.start)            # 1-based byte in its line
        raise ValueError(f"{path} line {line} is not UTF-8 ({e.reason}, byte {column} of the "
                         "line); re-download the file or convert it to UTF-8") from None


def records(path: str):
    """(where, record) for each record of a task file: JSON lines; one JSON document (a list, or
    TriviaQA's {"Data": [...]}); an MMLU CSV (question, A, B, C, D, answer), or a folder of them."""
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".csv"))
        if not files:
            raise FileNotFoundError(f"folder {path} holds no .csv files; for MMLU give the "
                                    "folder of *_test.csv (data/test) or *_dev.csv (data/dev)")
        for name in files:
            yield from records(os.path.join(path, name))
        return
    raw = read_task_file(path)
    if path.endswith(".csv"):            # NOTE: a CSV is MMLU's; its name holds the subject
        subject = re.sub(r"_(test|dev|val)\.csv$", "", os.path.basename(path))
        for n, row in enumerate(csv.reader(io.StringIO(decode(raw, path))), 1):
            if len(row) != 6:
                raise ValueError(f"{path} row {n} has {len(row)} columns, not 6 (question, A, B, "
                                 "C, D, answer); is it one of MMLU's CSV files?")
            yield f"{path} row {n}", dict(question=row[0], choices=row[1:5], answer=row[5],
                                          subject=subject)
    elif path.endswith(".json"):
        try:
            data = json.loads(decode(raw, path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {e.lineno} is not valid JSON ({e.msg})") from None
        items = data.get("Data") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ValueError(f"{path} holds neither a list of records nor TriviaQA's "
                             '{"Data": [...]}; give the task file itself')
        for n, item in enumerate(items, 1):
            yield f"{path} record {n}", item
    else:
        for n, line in enumerate(raw.split(b"\n"), 1):
            if line.strip():
                try:
                    yield f"{path} line {n}", json.loads(decode(line, path, n))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n} is not valid JSON ({e.msg}); expect one "
                                     "object per line") from None


def read_task_file(path: str, what: str = "task file",
                   advice: str = "split it into smaller files") -> bytes:
    """A file's bytes, read with checkpoint.read_file's bound, its UTF-8 byte-order mark (which
    Windows editors write) dropped: it is no text."""
    return C.read_file(path, what=what, advice=advice).removeprefix(codecs.BOM_UTF8)


def read_task(name: str, path: str, limit=None) -> list:
    """A benchmark file -> Examples (MMLU: `limit` of each subject), or a one-line error naming
    the file, the line or record, and the field."""
    task = TASKS[name]
    if not os.path.exists(path):
        raise FileNotFoundError(f"task file {path} does not exist; eval.py's section 6 names "
                                f"which {name} file to download")
    if os.path.isdir(path) and name != "mmlu":      # only MMLU's CSV files come in a folder
        raise ValueError(f"task file {path} is a folder; give {name}'s file itself (eval.py's "
                         "section 6 names it)")
    labels_path = os.path.splitext(path)[0] + "-labels.lst"
    labels = (decode(read_task_file(labels_path), labels_path).split()  # PIQA's, SIQA's side file
              if os.path.isfile(labels_path) else None)
    examples, per_subject = [], Counter()
    for where, record in records(path):
        if limit is not None and name != "mmlu" and len(examples) >= limit:
            break                                # the first `limit` examples
        if not isinstance(record, dict):
            raise ValueError(f"{where} is {kind(record)}, not a {name} object")
        if labels is not None and "label" not in record:
            if len(examples) >= len(labels):
                raise ValueError(f"{labels_path} holds {len(labels)} labels, fewer than the "
                                 f"records of {path}; use the labels file of the same split")
            record["label"] = labels[len(examples)]
        try:
            e = task.read(Record(record))
        except BadRecord as err:
            raise ValueError(f"{where}: {err}; {name} records need {task.fields}") from None
        if not all(e.choices):
            raise ValueError(f"{where}: choice {e.choices.index('')} is empty after the task's "
                             "clean-up; fix or remove the record")
        if task.metric != "exact_match" and len(e.choices) < 2:
            raise ValueError(f"{where} has {len(e.choices)} choice(s): a multiple-choice record "
                             "needs 2 or more, or it is scored right whatever the model does; fix "
                             "or remove the record")
        if limit is not None and per_subject[e.subject] >= limit:
            continue                             # MMLU: the first `limit` of each subject
        per_subject[e.subject] += 1
        examples.append(e)
    if not examples:
        raise ValueError(f"{path} holds no {name} examples")
    return examples


def read_text(path: str) -> str:
    """A text to measure perplexity on: UTF-8, not empty."""
    text = decode(read_task_file(path, "data file", "give a .bin token shard of it (python "
                                 "data.py prepare) instead"), path)
    if not text.strip():
        raise ValueError(f"{path} holds no text to score; give a text file, or a .npy/.bin "
                         "token shard")
    return text


def read_tokens(path: str, tok) -> tuple:
    """(1-D array of token ids, bytes of text or None): a .npy / .bin shard, else UTF-8 text.
    tok None: the file checked before the model and its tokenizer are loaded, all but the ids'
    range (a .bin is read as the narrowest ids data.py writes; a text is not encoded)."""
    if not path.endswith((".npy", ".bin")):
        text = read_text(path)
        ids = np.array(tok.encode(text, bos=True)) if tok else None
        return ids, len(text.encode("utf-8"))
    C.regular_file(path, "data file")              # mapped, not read: any size
    try:
        if path.endswith(".npy"):
            ids = np.load(path, mmap_mode="r", allow_pickle=False)
        else:                    # NOTE: raw ids, as data.py and nanoGPT write them
            ids = np.memmap(path, mode="r", dtype=token_dtype(tok.n_words if tok else 2))
    except ValueError as e:      # numpy's words: not an array, empty, a size of no whole ids
        raise ValueError(f"{path} is not a token shard ({str(e).splitlines()[0]}); give a 1-D "
                         ".npy array, or a .bin of ids as data.py writes them") from None
    below = f" below the tokenizer's {tok.n_words}" if tok else ""
    if (ids.ndim != 1 or ids.dtype.kind not in "iu" or len(ids) < 2 or int(ids.min()) < 0
            or (tok and int(ids.max()) >= tok.n_words)):
        raise ValueError(f"{path} must be a 1-D array of at least 2 token ids (whole numbers, 0 "
                         f"or more){below}; was it prepared with another tokenizer?")
    return ids, None


# ---------------------------------------------------------------------------------------------
# 7. Command line
# ---------------------------------------------------------------------------------------------
# One run scores one task or several (--task piqa,boolq or a suite of SUITES) with one model
# load. Each task becomes a job: the flags of a one-task run, with that task's own --data and
# --shots-from, so that the same checks, readers and report serve one task and several.

def task_name(word: str) -> str:
    """A task's name as typed -> ours: any case, '-' for '_', HF's names (ALIASES) too."""
    key = word.strip().lower().replace("-", "_")
    return ALIASES.get(key, key)


def task_names(spec: str) -> list:
    """--task -> task names: one, several joined by commas, or a suite of SUITES."""
    return [n for word in spec.split(",") for n in SUITES.get(task_name(word), [task_name(word)])]


def per_task(values: list, names: list, flag: str) -> tuple:
    """--data or --shots-from values -> ({task: path} of those written TASK=PATH, [the others])."""
    given, bare = {}, []
    for value in values or []:
        key, eq, path = value.partition("=")
        name = task_name(key)
        if not eq or name not in TASKS:
            bare.append(value)                           # a path, perhaps with a '=' of its own
        elif name not in names:
            raise ValueError(f"{flag} {value}: {name} is not among --task {', '.join(names)}")
        elif name in given:
            raise ValueError(f"{flag} gives {name} twice; give one file a task")
        else:
            given[name] = path
    return given, bare


def in_folder(folder: str, name: str) -> str:
    """A task's file in a --data folder: NAME.jsonl, NAME.json, or (MMLU's CSV files) NAME/."""
    for path in (os.path.join(folder, name + ext) for ext in (".jsonl", ".json", "")):
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"--data {folder} is a folder without {name}.jsonl or {name}.json; "
                            f"give {name}'s file (eval.py's section 6 names it), or put it there "
                            "under that name")


def jobs_of(a) -> list:
    """One namespace per task: the flags of a one-task run, its own data, shots and shots file;
    each checked (check_args)."""
    names = task_names(a.task)
    for name in names:
        check([(name in TASKS, f"unknown task {name!r}; choose one of {', '.join(TASKS)}, or "
                               f"the suite {', '.join(SUITES)} (the paper's Table 3)"),
               (names.count(name) == 1, f"--task names {name} twice; score each task once")])
    data, bare = per_task(a.data, names, "--data")
    rest = [name for name in names if name not in data]
    folder = bare and os.path.isdir(bare[0]) and names != ["mmlu"]     # MMLU's: its CSV files
    check([(len(bare) <= 1, f"--data: give one file (or one folder of TASK.jsonl files), and "
                            f"TASK=FILE for the others; got {len(bare)} paths without a task"),
           (rest or not bare, f"--data {bare[0] if bare else ''}: every task has its file "
                              "already; leave it out"),
           (bare or not rest, f"--data: give a file for each task as TASK=FILE, or a folder "
                              f"holding TASK.jsonl files; {rest[0] if rest else ''} has none"),
           (folder or len(names) == 1 or not bare, f"--data {bare[0] if bare else ''} is not a "
            "folder: with several tasks give TASK=FILE for each, or a folder holding TASK.jsonl "
            "files")])
    for name in rest:                        # a folder holds the files of the tasks not named
        data[name] = in_folder(bare[0], name) if folder else bare[0]
    few = [n for n in names if TASKS[n].max_shots != 0]          # QA and MMLU
    shots_from, bare = per_task(a.shots_from, names, "--shots-from")
    check([(len(bare) <= 1 and (not bare or len(few) <= 1), "--shots-from: with several few-shot "
            f"tasks ({', '.join(few)}) give TASK=FILE for each")])
    if bare:
        shots_from[(few or names)[0]] = bare[0]
    jobs = []
    for name in names:
        # A zero-shot task beside few-shot ones stays zero-shot; alone, its --shots is refused.
        typed = a.shots if name in few or not few else None
        shots = typed if typed is not None else 5 if name == "mmlu" else 0
        jobs.append(argparse.Namespace(**{**vars(a), "task": name, "data": data[name],
                                          "shots": shots, "shots_typed": typed is not None,
                                          "shots_from": shots_from.get(name)}))
        check_args(jobs[-1])
    return jobs


def check_args(a):
    """Every flag of a task's job against its range, before a file is read; ValueError says what
    to do."""
    name, most = a.task, TASKS[a.task].max_shots            # shots: None for any number
    needs_shots = (f"--shots {a.shots} needs --shots-from, the file the solved examples come "
                   "from (a QA train file, or MMLU's dev split)" if a.shots_typed else
                   f"{name} is {a.shots}-shot by default, as in the paper: give --shots-from "
                   "with MMLU's dev split (data/dev), or --shots 0")
    zero_shot = " (zero-shot in the paper)" if TASKS[name].read else ""     # perplexity: none
    reads_no_shots = ("--shots-from is read only for few-shot prompts: give --shots N too"
                      if most != 0 else f"--shots-from: {name} reads no shots{zero_shot}; leave it "
                      "out")
    check([                                # (what must hold, the one-line refusal)
        (a.batch_size >= 1,
         f"--batch-size {a.batch_size}: give at least 1 (sequences per forward)"),
        (a.limit is None or a.limit >= 1,
         f"--limit {a.limit}: give at least 1 example, or leave it out for all"),
        (a.max_new_tokens >= 1, f"--max-new-tokens {a.max_new_tokens}: give at least 1 (an "
                                "answer's length in tokens, 24 by default)"),
        (a.shots >= 0, f"--shots {a.shots}: give 0 or more solved examples (the paper: 0, 1, 5, "
                       "64 for QA, 5 for MMLU)"),
        (most != 0 or a.shots == 0, f"--shots {a.shots}: {name} is zero-shot in the paper; "
                                    "few-shot prompts are for nq, triviaqa and mmlu"),
        (name != "mmlu" or a.shots <= most,
         f"--shots {a.shots}: MMLU's dev split has 5 questions a subject; give 0 to 5"),
        (a.shots == 0 or a.shots_from is not None, needs_shots),
        (a.shots != 0 or a.shots_from is None, reads_no_shots),
    ])


def check_output(a, jobs: list):
    """Check --out before any work: a file name in a folder we can write to, which is none of
    the files the evaluation reads. The report is written at the end (checkpoint.write_atomic),
    so a run that fails leaves an earlier report as it was."""
    path = a.out
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    check([(path.strip() != "", f"--out {path!r} names no file; give a file name such as "
                                "report.json, or leave --out out to print the report only")])
    reads = [(flag, p) for j in jobs for flag, p in (
        ("--data", j.data), ("--data", os.path.splitext(j.data)[0] + "-labels.lst"),
        ("--shots-from", j.shots_from))]
    C.check_outputs([("--out", path)], reads + C.checkpoint_paths("--ckpt", a.ckpt))
    check([(os.path.isfile(path) or os.path.isdir(path) or not os.path.exists(path),
            f"--out {path} is not a regular file (a device, a FIFO); give the name of a file to "
            "write the report to"),
           (not os.path.isdir(path), f"--out {path} is a folder; give a file name such as "
                                     f"{os.path.join(path, 'report.json')}"),
           (os.path.isdir(folder), f"--out {path}: {folder} is not a folder; create it, or "
                                   "choose another place")])
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".eval-", suffix=".json")
    except OSError as e:
        raise ValueError(f"--out {path}: cannot write in {folder} ({e.strerror}); choose "
                         "another place") from None
    os.close(fd)
    os.remove(tmp)


def warn_cut(label: str, cut: int, total: int, max_seq_len: int):
    """One line on stderr when contexts lost tokens on the left (the harness warns too)."""
    if cut:
        print(f"warning: {label}: {cut} of {total} sequences are longer than the model's "
              f"max_seq_len {max_seq_len}; their contexts were cut on the left, so they score "
              "shorter prompts", file=sys.stderr)


def read_examples(job) -> list:
    """The task's examples with their prompts, read before the model: a malformed file fails in
    a second, not a minute. Perplexity: its text or token shard checked (read_tokens)."""
    if job.task == "perplexity":
        read_tokens(job.data, None)                       # read again once a tokenizer is
        return None
    examples = read_task(job.task, job.data, job.limit)
    if TASKS[job.task].max_shots != 0:                 # QA and MMLU: the prompts
        pool = read_task(job.task, job.shots_from) if job.shots else None
        same = bool(job.shots) and os.path.realpath(job.shots_from) == os.path.realpath(job.data)
        add_prompts(job.task, examples, pool, job.shots, same_file=same)
    return examples


def run_task(model, tok, job, examples) -> dict:
    """One task scored and its report printed: the report as eval.py --task NAME --out writes
    it."""
    name, t0 = job.task, time.perf_counter()
    if name == "perplexity":
        report = evaluate_perplexity(model, tok, job.data, job.batch_size, job.limit)
    elif TASKS[name].metric == "exact_match":
        report = evaluate_qa(model, tok, examples, job.batch_size, job.max_new_tokens)
    else:
        report = evaluate_choices(model, tok, name, examples, job.batch_size)
    seconds, n = time.perf_counter() - t0, len(report["examples"])
    report = dict(task=name, ckpt=job.ckpt, data=job.data, shots=job.shots,
                  shots_from=job.shots_from, n=n, paper_rule=RULES[report["paper_metric"]],
                  llama_7b_paper=TASKS[name].llama_7b.get(job.shots), seconds=seconds,
                  examples_per_s=n / seconds, **report)
    if name == "mmlu":
        report["llama_7b_categories"] = MMLU_LLAMA_7B if job.shots == 5 else None
    print_report(report)
    return report


RULES = {   # what each metric means, in words, written into every report and printed
    "acc": "argmax log P(continuation | context)",
    "acc_norm": "argmax log P(continuation | context) / characters of the choice",
    "acc_answer": "argmax P(continuation | context) / P(continuation | 'Answer:')",
    "exact_match": "greedy answer, cut at the first line break, dot or comma, == a gold answer "
                   "after SQuAD normalization",
    "perplexity": "exp(mean negative log-likelihood per token)",
}


def plus_minus(value: float, se, scale: float = 1.0, digits: int = 4) -> str:
    """'0.6667 ± 0.3333': a score and its standard error, N/A for one example (the harness's)."""
    se = "N/A" if se is None else f"{scale * se:.{digits}f}"
    return f"{scale * value:.{digits}f} ± {se}"


def print_report(report: dict):
    """The metrics with their standard errors; MMLU's subjects and categories; the paper's rule
    and LLaMA-7B's number.

    The JSON report (--out) holds these, the time taken, and per example, in choice order: the
    context(s), the choices, every choice's log-likelihood (and after "Answer:" where that rule
    applies), the pick of each rule, the label; for QA the prompt, the generation, the answer.
    """
    name, shots, metric, se = (report["task"], report["shots"], report["paper_metric"],
                               report["stderr"])
    scores = "  ".join(f"{k} {plus_minus(v, se[k])}" if k in se else
                       f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in report["metrics"].items())
    print(f"{name}{f' {shots}-shot' if shots else ''} ({report['n']} examples): {scores}")
    if name == "mmlu":                     # each subject, then each category beside the paper's
        paper = report.get("llama_7b_categories") or {}
        errors = {**report["subjects_stderr"], **report["categories_stderr"]}
        for group, acc in {**report["subjects"], **report["categories"]}.items():
            beside = f"   LLaMA-7B {paper[group]}" if group in paper else ""
            print(f"  {group:<40} {plus_minus(acc, errors[group], 100, 1):>12}{beside}")
    if name != "perplexity":
        paper = report["llama_7b_paper"]
        paper = f"LLaMA-7B {paper}" if paper is not None else f"no {shots}-shot LLaMA-7B number"
        print(f"the paper's {TASKS[name].table} uses {metric} ({RULES[metric]}): ours "
              f"{plus_minus(report['paper_value'], report['paper_stderr'], 100, 1)}, {paper}")
    print(f"{report['n']} examples in {report['seconds']:.1f} s "
          f"({report['examples_per_s']:.1f} examples/s)")


def suite_report(a, reports: list) -> dict:
    """One report for several tasks: the table, then a section per task, each as a one-task
    run writes it."""
    table = [dict(task=r["task"], shots=r["shots"], n=r["n"], metric=r["paper_metric"],
                  ours=r["paper_value"], stderr=r["paper_stderr"], llama_7b=r["llama_7b_paper"])
             for r in reports]
    seconds = sum(r["seconds"] for r in reports)
    return dict(ckpt=a.ckpt, task=a.task, seconds=seconds, table=table,
                tasks={r["task"]: r for r in reports})


def print_table(report: dict):
    """Each task's paper metric beside LLaMA-7B's number [LLaMA Tables 3, 4, 5, 9]."""
    print(f"\n{'task':<16}{'examples':>8}  {'metric':<12}{'ours':>13}  LLaMA-7B")
    for row in report["table"]:
        task = f"{row['task']} {row['shots']}-shot" if row["shots"] else row["task"]
        ours = (f"{row['ours']:.2f}" if row["metric"] == "perplexity" else
                plus_minus(row["ours"], row["stderr"], 100, 1))
        paper = "-" if row["llama_7b"] is None else row["llama_7b"]
        print(f"{task:<16}{row['n']:>8}  {row['metric']:<12}{ours:>13}  {paper}")
    print(f"{len(report['table'])} tasks in {report['seconds']:.1f} s, the model loaded once")


def write_report(path: str, report: dict):
    """The JSON report, written whole or not at all; a failure (a full disk) is one line that
    says the scores printed above are complete."""
    try:
        C.write_atomic(path, json.dumps(report, indent=1))
    except OSError as e:
        raise OSError(f"the scores above are complete, but the report could not be written to "
                      f"{path} ({e.strerror or e}); free some space or choose another --out, "
                      "and run again to keep it") from None


def main(argv=None):
    p = OneLineParser(prog="eval.py", status=1,       # status 1: as every other refusal here
                      description="LLaMA's benchmarks, scored as the paper and the harness do.")
    p.add_argument("--ckpt", required=True, help="checkpoint folder (ours, Meta's or HF's)")
    p.add_argument("--task", required=True, help=f"{', '.join(TASKS)}; several joined by commas; "
                   f"or {', '.join(SUITES)} (the paper's Table 3)")
    p.add_argument("--data", required=True, action="append",
                   help="the task's file (eval.py's section 6 lists them); with several tasks "
                        "TASK=FILE for each, or a folder holding TASK.jsonl files")
    p.add_argument("--limit", type=int,
                   help="only the first N examples of each task (MMLU: of each subject)")
    p.add_argument("--shots", type=int, help="solved examples before each question: QA 0 "
                   "(default), 1, 5, 64; MMLU 5 (default)")
    p.add_argument("--shots-from", action="append",
                   help="file the shots come from: QA train, MMLU dev (TASK=FILE for several)")
    p.add_argument("--out", help="write the JSON report here; default: printed only")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward; default 8")
    p.add_argument("--max-new-tokens", type=int, default=24,
                   help="closed-book QA answers; default 24")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default cuda if there is one, else cpu")
    a = p.parse_args(argv)
    try:
        device_of(a.device)
        jobs = jobs_of(a)
        check_output(a, jobs)
        examples = [read_examples(job) for job in jobs]          # every file before the model
        model, tok = load_model(a.ckpt, a.device)
        plan_free_attention()             # PERF: batches of every length (model.py)
        reports = [run_task(model, tok, job, task_examples)            # each printed
                   for job, task_examples in zip(jobs, examples)]
        report = reports[0] if len(reports) == 1 else suite_report(a, reports)
        if len(reports) > 1:
            print_table(report)
        if a.out:
            write_report(a.out, report)
        return report
    except (ValueError, OSError) as e:      # OSError: a missing or unreadable file, a full disk
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
