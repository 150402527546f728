"""
eval.py -- the LLaMA paper's zero-shot benchmarks, scored the way the paper scored them.

Multiple-choice tasks are scored by likelihood, not by generation [LLaMA §3]: each choice is a
continuation of the example's context, its log-likelihood is the sum of log p(token) over the
continuation's tokens, and the prediction is the best choice under one of three rules:

    acc         argmax  log P(continuation | context)
    acc_norm    argmax  log P(continuation | context) / characters of the continuation
    acc_answer  argmax  log P(continuation | context) - log P(continuation | "Answer:")

The paper uses acc_norm everywhere except OpenBookQA and BoolQ, where it uses acc_answer
(after GPT-3) [LLaMA §3]; the report says which one the paper's table uses and prints the
paper's LLaMA-7B number next to ours. Context and continuation are tokenized together, and the
continuation's tokens are those after the longest prefix the joint encoding shares with the
context's own encoding, so the tokens scored are the ones the model would really see.
WinoGrande uses partial evaluation: the option fills the blank and ends the context, and the
rest of the sentence, identical for both options, is the scored continuation (so there acc and
acc_norm coincide).
Closed-book QA (NaturalQuestions, TriviaQA) is greedy generation with exact match after
normalization; perplexity is measured on held-out text or a prepared token shard.

    python eval.py --ckpt llama/7B --task hellaswag --data hellaswag_val.jsonl --limit 500
    python eval.py --ckpt out/tiny --task perplexity --data heldout.txt --out report.json

Files to download (one JSON object per line, as published) and the fields read:

    task           file                                          fields
    boolq          SuperGLUE BoolQ val.jsonl (or BoolQ dev.jsonl) passage, question, label|answer
    piqa           PIQA valid.jsonl + valid-labels.lst            goal, sol1, sol2; 0|1 a line
    siqa           Social IQa dev.jsonl + dev-labels.lst          context, question,
                                                                  answerA..C; 1..3 a line
    hellaswag      hellaswag_val.jsonl                            activity_label, ctx_a, ctx_b,
                                                                  endings, label
    winogrande     WinoGrande 1.1 dev.jsonl                       sentence (blank "_"), option1,
                                                                  option2, answer "1"|"2"
    arc_easy       ARC-V1-Feb2018 ARC-Easy-Test.jsonl             question.stem, question.choices
    arc_challenge  ARC-V1-Feb2018 ARC-Challenge-Test.jsonl          [{text, label}], answerKey
    openbookqa     OpenBookQA-V1-Sep2018 Data/Main/test.jsonl     same fields as ARC
    nq             NQ-open.dev.jsonl (nq_open)                    question, answer [list]
    triviaqa       TriviaQA, one question a line                  question|Question, answer [list]
                   (e.g. `jq -c '.Data[]' unfiltered-web-dev.json`) or Answer {Value, Aliases}
    perplexity     text (.txt, one document), or a token shard    -
                   (.npy, or .bin of uint16 / uint32 ids)

A `*-labels.lst` file is looked for beside the jsonl, named after it, when records carry no label.

The JSON report (--out) holds the metrics, the one the paper's table uses and its rule in words,
LLaMA-7B's published score, and for each example every choice's log-likelihood (and its
log-likelihood after "Answer:" where that rule applies), the choice each rule picked, the label.

Reading order
  1. Examples and readers     one small function per benchmark format, one table of tasks
  2. Scoring                  tokenize together, pad, one forward per batch, sum log-probs
  3. Multiple choice          the three rules, the report
  4. Closed-book QA           greedy answers, exact match
  5. Perplexity               non-overlapping windows of max_seq_len tokens
  6. main                     the command line

Shape legend: B batch, T sequence, V vocab.

What this file leaves out: few-shot prompting (the paper's Tables 4-5 use 1- to 64-shot QA;
here everything is zero-shot), the paper's exact prompt strings (unpublished; ours are written
out in the readers), and tensor-parallel evaluation.
"""

import argparse
import json
import math
import os
import re
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from generate import generate_tokens, load_model


# ---------------------------------------------------------------------------------------------
# 1. Examples and readers
# ---------------------------------------------------------------------------------------------

@dataclass
class Example:
    contexts: list               # one per choice; all equal except in WinoGrande
    continuations: list          # one per choice; all equal in WinoGrande
    label: int = -1              # index of the right choice (-1 for QA)
    answers: list = field(default_factory=list)   # closed-book QA: accepted answers


def read_boolq(get):
    ctx = f"{get('passage')}\nQuestion: {get('question')}?\nAnswer:"
    return Example([ctx] * 2, [" no", " yes"], int(bool(get("label", "answer"))))


def read_piqa(get):
    ctx = f"Question: {get('goal')}\nAnswer:"
    return Example([ctx] * 2, [" " + get("sol1"), " " + get("sol2")], int(get("label")))


def read_siqa(get):
    ctx = f"Question: {get('context')} {get('question')}\nAnswer:"
    options = [" " + get(k) for k in ("answerA", "answerB", "answerC")]
    return Example([ctx] * 3, options, int(get("label")) - 1)       # NOTE: labels are 1-based


def _clean_wikihow(text: str) -> str:
    """HellaSwag's WikiHow contexts carry markers like "[title]" and "[step]"; drop them."""
    text = re.sub(r"\s*\[title\]\s*", ". ", text)
    return re.sub(r"\s+", " ", re.sub(r"\[[a-z]+\]", " ", text)).strip()


def read_hellaswag(get):
    ctx_b = _clean_wikihow(get("ctx_b"))             # clean first: "[step] pour" -> "Pour"
    ctx = _clean_wikihow(f"{get('activity_label')}: {get('ctx_a')} {ctx_b[:1].upper()}{ctx_b[1:]}")
    endings = [" " + _clean_wikihow(e) for e in get("endings")]
    return Example([ctx] * len(endings), endings, int(get("label")))


def read_winogrande(get):
    sentence = get("sentence")
    if "_" not in sentence:
        raise KeyError("sentence (with a blank '_')")
    before, after = sentence.split("_", 1)
    # PAPER: partial evaluation: score the words after the blank given each filled-in start.
    return Example([before + get("option1"), before + get("option2")], [after] * 2,
                   int(get("answer")) - 1)


def read_arc(get):
    """ARC and OpenBookQA share AI2's layout: a stem, lettered (or numbered) choices, a key."""
    choices = get("question.choices")
    keys = [c["label"] for c in choices]
    if get("answerKey") not in keys:
        raise KeyError(f"answerKey (one of {keys})")
    ctx = f"Question: {get('question.stem')}\nAnswer:"
    return Example([ctx] * len(choices), [" " + c["text"] for c in choices],
                   keys.index(get("answerKey")))


def read_qa(get):
    answer = get("answer", "answers", "Answer")
    if isinstance(answer, dict):                   # TriviaQA: {"Value": ..., "Aliases": [...]}
        answer = [answer.get("Value", answer.get("value"))] + list(
            answer.get("Aliases", answer.get("aliases", [])))
    answers = [answer] if isinstance(answer, str) else [a for a in answer if a]
    # PAPER: the zero-shot form of the paper's closed-book QA prompt [LLaMA §3.2, Appendix].
    return Example([f"Answer these questions:\nQ: {get('question', 'Question')}\nA:"], [],
                   answers=answers)


RULES = {   # what each metric means, written into every report
    "acc": "argmax log P(continuation | context)",
    "acc_norm": "argmax log P(continuation | context) / characters of the continuation",
    "acc_answer": "argmax P(continuation | context) / P(continuation | 'Answer:')",
    "exact_match": "greedy answer == a gold answer, after SQuAD normalization",
    "perplexity": "exp(mean negative log-likelihood per token)",
}


@dataclass
class Task:
    read: object          # record accessor -> Example
    metric: str           # the rule the paper's table uses
    llama_7b: float       # LLaMA-7B zero-shot score in the paper [LLaMA Tables 3, 4, 5]
    fields: str           # the format, for error messages


TASKS = {
    "boolq": Task(read_boolq, "acc_answer", 76.5, "passage, question, label (true/false)"),
    "piqa": Task(read_piqa, "acc_norm", 79.8, "goal, sol1, sol2 (+ label or X-labels.lst)"),
    "siqa": Task(read_siqa, "acc_norm", 48.9,
                 "context, question, answerA, answerB, answerC (+ label 1-3 or X-labels.lst)"),
    "hellaswag": Task(read_hellaswag, "acc_norm", 76.1,
                      "activity_label, ctx_a, ctx_b, endings, label"),
    "winogrande": Task(read_winogrande, "acc_norm", 70.1,    # = acc: one shared continuation
                       "sentence with '_', option1, option2, answer ('1' or '2')"),
    "arc_easy": Task(read_arc, "acc_norm", 72.8, "question.stem, question.choices, answerKey"),
    "arc_challenge": Task(read_arc, "acc_norm", 47.6, "question.stem, question.choices, answerKey"),
    "openbookqa": Task(read_arc, "acc_answer", 57.2, "question.stem, question.choices, answerKey"),
    "nq": Task(read_qa, "exact_match", 16.8, "question, answer (a list of strings)"),
    "triviaqa": Task(read_qa, "exact_match", 50.0, "question, answer (a list of strings)"),
    "perplexity": Task(None, "perplexity", None, "text, or a .npy/.bin token shard"),
}


def read_task(name: str, path: str, limit=None) -> list:
    """A benchmark file -> Examples, with a one-line error naming the line and the field."""
    task = TASKS[name]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task file {path} does not exist; see eval.py's docstring for "
                                f"which {name} file to download")
    stem = os.path.splitext(path)[0]
    labels = None
    if os.path.isfile(stem + "-labels.lst"):       # PIQA and SIQA ship labels in a side file
        with open(stem + "-labels.lst") as f:
            labels = [line.strip() for line in f if line.strip()]
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(examples) >= limit:
                break
            where = f"{path} line {n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not valid JSON ({e.msg}); expect one {name} "
                                 "object per line") from None
            if labels is not None and isinstance(record, dict):
                record.setdefault("label", labels[len(examples)] if len(examples) < len(labels)
                                  else None)

            def get(*names):
                """The first field present among `names` ("a.b" reaches inside a dict)."""
                for dotted in names:
                    value = record
                    for part in dotted.split("."):
                        value = value.get(part) if isinstance(value, dict) else None
                    if value is not None:
                        return value
                raise KeyError(" or ".join(names))
            try:
                examples.append(task.read(get))
            except (KeyError, TypeError, ValueError, IndexError) as e:
                what = e.args[0] if isinstance(e, KeyError) else f"a malformed field ({e})"
                raise ValueError(f"{where}: missing or bad {what}; {name} records need "
                                 f"{task.fields}") from None
    if not examples:
        raise ValueError(f"{path} holds no {name} examples")
    return examples


# ---------------------------------------------------------------------------------------------
# 2. Scoring
# ---------------------------------------------------------------------------------------------

def progress(items: list, label: str):
    """Yield items, drawing a one-line bar on stderr after each."""
    t0 = time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        bar = "#" * (30 * i // len(items))
        print(f"\r{label} [{bar:<30}] {i}/{len(items)} {time.perf_counter() - t0:.0f}s",
              end="" if i < len(items) else "\n", file=sys.stderr, flush=True)


def encode_pair(tok, context: str, continuation: str, max_seq_len: int):
    """(token ids of context + continuation, how many of the last ones are the continuation)."""
    whole = tok.encode(context + continuation, bos=True)
    ctx = tok.encode(context, bos=True)
    shared = 0
    while shared < len(ctx) and shared < len(whole) and ctx[shared] == whole[shared]:
        shared += 1
    n = len(whole) - shared
    if n == 0:
        raise ValueError(f"continuation {continuation!r} has no tokens of its own")
    # NOTE: an over-long sequence keeps its end: all of the continuation, the nearest context.
    whole = whole[-(max_seq_len + 1):]
    return whole, min(n, len(whole) - 1)


@torch.inference_mode()
def score_tokens(model, seqs: list, batch_size: int = 8, label: str = "scoring") -> list:
    """Sum of log p(token) over the last n tokens of each (ids, n) in seqs: one float each.

    Sequences are sorted by length so that a batch pads little, right-padded with token 0, and
    run in one forward per batch. Right padding needs no mask: a causal model never lets a
    position see the padding after it.
    """
    device = model.output.weight.device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    scores = [0.0] * len(seqs)
    for batch in progress(batches, label):
        T = max(len(seqs[i][0]) for i in batch) - 1
        x = torch.zeros(len(batch), T, dtype=torch.long)                     # (B, T)
        for row, i in enumerate(batch):
            ids = seqs[i][0]
            x[row, :len(ids) - 1] = torch.tensor(ids[:-1])
        logits = model(x.to(device))                                          # (B, T, V)
        sums = []
        for row, i in enumerate(batch):
            ids, n = seqs[i]
            L = len(ids) - 1                         # position L - 1 predicts the last token
            logp = logits[row, L - n:L].log_softmax(-1)                       # (n, V)
            target = torch.tensor(ids[-n:], device=device)
            sums.append(logp.gather(-1, target[:, None]).sum())
        for i, s in zip(batch, torch.stack(sums).tolist()):                  # one sync a batch
            scores[i] = s
    return scores


def loglikelihoods(model, tok, pairs: list, batch_size: int = 8, label: str = "scoring") -> list:
    """log P(continuation | context) for each (context, continuation) pair."""
    unique = list(dict.fromkeys(pairs))     # PERF: identical pairs (BoolQ's "Answer:" ones) once
    seqs = [encode_pair(tok, c, x, model.args.max_seq_len) for c, x in unique]
    score = dict(zip(unique, score_tokens(model, seqs, batch_size, label)))
    return [score[p] for p in pairs]


# ---------------------------------------------------------------------------------------------
# 3. Multiple choice
# ---------------------------------------------------------------------------------------------

def choose(lls: list, continuations: list, lls_answer=None) -> dict:
    """The choice each rule picks: acc, acc_norm and, given P(c | "Answer:"), acc_answer."""
    def argmax(xs):
        return max(range(len(xs)), key=xs.__getitem__)
    # NOTE: characters of the continuation as scored, its leading space included.
    picks = {"acc": argmax(lls),
             "acc_norm": argmax([ll / len(c) for ll, c in zip(lls, continuations)])}
    if lls_answer is not None:
        picks["acc_answer"] = argmax([ll - u for ll, u in zip(lls, lls_answer)])
    return picks


def evaluate_choices(model, tok, name: str, examples: list, batch_size: int = 8) -> dict:
    task = TASKS[name]
    pairs = [(c, x) for e in examples for c, x in zip(e.contexts, e.continuations)]
    lls = iter(loglikelihoods(model, tok, pairs, batch_size, name))
    uncond = None
    if task.metric == "acc_answer":
        uncond = iter(loglikelihoods(model, tok, [("Answer:", x) for _, x in pairs], batch_size,
                                     name + " | Answer:"))
    hits, rows = Counter(), []
    for i, e in enumerate(examples):
        ll = [next(lls) for _ in e.continuations]
        ua = [next(uncond) for _ in e.continuations] if uncond else None
        picks = choose(ll, e.continuations, ua)
        hits.update(rule for rule, pick in picks.items() if pick == e.label)
        rows.append(dict(index=i, label=e.label, contexts=sorted(set(e.contexts)),
                         continuations=e.continuations, loglik=ll, loglik_answer=ua, picks=picks))
    metrics = {rule: hits[rule] / len(examples) for rule in rows[0]["picks"]}
    return dict(metrics=metrics, paper_metric=task.metric, paper_value=metrics[task.metric],
                examples=rows)


# ---------------------------------------------------------------------------------------------
# 4. Closed-book QA
# ---------------------------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's exact-match rule)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def evaluate_qa(model, tok, examples: list, batch_size: int = 8, max_new_tokens: int = 24):
    rows, hits = [], 0
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    for batch in progress(batches, "answering"):
        prompts = [tok.encode(e.contexts[0], bos=True) for e in batch]
        outs = generate_tokens(model, prompts, max_new_tokens, temperature=0.0, eos_id=tok.eos_id)
        for e, out in zip(batch, outs):
            # PERF: the answer is cut at the first line break after the fact; a stop-string
            # check inside the decoding loop would save the remaining steps.
            pred = tok.decode(out).split("\n")[0].strip()
            match = any(normalize_answer(pred) == normalize_answer(a) for a in e.answers)
            hits += match
            rows.append(dict(index=len(rows), question=e.contexts[0], prediction=pred,
                             answers=e.answers, exact_match=match))
    em = hits / len(examples)
    return dict(metrics={"exact_match": em}, paper_metric="exact_match", paper_value=em,
                examples=rows)


# ---------------------------------------------------------------------------------------------
# 5. Perplexity
# ---------------------------------------------------------------------------------------------

def read_tokens(path: str, tok) -> tuple:
    """(1-D array of token ids, bytes of text or None): a .npy / .bin shard, else UTF-8 text."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.endswith(".npy"):
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    elif path.endswith(".bin"):  # NOTE: raw ids, uint16 when the vocabulary fits, as nanoGPT's
        ids = np.memmap(path, mode="r", dtype=np.uint16 if tok.n_words <= 1 << 16 else np.uint32)
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        return np.array(tok.encode(text, bos=True)), len(text.encode("utf-8"))
    if ids.ndim != 1 or len(ids) < 2 or int(ids.max()) >= tok.n_words:
        raise ValueError(f"{path} must be a 1-D array of at least 2 token ids below the "
                         f"tokenizer's {tok.n_words}; was it prepared with another tokenizer?")
    return ids, None


def evaluate_perplexity(model, tok, path: str, batch_size: int = 8, limit=None) -> dict:
    """exp(mean negative log-likelihood per token) over non-overlapping windows.

    Window i holds tokens [i L, (i + 1) L] (L + 1 tokens; the first is context only), so every
    token after the first is predicted exactly once. NOTE: the first tokens of each window see
    little context, which makes this a little higher than a sliding-window perplexity.
    """
    ids, n_bytes = read_tokens(path, tok)
    L = model.args.max_seq_len
    starts = list(range(0, len(ids) - 1, L))[:limit]
    seqs = [(ids[s:s + L + 1].tolist(), len(ids[s:s + L + 1]) - 1) for s in starts]
    lls = score_tokens(model, seqs, batch_size, "perplexity")
    n_tokens = sum(n for _, n in seqs)
    nll = -sum(lls) / n_tokens
    metrics = {"perplexity": math.exp(nll), "nll_per_token": nll, "tokens": n_tokens}
    if n_bytes is not None and n_tokens == len(ids) - 1:       # the whole text was scored
        metrics["bits_per_byte"] = -sum(lls) / math.log(2) / n_bytes
    return dict(metrics=metrics, paper_metric="perplexity", paper_value=metrics["perplexity"],
                examples=[dict(index=i, start=s, tokens=n, loglik=ll)
                          for i, (s, (_, n), ll) in enumerate(zip(starts, seqs, lls))])


# ---------------------------------------------------------------------------------------------
# 6. Command line
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Zero-shot LLaMA benchmarks, scored as the paper.")
    p.add_argument("--ckpt", required=True, help="checkpoint folder (ours, Meta's or HF's)")
    p.add_argument("--task", required=True, help=", ".join(TASKS))
    p.add_argument("--data", required=True, help="the task's file; see the docstring")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24, help="closed-book QA answers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    name = a.task.lower().replace("-", "_")
    try:
        if name not in TASKS:
            raise ValueError(f"unknown task {a.task!r}; choose one of {', '.join(TASKS)}")
        # Read the task before the model: a malformed file fails in a second, not a minute.
        examples = None if name == "perplexity" else read_task(name, a.data, a.limit)
        model, tok = load_model(a.ckpt, a.device)
        if name == "perplexity":
            report = evaluate_perplexity(model, tok, a.data, a.batch_size, a.limit)
        elif TASKS[name].metric == "exact_match":
            report = evaluate_qa(model, tok, examples, a.batch_size, a.max_new_tokens)
        else:
            report = evaluate_choices(model, tok, name, examples, a.batch_size)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    report = dict(task=name, ckpt=a.ckpt, data=a.data, n=len(report["examples"]),
                  paper_rule=RULES[report["paper_metric"]], llama_7b_paper=TASKS[name].llama_7b,
                  **report)
    scores = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in report["metrics"].items())
    print(f"{name} ({report['n']} examples): {scores}")
    if name != "perplexity":
        print(f"the paper's table uses {report['paper_metric']} ({report['paper_rule']}): "
              f"ours {100 * report['paper_value']:.1f}, LLaMA-7B {report['llama_7b_paper']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
