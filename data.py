"""
data.py -- from raw public text to a resumable, Table-1-weighted stream of token windows.

LLaMA was trained on 1.4T tokens drawn from seven public sources in fixed proportions, each
source cleaned by its own rules [LLaMA §2.1, Table 1]. This file is that pipeline at a size one
machine can run. It reads folders of raw documents (RedPajama's jsonl layout, or .txt files),
cleans and deduplicates them, tokenizes them into flat memory-mapped shards, and serves windows
of tokens whose share per source follows the mixture weights: the same windows whatever the
number of data-parallel ranks, and exactly resumable from a checkpoint. It trains no model;
train.py calls `MixtureSampler` and `validation_windows`.

    python data.py prepare --demo --out data/demo        # offline: Python's own stdlib as text
    python data.py prepare --source c4=/rp/c4 --source github=/rp/github \\
                           --tokenizer tokenizer.model --out data/rp
    python data.py stats data/demo                       # what was kept, dropped, tokenized
    python data.py bench data/demo --seq-len 256         # sampler throughput, tokens/s

Reading order
  1. The mixture       Table 1, source kinds, parse_mix
  2. Reading sources   .jsonl / .jsonl.gz / .txt -> records; unreadable input is counted
  3. Cleaning rules    one small function per rule, grouped by source kind, each citing its paper
  4. Deduplication     exact (a hash of the text) and near (MinHash signatures, LSH bands)
  5. prepare           clean -> (train a tokenizer) -> tokenize -> shards -> manifest.json
  6. MixtureSampler    a deterministic mixture of windows, dp-independent and resumable
  7. Demo corpus       the Python standard library as three sources
  8. Command line

One source on its way through `prepare`:

    files -> records -> rules of its kind -> exact / near dedup -> kept -> every 50th to "val"
                                                                             |
    manifest.json <- SOURCE/{train,val}.{bin,idx} <- tokenize as <s> doc </s> <-+

A prepared folder holds tokenizer.model, stats.json, SOURCE/train.bin, SOURCE/train.idx,
SOURCE/val.bin, SOURCE/val.idx for every source, and manifest.json, written last: a folder
without it is an interrupted build, and the sampler refuses it. A .bin file is the tokens of every
document of the split end to end (uint16 when the vocabulary fits, else uint32); its .idx holds
the int64 offset at which each document starts, plus the total, so document i is
bin[idx[i]:idx[i+1]], which starts with BOS and ends with EOS.

Shape legend: B global batch (B/dp rows per rank), T sequence length. A window holds T+1 tokens:
the model reads window[:-1] and predicts window[1:].

What this file leaves out: fastText language identification and CCNet's n-gram perplexity
filter and "Wikipedia-reference" classifier need downloaded models; `prepare` takes them as hooks
(`language_id`, `quality`) and uses a simple English heuristic in their place. Wikipedia's 20
languages and GitHub's repository licenses are metadata: the license is honored when a record
carries it, never guessed. Dedup state (line hashes, MinHash signatures) is held in memory per
source, which is fine for millions of documents, not for CommonCrawl: at that scale the work is
sharded as CCNet does. Dedup runs within a source, not across sources. Tokenization runs in
one process (a few MB/s); a corpus of terabytes would tokenize its files in parallel.

Papers: LLaMA (arXiv 2302.13971) §2.1 and Table 1; CCNet (1911.00359) §3; C4 in the T5 paper
(1910.10683) §2.2; Codex (2107.03374) §3.1 for code heuristics; MinHash (Broder 1997) with LSH
banding (Leskovec, Rajaraman, Ullman, "Mining of Massive Datasets", ch. 3).
"""

import argparse
import ast
import contextlib
import gzip
import hashlib
import html
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import time
import zlib
from collections import Counter
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from tokenizer import Tokenizer, train_tokenizer


# ---------------------------------------------------------------------------------------------
# 1. The mixture
# ---------------------------------------------------------------------------------------------

# PAPER: Table 1 of [LLaMA §2.1]: sampling share in percent and the epochs it implies over 1.4T
# tokens, keyed by the folder names of RedPajama-Data-1T, the public reproduction of this mix.
# The epochs are share * 1.4T / source size: Wikipedia is small and heavily weighted, so it is
# seen 2.45 times; GitHub is large and lightly weighted, so not even once.
TABLE1 = {  # name: (share %, epochs, kind of cleaning)
    "common_crawl": (67.0, 1.10, "web"),
    "c4": (15.0, 1.06, "web"),
    "github": (4.5, 0.64, "code"),
    "wikipedia": (4.5, 2.45, "wikipedia"),
    "book": (4.5, 2.23, "books"),
    "arxiv": (2.5, 1.06, "arxiv"),
    "stackexchange": (2.0, 1.03, "stackexchange"),
}
KINDS = ("web", "code", "wikipedia", "arxiv", "stackexchange", "books", "text")  # text: no rule
VAL_EVERY = 50  # kept documents 1, 51, 101, ... of each source are held out for validation, so
                # that even a source of two documents has a validation split


def parse_mix(text: str) -> Dict[str, float]:
    """"code=0.6,docs=0.3,reference=0.1" -> {"code": 0.6, ...}. Weights are relative: they need
    not sum to one (Table 1's sum to 100); the sampler normalizes them."""
    weights = {}
    for item in text.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not name or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"bad mixture item {item.strip()!r} in {text!r}: write NAME=WEIGHT "
                             "pairs separated by commas, e.g. 'code=0.6,docs=0.3,reference=0.1'")
        if name in weights:
            raise ValueError(f"source {name!r} appears twice in the mixture {text!r}")
        weights[name] = weight
    if not any(weights.values()):
        raise ValueError(f"the mixture {text!r} gives no source a positive weight")
    return weights


# ---------------------------------------------------------------------------------------------
# 2. Reading sources
# ---------------------------------------------------------------------------------------------

SUFFIXES = (".jsonl", ".jsonl.gz", ".txt")


def source_files(folder: str) -> List[str]:
    """Every readable file under `folder`, sorted so that a build is reproducible."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"source folder {folder!r} does not exist")
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(folder)
                   for f in names if f.endswith(SUFFIXES))
    if not files:
        raise ValueError(f"source folder {folder!r} holds no {', '.join(SUFFIXES)} files")
    return files


def read_records(path: str, dropped: Counter):
    """Yield (record, bytes of the file consumed so far); count what cannot be read in `dropped`.

    A record is a dict with a "text" string (RedPajama's layout) or, for a raw StackExchange dump,
    a "question" string and a list of "answers" {text, score}. A .txt file is one record.
    """
    if os.path.getsize(path) == 0:
        dropped["empty_file"] += 1
        return
    with open(path, "rb") as raw:
        f = gzip.open(raw) if path.endswith(".gz") else raw  # raw.tell(): bytes read from disk
        try:
            if path.endswith(".txt"):
                try:
                    text = f.read().decode("utf-8")
                except UnicodeDecodeError:
                    dropped["bad_utf8"] += 1
                    return
                yield {"text": text}, raw.tell()
                return
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    dropped["bad_utf8"] += 1
                    continue
                except json.JSONDecodeError:
                    dropped["bad_json"] += 1
                    continue
                if _is_record(record):
                    yield record, raw.tell()
                else:
                    dropped["bad_json"] += 1
        except (OSError, EOFError):  # a truncated or corrupt .gz: keep what was read before
            dropped["bad_gzip"] += 1


def _is_record(record) -> bool:
    if not isinstance(record, dict):
        return False
    if isinstance(record.get("question"), str) and isinstance(record.get("answers"), list):
        return all(isinstance(a, dict) and isinstance(a.get("text", ""), str)
                   for a in record["answers"])
    return isinstance(record.get("text"), str)


# ---------------------------------------------------------------------------------------------
# 3. Cleaning rules
# ---------------------------------------------------------------------------------------------
# A rule takes a document's text and returns it cleaned, or None to drop the document. A rule
# that leaves nothing but whitespace drops it too, and `prepare` counts drops per rule name.

# --- web: CommonCrawl and C4 ---

def web_line_dedup(text: str, seen: set) -> str:
    """Drop every line already seen earlier in this source; blank lines stay as separators.
    PAPER: CCNet removes duplicated paragraphs across a shard: menus, cookie banners, footers
    repeated on every page of a site [CCNet §3]. Lines are compared after lower-casing,
    mapping digits to 0 and dropping punctuation, so "© 2019" and "© 2020" are one line."""
    kept = []
    for line in text.split("\n"):
        key = re.sub(r"[\W_]+", " ", re.sub(r"\d", "0", line.lower())).strip()
        if key:
            digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
            if digest in seen:
                continue
            seen.add(digest)
        kept.append(line)
    return "\n".join(kept)


C4_BOILERPLATE = ("javascript", "terms of use", "privacy policy", "cookie policy", "uses cookies",
                  "use of cookies", "use cookies")


def c4_boilerplate_lines(text: str) -> str:
    """PAPER: C4 drops lines asking for JavaScript and policy notices [C4 §2.2]."""
    return "\n".join(l for l in text.split("\n") if not any(b in l.lower() for b in C4_BOILERPLATE))


def c4_terminal_punctuation(text: str) -> str:
    """PAPER: C4 keeps only lines that end in . ! ? or a closing quote [C4 §2.2]."""
    return "\n".join(l for l in text.split("\n") if l.rstrip().endswith(('.', '!', '?', '"', '”')))


def c4_min_words(text: str, n: int = 5) -> str:
    """PAPER: C4 keeps only lines of at least 5 words [C4 §2.2]."""
    return "\n".join(l for l in text.split("\n") if len(l.split()) >= n)


def c4_page_filter(text: str) -> Optional[str]:
    """PAPER: C4 drops a page with "lorem ipsum" (placeholder) or a curly brace (code) [C4 §2.2]."""
    return None if "lorem ipsum" in text.lower() or "{" in text else text


def c4_min_sentences(text: str, n: int = 3) -> Optional[str]:
    """PAPER: C4 drops a page of fewer than 3 sentences [C4 §2.2]."""
    return text if len(re.findall(r"[.!?][\"”]?(?:\s|$)", text)) >= n else None


ENGLISH_WORDS = frozenset("the of and to a in is that for it as was with be by on not this are or "
                          "from at which but have an they you we his her their".split())


def looks_english(text: str) -> bool:
    """The stand-in for fastText language id [CCNet §3]: English prose is written in ASCII
    letters, and about a third of its words are among some 30 very common English words; German
    or French text scores under 10% on the second test, lists of names and numbers lower still."""
    words = re.findall(r"[^\W\d_]+", text.lower())
    if not words:
        return False
    ascii_share = sum(w.isascii() for w in words) / len(words)
    common_share = sum(w in ENGLISH_WORDS for w in words) / len(words)
    return ascii_share >= 0.9 and common_share >= 0.15


# --- code: GitHub ---

LICENSE_WORDS = re.compile(r"copyright|licen[cs]e|permission is hereby granted|all rights reserved",
                           re.I)
COMMENT_OR_BLANK = re.compile(r"\s*(#|//|/\*|\*|--|$)")
PERMISSIVE = ("mit", "apache", "bsd")


def code_license_ok(record: dict) -> bool:
    """PAPER: LLaMA keeps GitHub projects under the Apache, BSD and MIT licenses [LLaMA §2.1].
    The license is repository metadata (`meta.license` in RedPajama); a record without it is kept."""
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    license_name = str(meta.get("license") or "").lower()
    return not license_name or license_name.startswith(PERMISSIVE)


def code_license_header(text: str) -> str:
    """Remove the leading comment block when it is a license or copyright notice: it repeats in
    every file of a project and teaches nothing [LLaMA §2.1]."""
    lines = text.split("\n")
    i = 0
    while i < len(lines) and COMMENT_OR_BLANK.match(lines[i]):
        i += 1
    return "\n".join(lines[i:]) if LICENSE_WORDS.search("\n".join(lines[:i])) else text


def code_line_length(text: str) -> Optional[str]:
    """PAPER: drop files whose longest line exceeds 1000 characters or whose mean line exceeds
    100: minified or generated code [Codex §3.1; LLaMA §2.1]."""
    lengths = [len(l) for l in text.split("\n")]
    return None if max(lengths) > 1000 or sum(lengths) / len(lengths) > 100 else text


def code_alnum_share(text: str) -> Optional[str]:
    """PAPER: drop files that are less than 25% letters and digits: data blobs, ASCII art
    [Codex §3.1; LLaMA §2.1]."""
    return text if sum(c.isalnum() for c in text) >= 0.25 * len(text) else None


# --- wikipedia: wikitext markup ---

def wiki_comments(text: str) -> str:
    """<!-- editor comments --> are not article text [LLaMA §2.1]."""
    return re.sub(r"<!--.*?-->", "", text, flags=re.S)


def wiki_templates(text: str) -> str:
    """{{templates}} (infoboxes, citation needed, ...) and <ref>erences</ref> are removed with
    their content; templates nest, so the innermost are removed until none is left."""
    text = re.sub(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S | re.I)
    count = 1
    while count:
        text, count = re.subn(r"\{\{[^{}]*\}\}", "", text)
    return text


def wiki_links(text: str) -> str:
    """[[target|label]] -> label, [[target]] -> target, [http://x label] -> label; file and
    category links are dropped [LLaMA §2.1]."""
    text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text,
                  flags=re.I)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    return re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)


def wiki_formatting(text: str) -> str:
    """'''bold''', ''italic'', == headings == and leftover HTML tags lose their markup, keep text."""
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"(?m)^(=+)\s*(.*?)\s*\1\s*$", r"\2", text)
    return re.sub(r"</?[A-Za-z][^>]*>", "", text)


# --- arxiv: LaTeX sources ---

MACRO_DEF = re.compile(r"\\(?:re)?newcommand\*?\s*\{?\\([A-Za-z]+)\}?\s*\{((?:[^{}]|\{[^{}]*\})*)\}"
                       r"|\\def\s*\\([A-Za-z]+)\s*\{((?:[^{}]|\{[^{}]*\})*)\}")


def tex_comments(text: str) -> str:
    """PAPER: LLaMA strips LaTeX comments [LLaMA §2.1]. A % escaped as \\% is text, not a comment."""
    text = re.sub(r"(?m)^[ \t]*%.*\n?", "", text)  # whole-line comments vanish with their line
    return re.sub(r"(?<!\\)%.*", "", text)


def tex_inline_macros(text: str) -> str:
    """PAPER: user macros without arguments are inlined so that every paper reads the same:
    \\newcommand{\\R}{\\mathbb{R}} turns each \\R into \\mathbb{R} [LLaMA §2.1]."""
    macros = {}

    def grab(m):
        macros[m.group(1) or m.group(3)] = m.group(2) if m.group(1) else m.group(4)
        return ""
    text = MACRO_DEF.sub(grab, text)
    for name, body in macros.items():
        text = re.sub(r"\\" + name + r"(?![A-Za-z])", lambda _: body, text)
    return text


def tex_body(text: str) -> Optional[str]:
    """PAPER: keep from the first section to the bibliography [LLaMA §2.1]; the preamble and the
    references are boilerplate. A file with no section at all is dropped."""
    start = re.search(r"\\(?:section|chapter)\*?\s*\{", text)
    if start is None:
        return None
    body = text[start.start():]
    end = re.search(r"\\begin\{thebibliography\}|\\bibliography\{|\\printbibliography"
                    r"|\\end\{document\}", body)
    return body[:end.start()] if end else body


# --- stackexchange: HTML posts ---

def stackexchange_thread(record: dict) -> str:
    """PAPER: a question followed by its answers, highest score first [LLaMA §2.1]."""
    answers = sorted(record["answers"], key=lambda a: -float(a.get("score") or 0))  # stable
    return "\n\n".join(["Q: " + record["question"]] + ["A: " + a.get("text", "") for a in answers])


def strip_html(text: str) -> str:
    """PAPER: HTML tags removed [LLaMA §2.1]; line breaks become newlines and entities are
    decoded after the tags are gone, so that "&lt;div&gt;" in a post stays visible text."""
    text = re.sub(r"(?i)<br\s*/?>|</p>|</li>|</pre>|</h\d>", "\n", text)
    return html.unescape(re.sub(r"<[^>]+>", "", text))


# --- every kind ---

def rules_for(kind: str, language_id: Callable[[str], bool] = looks_english,
              quality: Optional[Callable[[str], bool]] = None) -> list:
    """The ordered (name, rule) list of a source kind. Made fresh per source: the web line
    dedup remembers the lines of this source only. Books have no text rule: their cleaning is
    the near-dedup threshold of 0.9 (see NEAR_DUP_OVERLAP)."""
    def hook(fn):
        return lambda text: text if fn(text) else None
    seen = set()
    web = [("web_line_dedup", lambda text: web_line_dedup(text, seen)),
           ("c4_boilerplate_lines", c4_boilerplate_lines),
           ("c4_terminal_punctuation", c4_terminal_punctuation), ("c4_min_words", c4_min_words),
           ("c4_page_filter", c4_page_filter), ("c4_min_sentences", c4_min_sentences),
           ("language_id", hook(language_id))] + ([("quality", hook(quality))] if quality else [])
    return {
        "web": web,
        "code": [("code_license_header", code_license_header),
                 ("code_line_length", code_line_length), ("code_alnum_share", code_alnum_share)],
        "wikipedia": [("wiki_comments", wiki_comments), ("wiki_templates", wiki_templates),
                      ("wiki_links", wiki_links), ("wiki_formatting", wiki_formatting)],
        "arxiv": [("tex_comments", tex_comments), ("tex_inline_macros", tex_inline_macros),
                  ("tex_body", tex_body)],
        "stackexchange": [("strip_html", strip_html)],
        "books": [],
        "text": [],
    }[kind]


def clean_document(record: dict, kind: str, rules: list, removed: Counter):
    """(cleaned text, None) or (None, name of the rule that dropped it). `removed` counts the
    characters each rule took out of the documents that survive it."""
    if kind == "code" and not code_license_ok(record):
        return None, "code_license"
    text = stackexchange_thread(record) if "answers" in record else record["text"]
    if not text.strip():
        return None, "empty_document"
    for name, rule in rules:
        before = len(text)
        text = rule(text)
        if text is None or not text.strip():
            return None, name
        removed[name] += before - len(text)
    return text, None


# ---------------------------------------------------------------------------------------------
# 4. Deduplication
# ---------------------------------------------------------------------------------------------

# PAPER: books overlapping by more than 90% are dropped [LLaMA §2.1]; the paper gives no threshold
# for the other sources, and 0.8 is our choice. Overlap is the share of the smaller document's
# 5-word shingles that the other also holds.
NEAR_DUP_OVERLAP = {"books": 0.9}
DEFAULT_OVERLAP = 0.8


class Deduplicator:
    """Exact and near duplicates within one source; the first copy in reading order is kept.

    Exact: a 128-bit hash of the text. Near: each document is a set of 5-word shingles; its
    MinHash signature holds, for each of 128 random hash functions, the smallest hash over the
    set. Two signatures agree at a position with probability (about) the sets' Jaccard
    similarity J. Checking every pair would be quadratic, so the signature is cut into 32 bands
    of 4 values and only documents that agree on a whole band are compared (LSH). A candidate's
    overlap follows from J and the set sizes: |A n B| = J (|A| + |B|) / (1 + J), divided by the
    smaller size. Two equal-sized documents at the 0.8 threshold have J = 2/3 and become
    candidates with probability 1 - (1 - (2/3)**4)**32 = 0.999; unrelated ones (J < 0.1) with
    probability under 0.004.
    """

    def __init__(self, overlap: float = DEFAULT_OVERLAP, num_perm: int = 128, bands: int = 32,
                 shingle: int = 5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) | np.uint64(1)  # odd
        self.b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
        self.overlap, self.bands, self.shingle = overlap, bands, shingle
        self.exact = set()
        self.buckets = [{} for _ in range(bands)]  # band value -> ids of kept documents
        self.signatures, self.sizes = [], []

    def signature(self, text: str):
        """(num_perm,) uint32 MinHash of the text's shingles, and the number of shingles."""
        words = np.array([zlib.crc32(w.encode()) for w in text.split()] or [0], dtype=np.uint64)
        k = min(self.shingle, len(words))
        shingles = np.zeros(len(words) - k + 1, dtype=np.uint64)
        for j in range(k):  # a polynomial hash of k consecutive words; uint64 wraps mod 2**64
            shingles = shingles * np.uint64(1_000_003) + words[j:len(words) - k + 1 + j]
        shingles = np.unique((shingles ^ (shingles >> np.uint64(32))) & np.uint64(0xFFFFFFFF))
        sig = np.full(len(self.a), 2**32 - 1, dtype=np.uint64)
        for i in range(0, len(shingles), 4096):  # PERF: chunks bound memory to 128 x 4096 values
            x = shingles[None, i:i + 4096]
            # multiply-add-shift: a universal hash of 32-bit keys into 32 bits (Dietzfelbinger)
            sig = np.minimum(sig, ((self.a[:, None] * x + self.b[:, None]) >> np.uint64(32)).min(1))
        return sig.astype(np.uint32), len(shingles)

    def check(self, text: str) -> Optional[str]:
        """"exact_dup" or "near_dup" if `text` repeats a kept document; else keep it, return None."""
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if digest in self.exact:
            return "exact_dup"
        sig, size = self.signature(text)
        keys = [band.tobytes() for band in sig.reshape(self.bands, -1)]
        for other in {i for band, key in zip(self.buckets, keys) for i in band.get(key, ())}:
            jaccard = float(np.mean(sig == self.signatures[other]))
            shared = jaccard * (size + self.sizes[other]) / (1 + jaccard)
            if shared / min(size, self.sizes[other]) >= self.overlap:
                return "near_dup"
        self.exact.add(digest)
        for band, key in zip(self.buckets, keys):
            band.setdefault(key, []).append(len(self.signatures))
        self.signatures.append(sig)
        self.sizes.append(size)
        return None


# ---------------------------------------------------------------------------------------------
# 5. prepare: clean, tokenize, write shards
# ---------------------------------------------------------------------------------------------

class Progress:
    """One line on stderr: label, bar, percent, MB/s; redrawn at most five times a second."""

    def __init__(self, label: str, total: int, quiet: bool = False):
        self.label, self.total, self.quiet = label, max(total, 1), quiet
        self.start = self.drawn = time.perf_counter()

    def show(self, done: int, final: bool = False):
        now = time.perf_counter()
        if self.quiet or (now - self.drawn < 0.2 and not final):
            return
        self.drawn, share = now, min(done / self.total, 1.0)
        speed = done / 1e6 / max(now - self.start, 1e-9)
        print(f"\r{self.label:<24} [{'#' * int(30 * share):<30}] {share:4.0%} {speed:6.1f} MB/s",
              end="\n" if final else "", file=sys.stderr, flush=True)


@contextlib.contextmanager
def atomic_write(path: str):
    """Write to PATH.tmp, then rename: a crash leaves a .tmp file, never a PATH that looks whole."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def parse_source(spec: str):
    """"NAME[:KIND]=DIR" -> (name, kind, dir); the kind defaults to Table 1's, else "text"."""
    left, sep, folder = spec.partition("=")
    name, _, kind = left.partition(":")
    kind = kind or TABLE1.get(name, (0, 0, "text"))[2]
    if not sep or not folder or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"bad source {spec!r}: write NAME=DIR or NAME:KIND=DIR, NAME in letters, "
                         "digits, _ and -, e.g. github=/data/redpajama/github")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} in {spec!r}; choose one of {', '.join(KINDS)}")
    return name, kind, folder


def load_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{data_dir!r} has no manifest.json: it is not a prepared dataset "
                                "or its build was interrupted; run `python data.py prepare ...`")
    with open(path) as f:
        return json.load(f)


def is_complete(data_dir: str) -> bool:
    """A build is complete when its manifest exists: `prepare` writes it last, atomically."""
    return os.path.isfile(os.path.join(data_dir, "manifest.json"))


def prepare(sources: List[str], out_dir: str, tokenizer: Optional[str] = None,
            vocab_size: int = 32000, weights: Optional[dict] = None, val_every: int = VAL_EVERY,
            language_id: Callable[[str], bool] = looks_english,
            quality: Optional[Callable[[str], bool]] = None, quiet: bool = False) -> dict:
    """Build a dataset in `out_dir` from sources "NAME[:KIND]=DIR"; return the stats report.

    Without `tokenizer`, a BPE of `vocab_size` pieces is trained on the cleaned training text.
    Without `weights`, the default mixture is Table 1 when every source is a RedPajama name, else
    each source in proportion to its tokens (one epoch of everything). Every input is checked
    before any work starts; if anything fails later, what this call wrote is removed again.
    """
    specs = [parse_source(s) for s in sources]
    names = [name for name, _, _ in specs]
    if not specs or len(set(names)) != len(names):
        raise ValueError(f"give one or more sources with distinct names, got {names}")
    files = {name: source_files(folder) for name, _, folder in specs}
    tok = Tokenizer(tokenizer) if tokenizer else None
    if set(weights or {}) - set(names):
        raise ValueError(f"mixture names {sorted(set(weights) - set(names))} are not sources; "
                         f"the sources are {names}")
    if val_every < 2:
        raise ValueError(f"val_every={val_every} must be at least 2 (every Nth document to val)")
    if os.path.exists(os.path.join(out_dir, "manifest.json")):
        raise FileExistsError(f"{out_dir!r} already holds a prepared dataset; delete it or choose "
                              "another --out")
    created = [] if os.path.isdir(out_dir) else [out_dir]  # removed again if anything fails
    os.makedirs(out_dir, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=".work-", dir=out_dir) as work:
            clock = [time.perf_counter()]
            stats = {}
            for name, kind, _ in specs:  # pass 1: clean and dedup into work/NAME.{train,val}
                stats[name] = _clean_source(name, kind, files[name], work, val_every,
                                            rules_for(kind, language_id, quality), quiet)
                if stats[name]["kept"] == 0:
                    raise ValueError(f"source {name!r}: no documents left after filtering (read "
                                     f"{stats[name]['read']}, dropped {stats[name]['dropped']}); "
                                     "check its folder and its kind")
            clock.append(time.perf_counter())
            created.append(os.path.join(out_dir, "tokenizer.model"))
            if tok is None:  # SentencePiece learns from the cleaned training text, line by line
                lines = (line for name in names for doc in _read_docs(work, name, "train")
                         for line in doc.split("\n") if line.strip())
                tok = Tokenizer(train_tokenizer(lines, created[-1], vocab_size=vocab_size))
            else:
                with open(tok.path, "rb") as src, atomic_write(created[-1]) as dst:
                    shutil.copyfileobj(src, dst)
            clock.append(time.perf_counter())
            dtype = "uint16" if tok.n_words <= 2**16 else "uint32"
            clean_bytes = sum(os.path.getsize(os.path.join(work, f)) for f in os.listdir(work))
            bar, done = Progress("tokenize", clean_bytes, quiet), 0
            for name in names:  # pass 2: tokenize into out_dir/NAME/{train,val}.{bin,idx}
                created.append(os.path.join(out_dir, name))
                os.makedirs(created[-1], exist_ok=True)
                for split in ("train", "val"):
                    stats[name][split] = _write_shard(work, name, split, created[-1], tok, dtype)
                    done += os.path.getsize(os.path.join(work, f"{name}.{split}"))
                    bar.show(done)
            bar.show(done, final=True)
            clock.append(time.perf_counter())
            if weights is None:
                table1 = all(name in TABLE1 for name in names)
                weights = {n: TABLE1[n][0] if table1 else stats[n]["train"]["tokens"] for n in names}
            seconds = dict(zip(("clean", "tokenizer", "tokenize"), np.diff(clock).tolist()))
            report = dict(sources=stats, seconds=seconds, tokenizer_trained=tokenizer is None,
                          tokenize_mb_per_s=clean_bytes / 1e6 / max(seconds["tokenize"], 1e-9))
            manifest = dict(format=1, tokenizer="tokenizer.model", vocab_size=tok.n_words,
                            dtype=dtype, bos_id=tok.bos_id, eos_id=tok.eos_id, weights=weights,
                            sources={n: dict(kind=stats[n]["kind"], train=stats[n]["train"],
                                             val=stats[n]["val"]) for n in names})
            for filename, content in (("stats.json", report), ("manifest.json", manifest)):
                created.append(os.path.join(out_dir, filename))  # the manifest last: it marks
                with atomic_write(created[-1]) as f:             # the build complete
                    f.write(json.dumps(content, indent=2).encode())
    except BaseException:  # Ctrl-C included: remove this call's output, leave the user's files
        for path in reversed(created):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
        raise
    return report


def _clean_source(name, kind, files, work, val_every, rules, quiet) -> dict:
    """Pass 1 for one source: read, clean, dedup; kept documents go to work/NAME.{train,val}
    as one JSON string per line. Every document read is either kept or counted under a rule."""
    dedup = Deduplicator(NEAR_DUP_OVERLAP.get(kind, DEFAULT_OVERLAP))
    dropped, removed, read, kept = Counter(), Counter(), 0, 0
    total = sum(os.path.getsize(p) for p in files)
    bar, start, done = Progress(f"clean {name} ({kind})", total, quiet), time.perf_counter(), 0
    with open(os.path.join(work, f"{name}.train"), "w") as train, \
         open(os.path.join(work, f"{name}.val"), "w") as val:
        for path in files:
            for record, position in read_records(path, dropped):
                read += 1
                text, rule = clean_document(record, kind, rules, removed)
                rule = rule or dedup.check(text)
                if rule:
                    dropped[rule] += 1
                    continue
                split = val if kept % val_every == 1 else train
                split.write(json.dumps(text) + "\n")
                kept += 1
                bar.show(done + position)
            done += os.path.getsize(path)
    bar.show(done, final=True)
    seconds = time.perf_counter() - start
    return dict(kind=kind, files=len(files), read=read, kept=kept, dropped=dict(dropped),
                chars_removed=dict(removed), raw_mb=total / 1e6, clean_seconds=seconds,
                clean_mb_per_s=total / 1e6 / max(seconds, 1e-9))


def _read_docs(work, name, split):
    with open(os.path.join(work, f"{name}.{split}")) as f:
        for line in f:
            yield json.loads(line)


def _write_shard(work, name, split, folder, tok, dtype) -> dict:
    """Tokenize one split as <s> doc </s> per document into SPLIT.bin, offsets into SPLIT.idx."""
    offsets, docs = [0], _read_docs(work, name, split)
    with atomic_write(os.path.join(folder, f"{split}.bin")) as f:
        while batch := list(itertools.islice(docs, 512)):
            # PERF: one call encodes 512 documents in SentencePiece's C++; the same ids as
            # Tokenizer.encode(text, bos=True, eos=True), one document at a time.
            ids = tok.sp.encode(batch, add_bos=True, add_eos=True)
            offsets += (offsets[-1] + np.cumsum([len(x) for x in ids])).tolist()
            f.write(np.concatenate([np.array(x, dtype=dtype) for x in ids]).tobytes())
    with atomic_write(os.path.join(folder, f"{split}.idx")) as f:
        f.write(np.array(offsets, dtype=np.int64).tobytes())
    return dict(tokens=offsets[-1], documents=len(offsets) - 1)


def read_document(data_dir: str, source: str, split: str, i: int) -> np.ndarray:
    """The tokens of document i of a split, <s> and </s> included (for inspection and tests)."""
    dtype = load_manifest(data_dir)["dtype"]
    base = os.path.join(data_dir, source, split)
    idx = np.fromfile(base + ".idx", dtype=np.int64)
    return np.fromfile(base + ".bin", dtype=dtype)[idx[i]:idx[i + 1]]


# ---------------------------------------------------------------------------------------------
# 6. MixtureSampler
# ---------------------------------------------------------------------------------------------

class MixtureSampler:
    """Windows of T+1 tokens from a prepared folder, mixed by weight, the same for any dp.

    Each source's token stream is cut into windows starting every T tokens (consecutive windows
    share one token, so each token but a last partial window is predicted once per epoch); an
    epoch visits all of them in
    an order reshuffled from (seed, source, epoch). Which source serves the next window is not
    random: it is the one furthest below its target share, weight * windows served so far. The
    realized shares are then exact to within one window, and the whole stream is a function of
    the counts of windows served per source -- which is all `state_dict` needs to hold.

    Documents are packed: a window may end one document (</s>) and begin the next (<s>), so no
    token is padding. The global batch is the next B windows of that one stream; rank r takes rows
    [r B/dp, (r+1) B/dp). Every rank computes the same schedule (a few microseconds per window)
    and reads only its own rows, so dp = 1, 2, 4 train on identical global batches.
    """

    def __init__(self, data_dir: str, seq_len: int, weights: Optional[dict] = None, seed: int = 0,
                 split: str = "train"):
        manifest = load_manifest(data_dir)
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} must be 'train' or 'val'")
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be a positive number of tokens")
        weights = dict(manifest["weights"] if weights is None else weights)
        unknown = sorted(set(weights) - set(manifest["sources"]))
        if unknown:
            raise ValueError(f"unknown source(s) {unknown} in the mixture; {data_dir} holds "
                             f"{sorted(manifest['sources'])}")
        if any(not w >= 0 for w in weights.values()) or not any(weights.values()):
            raise ValueError(f"mixture weights {weights} must be >= 0 with at least one positive")
        self.names = sorted(n for n, w in weights.items() if w > 0)
        total = sum(weights[n] for n in self.names)
        self.weights = [weights[n] / total for n in self.names]
        self.seq_len, self.seed, self.split = seq_len, seed, split
        self.windows = []  # per source: (windows, T+1) read-only view of the memory-mapped shard
        for name in self.names:
            count = manifest["sources"][name][split]["tokens"]
            if count < seq_len + 1:
                raise ValueError(f"source {name!r} has {count} tokens in its {split} split, fewer "
                                 f"than one window of seq_len+1={seq_len + 1}; use a smaller "
                                 "seq_len or give this source weight 0")
            tokens = np.memmap(os.path.join(data_dir, name, f"{split}.bin"),
                               dtype=manifest["dtype"], mode="r", shape=(count,))
            # NOTE: a view, no copy: row w is tokens[w*T : w*T + T + 1], read only when indexed.
            self.windows.append(sliding_window_view(tokens, seq_len + 1)[::seq_len])
        self.served = [0] * len(self.names)  # windows served per source: the whole state
        self._perms = {}                      # source index -> (epoch, its window order)

    def _order(self, s: int, epoch: int) -> np.ndarray:
        if self._perms.get(s, (None,))[0] != epoch:
            rng = np.random.default_rng([self.seed, zlib.crc32(self.names[s].encode()), epoch])
            self._perms[s] = (epoch, rng.permutation(len(self.windows[s])))
        return self._perms[s][1]

    def _schedule(self, n: int) -> list:
        """The next n windows of the global stream, as (source index, window index) pairs."""
        picks, total = [], sum(self.served)
        for _ in range(n):
            total += 1
            # PAPER: deficit scheduling: serve the source furthest below weight * total, which
            # keeps every share within one window of Table 1's proportions [LLaMA Table 1].
            s = max(range(len(self.names)), key=lambda i: self.weights[i] * total - self.served[i])
            epoch, position = divmod(self.served[s], len(self.windows[s]))
            picks.append((s, int(self._order(s, epoch)[position])))
            self.served[s] += 1
        return picks

    def next_batch(self, global_batch: int, dp_rank: int = 0, dp_size: int = 1) -> torch.Tensor:
        """This rank's (B/dp, T+1) int64 rows of the next global batch of B windows."""
        if global_batch < 1 or dp_size < 1 or global_batch % dp_size:
            raise ValueError(f"dp_size={dp_size} must divide global_batch={global_batch}; use a "
                             f"global batch that is a multiple of {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, {dp_size})")
        rows = global_batch // dp_size
        mine = self._schedule(global_batch)[dp_rank * rows:(dp_rank + 1) * rows]
        source = np.array([s for s, _ in mine])
        window = np.array([w for _, w in mine])
        batch = np.empty((rows, self.seq_len + 1), dtype=np.int64)  # (B/dp, T+1)
        for s in np.unique(source):  # PERF: one gather per source, not one slice per row
            batch[source == s] = self.windows[s][window[source == s]]
        return torch.from_numpy(batch)

    def state_dict(self) -> dict:
        return dict(seq_len=self.seq_len, seed=self.seed, split=self.split,
                    weights=dict(zip(self.names, self.weights)),
                    served=dict(zip(self.names, self.served)))

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seq_len", "seed", "split", "weights"):
            if state[key] != mine[key]:
                raise ValueError(f"cannot resume: the saved sampler has {key}={state[key]!r}, this "
                                 f"one {mine[key]!r}; build it with the same seq_len, weights, "
                                 "seed and split")
        self.served = [int(state["served"][n]) for n in self.names]

    def tokens_by_source(self) -> dict:
        return {n: c * (self.seq_len + 1) for n, c in zip(self.names, self.served)}

    def epochs_by_source(self) -> dict:
        return {n: c / len(w) for n, c, w in zip(self.names, self.served, self.windows)}


def validation_windows(data_dir: str, seq_len: int, n_windows: int, seed: int = 0) -> torch.Tensor:
    """(n_windows, T+1) fixed windows of the held-out documents, mixed by the default weights
    over the sources whose val split holds at least one window (a source whose val windows run
    out repeats them, as the training stream repeats a small source)."""
    manifest = load_manifest(data_dir)
    weights = {n: w for n, w in manifest["weights"].items()
               if w > 0 and manifest["sources"][n]["val"]["tokens"] > seq_len}
    if not weights:
        raise ValueError(f"no source of {data_dir!r} has seq_len+1={seq_len + 1} tokens of "
                         "validation text; use a smaller seq_len or prepare more data")
    return MixtureSampler(data_dir, seq_len, weights, seed, split="val").next_batch(n_windows)


# ---------------------------------------------------------------------------------------------
# 7. Demo corpus: the Python standard library
# ---------------------------------------------------------------------------------------------

# Three sources that every Python installation carries, offline. Their weights mirror Table 1 in
# miniature: over a run as long as the training split (1.7M tokens with Python 3.11), the small
# `reference` is seen 2.7 times, like Wikipedia's 2.45, and the large `code` 0.7 times, like
# GitHub's 0.64 (`python data.py stats data/demo` prints these epochs).
DEMO_WEIGHTS = {"code": 0.5, "docs": 0.3, "reference": 0.2}
DEMO_KINDS = {"code": "code", "docs": "text", "reference": "text"}
DEMO_MB = {"code": 4.0, "docs": 1.5, "reference": 1.0}  # caps, in MB of raw text
DEMO_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
             "pydoc_data", "__pycache__"}  # tests are huge and repetitive; pydoc_data is `reference`


def stdlib_files() -> List[str]:
    """The standard library's .py files in a fixed shuffled order (not alphabetical, so that a
    size cap samples every package instead of the first few)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in DEMO_SKIP)
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    random.Random(0).shuffle(files)
    if len(files) < 20:
        raise FileNotFoundError(f"found only {len(files)} .py files under {root!r}; the demo needs "
                                "a Python installation that ships its standard library as source")
    return files


def _module_docs(tree, prefix: str) -> List[str]:
    """help()-style entries, "def name(args)" then the indented docstring, in source order."""
    entries = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node)
            if doc:
                head = (f"class {prefix}{node.name}" if isinstance(node, ast.ClassDef)
                        else f"def {prefix}{node.name}({ast.unparse(node.args)})")
                entries.append(head + "\n    " + doc.replace("\n", "\n    "))
            if isinstance(node, ast.ClassDef):
                entries += _module_docs(node, f"{prefix}{node.name}.")
    return entries


def demo_records(scale: float = 1.0) -> dict:
    """{source: [records]}: `code` = whole .py files, `docs` = one document of docstrings per
    module of the *other* files (so no text sits in two sources), `reference` = the language
    reference topics of pydoc_data."""
    from pydoc_data.topics import topics
    caps = {name: mb * 1e6 * scale for name, mb in DEMO_MB.items()}
    root = sysconfig.get_paths()["stdlib"]
    records = {"code": [], "docs": [], "reference": []}
    size = Counter()
    for path in stdlib_files():
        with open(path, "rb") as f:
            source = f.read().decode("utf-8", errors="replace")
        module = os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        if size["code"] + len(source) <= caps["code"]:
            records["code"].append({"text": source, "meta": {"module": module}})
            size["code"] += len(source)
        elif size["docs"] < caps["docs"]:
            try:
                tree = ast.parse(source)
            except SyntaxError:
                continue
            entries = [ast.get_docstring(tree) or ""] + _module_docs(tree, "")
            if any(entries):
                text = f"Module {module}\n\n" + "\n\n".join(e for e in entries if e)
                records["docs"].append({"text": text, "meta": {"module": module}})
                size["docs"] += len(text)
        else:
            break
    for name in sorted(topics):
        if size["reference"] < caps["reference"]:
            records["reference"].append({"text": topics[name], "meta": {"topic": name}})
            size["reference"] += len(topics[name])
    return records


def prepare_demo(out_dir: str, vocab_size: int = 4096, scale: float = 1.0,
                 quiet: bool = False) -> str:
    """Build the demo dataset in `out_dir` (returns at once if it is already complete):
    raw/SOURCE/part-00000.jsonl, then the ordinary `prepare` with a tokenizer trained on it."""
    if is_complete(out_dir):
        return out_dir
    created_out = not os.path.exists(out_dir)
    raw = os.path.join(out_dir, "raw")
    try:
        sources = []
        for name, records in demo_records(scale).items():
            os.makedirs(os.path.join(raw, name), exist_ok=True)
            with atomic_write(os.path.join(raw, name, "part-00000.jsonl")) as f:
                f.write("".join(json.dumps(r) + "\n" for r in records).encode())
            sources.append(f"{name}:{DEMO_KINDS[name]}={raw}/{name}")
        prepare(sources, out_dir, vocab_size=vocab_size, weights=DEMO_WEIGHTS, quiet=quiet)
    except BaseException:
        shutil.rmtree(out_dir if created_out else raw, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------------------------------------
# 8. Command line
# ---------------------------------------------------------------------------------------------

def print_stats(data_dir: str, train_tokens: Optional[float] = None):
    """A table per source: kept and dropped documents, tokens, and the epochs that the weights
    imply for a run of `train_tokens` (default: as many tokens as the training split holds)."""
    manifest = load_manifest(data_dir)
    with open(os.path.join(data_dir, "stats.json")) as f:
        report = json.load(f)
    total_w = sum(manifest["weights"].values())
    tokens = {n: s["train"]["tokens"] for n, s in manifest["sources"].items()}
    train_tokens = train_tokens or sum(tokens.values())
    print(f"{data_dir}: {manifest['vocab_size']} pieces ({manifest['dtype']}), "
          f"epochs for a run of {train_tokens:,.0f} tokens")
    print(f"{'source':<14}{'kind':<14}{'weight':>7}{'read':>9}{'kept':>8}{'train tok':>13}"
          f"{'val tok':>11}{'epochs':>8}{'MB/s':>7}  dropped by rule")
    for name, s in report["sources"].items():
        weight = manifest["weights"].get(name, 0) / total_w
        drops = ", ".join(f"{r} {n}" for r, n in sorted(s["dropped"].items(), key=lambda x: -x[1]))
        print(f"{name:<14}{s['kind']:<14}{weight:>7.3f}{s['read']:>9}{s['kept']:>8}"
              f"{tokens[name]:>13,}{s['val']['tokens']:>11,}"
              f"{weight * train_tokens / max(tokens[name], 1):>8.2f}{s['clean_mb_per_s']:>7.1f}"
              f"  {drops or '-'}")
    sec = report["seconds"]
    print(f"seconds: clean {sec['clean']:.1f}, tokenizer {sec['tokenizer']:.1f}, tokenize "
          f"{sec['tokenize']:.1f} ({report['tokenize_mb_per_s']:.1f} MB/s)")


def bench(data_dir: str, seq_len: int, batch: int, steps: int = 50) -> float:
    """Tokens per second that MixtureSampler assembles (one process, dp = 1)."""
    sampler = MixtureSampler(data_dir, seq_len)
    sampler.next_batch(batch)  # first touch of the memory maps
    start = time.perf_counter()
    for _ in range(steps):
        sampler.next_batch(batch)
    return steps * batch * (seq_len + 1) / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description="Prepare LLaMA-style pretraining data and inspect it.")
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="raw folders (or --demo) -> tokenized shards")
    pp.add_argument("--source", action="append", default=[], metavar="NAME[:KIND]=DIR",
                    help=f"a folder of .jsonl/.jsonl.gz/.txt; kinds: {', '.join(KINDS)}")
    pp.add_argument("--demo", action="store_true", help="build the offline stdlib demo corpus")
    pp.add_argument("--tokenizer", help="a SentencePiece .model (default: train one)")
    pp.add_argument("--vocab-size", type=int, default=None, help="when training (demo: 4096)")
    pp.add_argument("--mix", help="default weights stored with the data, e.g. c4=15,github=4.5")
    pp.add_argument("--val-every", type=int, default=VAL_EVERY)
    pp.add_argument("--out", required=True)
    pp.add_argument("--quiet", action="store_true")
    ps = sub.add_parser("stats", help="print what prepare kept, dropped and tokenized")
    ps.add_argument("data_dir")
    ps.add_argument("--train-tokens", type=float, help="run length for the epochs column")
    pb = sub.add_parser("bench", help="measure the sampler's tokens/s")
    pb.add_argument("data_dir")
    pb.add_argument("--seq-len", type=int, default=2048)
    pb.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    try:
        if args.command == "prepare":
            if args.demo == bool(args.source):
                p.error("give either --demo or one or more --source NAME=DIR")
            start = time.perf_counter()
            if args.demo:
                prepare_demo(args.out, args.vocab_size or 4096, quiet=args.quiet)
            else:
                prepare(args.source, args.out, args.tokenizer, args.vocab_size or 32000,
                        parse_mix(args.mix) if args.mix else None, args.val_every,
                        quiet=args.quiet)
            print(f"{args.out} ready in {time.perf_counter() - start:.1f} s")
        elif args.command == "stats":
            print_stats(args.data_dir, args.train_tokens)
        else:
            rate = bench(args.data_dir, args.seq_len, args.batch)
            print(f"MixtureSampler: {rate / 1e6:.1f} M tokens/s (seq_len {args.seq_len}, "
                  f"batch {args.batch})")
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
