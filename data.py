"""
data.py -- from raw public text to a resumable, Table-1-weighted stream of token windows.

LLaMA was trained on 1.4T tokens drawn from seven public sources in fixed proportions, each
source cleaned by its own rules [LLaMA §2.1, Table 1]. This file is that pipeline at a size one
machine can run: it cleans and deduplicates folders of raw documents (RedPajama's jsonl layout,
or .txt files), tokenizes them into flat memory-mapped shards, and serves windows of tokens
whose share per source follows the mixture weights: the same windows whatever the number of
data-parallel ranks, and exactly resumable from a checkpoint. It trains no model; train.py
calls `parse_mix`, `MixtureSampler`, `validation_windows` and, for the demo, `prepare_demo`.

    python data.py prepare --demo --out data/demo        # offline: Python's own stdlib as text
    python data.py prepare --source c4=/rp/c4 --source github=/rp/github \\
                           --tokenizer tokenizer.model --out data/rp
    python data.py prepare --shard 3/64 --source common_crawl=/cc --out parts/3   # host 3 of 64
    python data.py merge parts/* --tokenizer tokenizer.model --out data/cc
    python data.py stats data/demo                       # what was kept, dropped, tokenized

Reading map (train.py reads through sections 1 and 2, and builds the demo with section 10)
  1. The mixture        Table 1, parse_mix
  2. Reading a dataset  MixtureSampler: windows mixed by weight, dp-independent, resumable
  3. Cleaning rules     one small function per rule, a table of them per source kind
  4. Deduplication      exact (a hash of the text) and near (MinHash signatures, LSH bands)
  5. prepare            its stages: clean_file -> dedup_source -> tokenize_file -> concatenate
  ---------------------------------------------------------------------------- (the banner)
  6. Reading sources    .jsonl / .jsonl.gz / .txt -> records; unreadable input is counted
  7. Worker processes   forked workers, a pipe each (one that dies fails the stage), progress
  8. prepare's options  the checks before any work; --shard I/N on N machines, then merge
  9. Dataset checks     load_manifest: a prepared folder checked against its manifest; the
                        identity a run records of it (dataset_identity)
 10. Demo corpus        the Python standard library as three sources
 11. Command line       prepare, merge, stats

A prepared folder holds tokenizer.model, stats.json, manifest.json and SOURCE/{train,val}.{bin,
idx}: a .bin is the ids of every document of the split end to end, each <s> doc </s> (uint16
when the vocabulary fits, else uint32); its .idx the int64 offset where each document starts,
plus the total, so that document i is bin[idx[i]:idx[i+1]]. A file is the unit of work:

    files --workers--> rules of its kind --> text + fingerprint per document   (part/, part.json)
                                                              |
    one process, files in order: exact / near dedup, every 50th kept to "val"  <----+
                                                              |
    manifest.json <- SOURCE/{train,val}.{bin,idx} <--workers-- tokenize as <s> doc </s>

Only 532-byte fingerprints cross between processes, and only the deciding process holds the
dedup state, so the output is the same bytes for any --workers, or for N machines' `prepare
--shard I/N` joined by `merge` (tested), and memory does not grow with the workers.

Shape legend: B global batch (B/dp rows per rank), T sequence length. A window holds T+1 tokens:
the model reads window[:-1] and predicts window[1:].

What this file leaves out: fastText language identification and CCNet's perplexity and
"Wikipedia-reference" filters (they need downloaded models; `language_id` and `quality` are hooks
of the ccnet and web kinds, and an English heuristic stands in); metadata a record does not carry
(Wikipedia's 20 languages, GitHub's licenses); dedup across sources; splitting one huge file (a
source kept in one file is cleaned by one core: first `split -l 100000 --additional-suffix=.jsonl
big.jsonl part-`, and move big.jsonl out of the folder); threads (workers are processes forked from
this one: Linux, macOS); near dedup of more documents than one merge holds (see merge);
zstd-compressed sources (RedPajama's common_crawl is .jsonl.zst: `zstd -d` them first; zstandard is
no dependency).

Papers: LLaMA (arXiv 2302.13971) §2.1 and Table 1; CCNet (1911.00359) §3; C4 in the T5 paper
(1910.10683) §2.2; Codex (2107.03374) §3.1 for code heuristics; MinHash (Broder 1997) with LSH
banding (Leskovec, Rajaraman, Ullman, "Mining of Massive Datasets", ch. 3).
"""

import argparse
import ast
import codecs
import contextlib
import errno
import gzip
import hashlib
import html
import itertools
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import pathlib
import random
import re
import shutil
import signal
import sys
import sysconfig
import time
import zlib
from collections import Counter
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

import checkpoint as C
from cli import OneLineParser, Progress, check, number
from tokenizer import Tokenizer, token_dtype, train_tokenizer


# ---------------------------------------------------------------------------------------------
# 1. The mixture
# ---------------------------------------------------------------------------------------------

# PAPER: Table 1 of [LLaMA §2.1]: sampling share in percent and the epochs it implies over 1.4T
# tokens, keyed by the folder names of RedPajama-Data-1T, the public reproduction of this mix.
# The epochs are share * 1.4T / source size: Wikipedia is small and heavily weighted, so it is
# seen 2.45 times; GitHub is large and lightly weighted, so not even once.
TABLE1 = {  # name: (share %, epochs, kind of cleaning)
    "common_crawl": (67.0, 1.10, "ccnet"),
    "c4": (15.0, 1.06, "web"),
    "github": (4.5, 0.64, "code"),
    "wikipedia": (4.5, 2.45, "wikipedia"),
    "book": (4.5, 2.23, "books"),
    "arxiv": (2.5, 1.06, "arxiv"),
    "stackexchange": (2.0, 1.03, "stackexchange"),
}


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
# 2. Reading a dataset: MixtureSampler
# ---------------------------------------------------------------------------------------------

class MixtureSampler:
    """Windows of T+1 tokens from a prepared folder, mixed by weight, the same for any dp.

    Each source's token stream is cut into windows starting every T tokens (consecutive windows
    share one token, so each token but a last partial window is predicted once per epoch); an
    epoch visits all of them in an order reshuffled from (seed, source, epoch). Which source
    serves the next window is not random: it is the one furthest below its target share,
    weight * windows served so far. The realized shares then stay within about one window of
    the target (within one at every step for Table 1's weights, tested; some mixes of many small
    weights lag by a little more), and the whole stream is a function of the counts of windows
    served per source -- which is all `state_dict` needs to hold.

    Documents are packed: a window may end one document (</s>) and begin the next (<s>), so no
    token is padding. The global batch is the next B windows of that one stream; rank r takes rows
    [r B/dp, (r+1) B/dp). Every rank computes the same schedule (a few microseconds per window)
    and reads only its own rows, so dp = 1, 2, 4 train on identical global batches.
    """

    def __init__(self, data_dir: str, seq_len: int, weights: Optional[dict] = None, seed: int = 0,
                 split: str = "train"):
        manifest = load_manifest(data_dir)  # checked against its files first: check_dataset
        weights = dict(manifest["weights"] if weights is None else weights)
        unknown = sorted(set(weights) - set(manifest["sources"]))
        check([(split in ("train", "val"), f"split={split!r} must be 'train' or 'val'"),
               (seq_len >= 1, f"seq_len={seq_len} must be a positive number of tokens"),
               (not unknown, f"unknown source(s) {unknown} in the mixture; {data_dir} holds "
                             f"{sorted(manifest['sources'])}"),
               (all(w >= 0 for w in weights.values()) and any(weights.values()),
                f"mixture weights {weights} must be >= 0 with at least one positive")])
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
            # keeps every share within about one window of its target [LLaMA Table 1].
            s = max(range(len(self.names)), key=lambda i: self.weights[i] * total - self.served[i])
            epoch, position = divmod(self.served[s], len(self.windows[s]))
            picks.append((s, int(self._order(s, epoch)[position])))
            self.served[s] += 1
        return picks

    def next_batch(self, global_batch: int, dp_rank: int = 0, dp_size: int = 1) -> torch.Tensor:
        """This rank's (B/dp, T+1) int64 rows of the next global batch of B windows."""
        check([(global_batch >= 1 and dp_size >= 1 and global_batch % dp_size == 0,
                f"dp_size={dp_size} must divide global_batch={global_batch}; use a global batch "
                f"that is a multiple of {dp_size}"),
               (0 <= dp_rank < dp_size, f"dp_rank={dp_rank} must be in [0, {dp_size})")])
        rows = global_batch // dp_size
        mine = self._schedule(global_batch)[dp_rank * rows:(dp_rank + 1) * rows]
        source, window = np.array(mine).T  # (B/dp,) each
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
                raise ValueError(f"the saved sampler has {key}={state[key]!r}, this one "
                                 f"{mine[key]!r}; build it with the same seq_len, weights, seed "
                                 "and split")
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


def documents(data_dir: str, source: str, split: str = "train"):
    """Yield the documents of a split in order, each an array of ids from <s> to </s>."""
    dtype = load_manifest(data_dir)["dtype"]
    base = os.path.join(data_dir, source, split)
    idx, ids = np.fromfile(base + ".idx", dtype=np.int64), np.fromfile(base + ".bin", dtype=dtype)
    for start, end in zip(idx[:-1], idx[1:]):
        yield ids[start:end]


# ---------------------------------------------------------------------------------------------
# 3. Cleaning rules
# ---------------------------------------------------------------------------------------------
# A rule takes a document's text and returns it cleaned, or None to drop the document. A rule
# that leaves nothing but whitespace drops it too, and `prepare` counts drops per rule name.

# --- ccnet (CommonCrawl) and web (C4) ---
# PAPER: CommonCrawl is cleaned by CCNet's steps: line dedup, then language id and quality
# filters (the hooks of rules_for); C4 by its own line and page heuristics [LLaMA §2.1].

DIGIT, PUNCTUATION = re.compile(r"\d"), re.compile(r"[\W_]+")  # PERF: compiled once, not per line


def web_line_dedup(text: str, seen: set) -> str:
    """Drop every line already seen earlier in this file; blank lines, and lines of
    punctuation alone (`* * *`, `|---|`), stay as separators.
    PAPER: CCNet removes duplicated paragraphs within a shard, one of the 5 GB pieces a dump is
    cut into: menus, cookie banners, footers repeated on every page of a site [CCNet §3]. Here a
    shard is one input file, so files are cleaned independently, in parallel. Lines are compared
    after lower-casing, mapping digits to 0 and dropping punctuation, so "© 2019" and "© 2020"
    are one line."""
    kept = []
    for line in text.split("\n"):
        key = PUNCTUATION.sub(" ", DIGIT.sub("0", line.lower())).strip()
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


C4_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.I)


def c4_terminal_punctuation(text: str) -> str:
    """PAPER: C4 keeps only lines that end in . ! ? or a closing quote, and not in "..." (a
    teaser: "read the rest of this story...") [C4 §2.2]. Citation marks, [1], [edit] and
    [citation needed], are cut from each line first, as C4's code does, so a cited sentence ends
    in its own full stop."""
    lines = (C4_CITATION.sub("", l).rstrip() for l in text.split("\n"))
    return "\n".join(l for l in lines
                     if l.endswith(('.', '!', '?', '"', '”')) and not l.endswith("..."))


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
    letters, and about a third of its words are among some 30 very common English words (15% at
    least). NOTE: a heuristic: German and French text mostly fail one test or the other, lists
    of names and numbers the second; Dutch, which shares "in", "is", "was", can pass both."""
    words = re.findall(r"[^\W\d_]+", text.lower())
    if not words:
        return False
    ascii_share = sum(w.isascii() for w in words) / len(words)
    common_share = sum(w in ENGLISH_WORDS for w in words) / len(words)
    return ascii_share >= 0.9 and common_share >= 0.15


# --- code: GitHub ---

# A notice's paragraphs: the copyright line, the grant ("Permission to use ... is hereby granted")
# and the disclaimer (THE SOFTWARE IS PROVIDED "AS IS" ... WARRANTIES), each its own paragraph in
# ISC's and 0BSD's headers.
LICENSE_WORDS = re.compile(r"copyright|licen[cs]e|hereby granted|all rights reserved"
                           r"|provided\W+as\W+is|warrant", re.I)
# A line comment; not Rust's #[attribute] or #![crate_attribute], which are code. A line that
# starts with * is a comment only inside a /* */ block (in Markdown it is a bullet).
LINE_COMMENT = re.compile(r"\s*(#(?![\[!])|//|--)")
PREPROCESSOR = re.compile(  # C's `#` lines are code, not comments; C allows `# include` too
    r"\s*#(include|import|define|undef|if|ifdef|ifndef|elif|else|endif|pragma|error|warning"
    r"|line)\b|\s*#\s+(include|import)\s*[<\"]|\s*#\s+(define|undef|ifdef|ifndef)\s+\w")
PERMISSIVE = ("mit", "apache", "bsd")


def code_license_ok(record: dict) -> bool:
    """PAPER: LLaMA keeps GitHub projects under the Apache, BSD and MIT licenses [LLaMA §2.1].
    The license is repository metadata (`meta.license` in RedPajama); a record without one is
    kept."""
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    license_name = str(meta.get("license") or "").lower()
    return not license_name or license_name.startswith(PERMISSIVE)


def code_license_header(text: str) -> str:
    """Remove the leading comment block when it is a license or copyright notice: it repeats in
    every file of a project and teaches nothing [LLaMA §2.1]. The block is cut after the last of
    its paragraphs (comment lines up to a blank line, or a /* */ comment) that holds a notice: a
    comment below it is the file's own description and stays. A C preprocessor line (#include,
    #define, an include guard's #ifndef) ends the block; a script's first line, #!/usr/bin/env
    python3, is no comment either: it stays, and the block is looked for below it."""
    lines = text.split("\n")
    start = end = 1 if lines[0].startswith("#!") else 0
    block = notice = False  # inside a /* */ comment; the current paragraph holds a license word
    for i, line in enumerate(lines[start:], start):
        opens = not block and line.lstrip().startswith("/*")
        in_block = block or opens
        if in_block:  # every line of a /* */ comment is comment, whatever it starts with
            block = "*/" not in (line.split("/*", 1)[1] if opens else line)
        elif line.strip() and (not LINE_COMMENT.match(line) or PREPROCESSOR.match(line)):
            break  # the first line of code
        notice = notice or LICENSE_WORDS.search(line) is not None
        if notice:
            end = i + 1
        if (in_block and not block) or (not in_block and not line.strip()):
            notice = False  # the paragraph ends: a /* */ comment closed, or a blank line
    if end == start:  # no notice
        return text
    while end < len(lines) and not lines[end].strip():  # the blank lines below the notice too
        end += 1
    return "\n".join(lines[:start] + lines[end:])


def code_line_length(text: str) -> Optional[str]:
    """PAPER: drop files whose longest line exceeds 1000 characters or whose mean line exceeds
    100: minified or generated code [Codex §3.1; LLaMA §2.1]."""
    lengths = [len(l) for l in text.rstrip("\n").split("\n")]   # a final newline ends a line
    return None if max(lengths) > 1000 or sum(lengths) / len(lengths) > 100 else text


def code_alnum_share(text: str) -> Optional[str]:
    """PAPER: drop files that are less than 25% letters and digits: data blobs, ASCII art
    [Codex §3.1; LLaMA §2.1]."""
    # PERF: map(str.isalnum) counts in C; the same count as sum(c.isalnum() for c in text)
    return text if sum(map(str.isalnum, text)) >= 0.25 * len(text) else None


# --- wikipedia: wikitext markup ---

# A page of raw wikitext holds [[links]], {{templates}}, '''bold''', <ref>s or {| tables |};
# RedPajama's wiki.jsonl is plain text already, where "<int>", "{{ name }}" or 2'' are text, and a
# record without any of these marks meets no wikitext rule (clean_document). NOTE: a table's {|
# and |} count only at the start of a line, as MediaWiki reads them: 2^{|S|} is TeX.
WIKITEXT = re.compile(r"\[\[|\{\{[^\s{}]|'''|<ref|^[ \t]*\{\|", re.M)
WIKI_TABLE = re.compile(r"^[ \t]*\{\|(?:(?!^[ \t]*\{\|).)*?^[ \t]*\|\}[^\n]*\n?", re.M | re.S)


def wiki_comments(text: str) -> str:
    """<!-- editor comments --> are not article text [LLaMA §2.1]."""
    return re.sub(r"<!--.*?-->", "", text, flags=re.S)


def wiki_templates(text: str) -> str:
    """{{templates}} (infoboxes, citation needed, ...) and <ref>erences</ref> are removed with
    their content; templates nest, so the innermost are removed until none is left."""
    # a self-closing <ref name="a/b"/> first: the paired form would run on to the next </ref>
    text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S | re.I)
    count = 1
    while count:
        text, count = re.subn(r"\{\{[^{}]*\}\}", "", text)
    return text


def wiki_tables(text: str) -> str:
    """{| tables |} are formatting boilerplate [LLaMA §2.1]: removed with their cells, and the
    line break after them; tables nest, so the innermost are removed until none is left. A {|
    and a |} each begin a line (WIKI_TABLE): inside a line they are text, <math>2^{|S|}</math>."""
    count = 1
    while count:
        text, count = WIKI_TABLE.subn("", text)
    return text


def wiki_links(text: str) -> str:
    """[[target|label]] -> label, [[target]] -> target, [http://x label] -> label; file and
    category links are dropped [LLaMA §2.1]."""
    text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text,
                  flags=re.I)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    return re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)


def wiki_formatting(text: str) -> str:
    """'''bold''', ''italic'', == headings == and leftover HTML tags lose their markup and
    keep their text."""
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"(?m)^(=+)\s*(.*?)\s*\1\s*$", r"\2", text)
    return re.sub(r"</?[A-Za-z][^>]*>", "", text)


# --- arxiv: LaTeX sources ---

# A user macro without arguments, \newcommand{\NAME}{BODY} or \def\NAME{BODY}; its body may
# nest braces two deep, as \boldsymbol{\mathbf{x}} does. \renewcommand is left alone: it restyles
# LaTeX's own commands (\section, \cite) in a preamble, and RedPajama inlines only these two.
MACRO_BODY = r"\{((?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*)\}"
MACRO_DEF = re.compile(r"\\newcommand\*?\s*\{?\\([A-Za-z]+)\}?\s*" + MACRO_BODY
                       + r"|\\def\s*\\([A-Za-z]+)\s*" + MACRO_BODY)
MACRO_PASSES = 4  # inlines macros defined through macros 4 deep; one that uses itself stops
SECTION = re.compile(r"\\(?:section|chapter)\*?\s*(?:\[[^\]]*\])?\s*\{")  # [short title]


def tex_comments(text: str) -> str:
    """PAPER: LLaMA strips LaTeX comments [LLaMA §2.1]. A % escaped as \\% is text, not a
    comment; after a line break, \\\\%, it is one."""
    text = re.sub(r"(?m)^[ \t]*%.*\n?", "", text)  # whole-line comments vanish with their line
    # an even run of backslashes before the % (none, or \\\\ breaking a line) escapes nothing
    return re.sub(r"(?<!\\)((?:\\\\)*)%.*", r"\1", text)


def tex_inline_macros(text: str) -> str:
    """PAPER: user macros without arguments are inlined so that every paper reads the same:
    \\newcommand{\\R}{\\mathbb{R}} turns each \\R into \\mathbb{R} [LLaMA §2.1]. A macro whose
    body uses another (\\newcommand{\\Rn}{\\R^n}) is inlined in full: the text is rewritten
    until no macro is left, at most MACRO_PASSES times."""
    macros = {}

    def grab(m):
        macros[m.group(1) or m.group(3)] = m.group(2) if m.group(1) else m.group(4)
        return ""
    text = MACRO_DEF.sub(grab, text)
    if not macros:
        return text
    use = re.compile(r"\\(" + "|".join(macros) + r")(?![A-Za-z])")  # \R, not \Rset
    for _ in range(MACRO_PASSES):
        text, count = use.subn(lambda m: macros[m.group(1)], text)
        if not count:
            break
    return text


def tex_body(text: str) -> Optional[str]:
    """PAPER: keep from the first section to the bibliography [LLaMA §2.1]; the preamble and the
    references are boilerplate. The first section is looked for after \\begin{document} when
    there is one: a preamble may restyle \\section itself. A file with no section is dropped."""
    document = text.find("\\begin{document}")
    start = SECTION.search(text, max(document, 0))
    if start is None:
        return None
    body = text[start.start():]
    end = re.search(r"\\begin\{thebibliography\}|\\bibliography(?:style)?\{"
                    r"|\\printbibliography|\\end\{document\}", body)
    return body[:end.start()] if end else body


# --- stackexchange: HTML posts ---

def stackexchange_thread(record: dict) -> str:
    """PAPER: a question followed by its answers, highest score first, HTML tags removed [LLaMA
    §2.1]. Only a raw dump's posts are HTML: RedPajama's {"text"} records were made plain text by
    its own processing (BeautifulSoup's get_text), and a second strip would delete the
    `<String>` of `List<String>` as a tag, so they meet no rule."""
    answers = sorted(record["answers"], key=lambda a: -_score(a))  # stable: ties keep their order
    return "\n\n".join(["Q: " + strip_html(record["question"])]
                       + ["A: " + strip_html(a.get("text", "")) for a in answers])


def _score(answer: dict) -> float:
    """An answer's score; one that is no finite number ("n/a", a list) sorts as 0, as a missing
    one does: its text is still worth keeping, only its place among the answers is unknown."""
    try:
        score = float(answer.get("score") or 0)
    except (TypeError, ValueError):
        return 0.0
    return score if math.isfinite(score) else 0.0


def strip_html(text: str) -> str:
    """PAPER: HTML tags removed [LLaMA §2.1]; line breaks become newlines and entities are
    decoded after the tags are gone, so that "&lt;div&gt;" in a post stays visible text."""
    text = re.sub(r"(?i)<br\s*/?>|</p>|</li>|</pre>|</h\d>", "\n", text)
    return html.unescape(re.sub(r"<[^>]+>", "", text))


# --- every kind ---

RULES = {  # kind: its rules in order; a rule's name in the stats is its function's name
    "ccnet": [web_line_dedup],  # then the language_id and quality hooks
    "web": [web_line_dedup, c4_boilerplate_lines, c4_terminal_punctuation, c4_min_words,
            c4_page_filter, c4_min_sentences],  # then the language_id and quality hooks
    "code": [code_license_header, code_line_length, code_alnum_share],
    "wikipedia": [wiki_comments, wiki_templates, wiki_tables, wiki_links, wiki_formatting],
    "arxiv": [tex_comments, tex_inline_macros, tex_body],
    "stackexchange": [],  # a raw dump's HTML is stripped as its thread is read (see above)
    "books": [],  # their cleaning is the near-dedup threshold of 0.9 (see NEAR_DUP_OVERLAP)
    "text": [],   # no rule
}
KINDS = tuple(RULES)


def rules_for(kind: str, language_id: Callable[[str], bool] = looks_english,
              quality: Optional[Callable[[str], bool]] = None) -> list:
    """The ordered (name, rule) list of a source kind, made fresh per file: the web line dedup
    remembers the lines of this file only. Web text (ccnet, web) then meets the two hooks, each a
    test that keeps or drops a document."""
    seen = set()
    rules = [(rule.__name__, (lambda text: web_line_dedup(text, seen))
              if rule is web_line_dedup else rule) for rule in RULES[kind]]
    def hook(test):  # a yes/no test as a rule
        return lambda text: text if test(text) else None
    hooks = [("language_id", language_id), ("quality", quality)] if kind in ("ccnet", "web") else []
    return rules + [(name, hook(test)) for name, test in hooks if test]


def clean_document(record: dict, kind: str, rules: list, removed: Counter):
    """(cleaned text, None) or (None, name of the rule that dropped it). `removed` counts the
    characters each rule took out of the documents that survive it. A wikipedia record without
    wikitext markup (WIKITEXT: RedPajama's are plain text) meets none of the wikitext rules."""
    if kind == "code" and not code_license_ok(record):
        return None, "code_license"
    # _is_record's test: a {"text"} record may carry "answers" as well (a QA dump's)
    text = stackexchange_thread(record) if _is_thread(record) else record["text"]
    if not text.strip():
        return None, "empty_document"
    if kind == "wikipedia" and not WIKITEXT.search(text):
        rules = []  # plain text already (RedPajama's): no markup to remove, see WIKITEXT
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
# A book held whole in an anthology f times its size overlaps it by 100% but has Jaccard
# similarity only J = 1/f, and LSH finds pairs by J (see Deduplicator): 32 bands of 4 rows make
# such a pair a candidate with probability 1 - (1 - J**4)**32 = 0.87 at f = 2, 0.33 at f = 3,
# 0.12 at f = 4. Books are cut into 64 bands of 2 rows: 1 - (1 - J**2)**64 = 1.00, 0.9995, 0.98
# (0.93 at f = 5). The price: unrelated books (J about 0.01 over 5-word shingles) are compared
# with probability 0.006 instead of 3e-7, each comparison 128 values.
NEAR_DUP_BANDS = {"books": 64}
DEFAULT_BANDS = 32


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
    probability under 0.004. Books are cut into 64 bands of 2 values (NEAR_DUP_BANDS). The limit:
    a candidate is judged by J as 128 values estimate it, not by its shingles, which no
    fingerprint holds; a book held whole in an anthology 3 times its size is then found over 0.9
    with probability 0.83 (0.95 at 2 times, 0.76 at 4), and kept otherwise.

    The work is split in two so that it can run in parallel: `fingerprint(text)` looks at one
    document alone (hash, shingles, MinHash: the expensive part, run in worker processes), and
    `check_fingerprint(fp)` decides against every earlier document (dictionary lookups, run in
    one process, in reading order). A fingerprint is 532 bytes, whatever the document's length.
    """

    def __init__(self, overlap: float = DEFAULT_OVERLAP, num_perm: int = 128,
                 bands: int = DEFAULT_BANDS, shingle: int = 5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) | np.uint64(1)  # odd
        self.b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
        self.overlap, self.bands, self.shingle = overlap, bands, shingle
        self.record = np.dtype([("digest", "V16"), ("shingles", "<u4"),
                                ("minhash", "<u4", (num_perm,))])  # one fingerprint
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

    def fingerprint(self, text: str) -> bytes:
        """What the dedup decision needs of a document, as one `self.record`: 128-bit hash,
        shingle count, MinHash. Depends on the text alone."""
        sig, size = self.signature(text)
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        return digest + np.uint32(size).tobytes() + sig.tobytes()

    def check_fingerprint(self, fp) -> Optional[str]:
        """"exact_dup" or "near_dup" if the document of fingerprint `fp` (a `self.record`)
        repeats a kept document; else keep it, return None."""
        digest, sig, size = fp["digest"].tobytes(), fp["minhash"].copy(), int(fp["shingles"])
        if digest in self.exact:
            return "exact_dup"
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

    def check(self, text: str) -> Optional[str]:
        """Both steps for one text: "exact_dup", "near_dup", or None (kept)."""
        return self.check_fingerprint(np.frombuffer(self.fingerprint(text), self.record)[0])


# ---------------------------------------------------------------------------------------------
# 5. prepare: clean_file in parallel -> dedup_source in order -> tokenize_file -> concatenate
# ---------------------------------------------------------------------------------------------
# Workers do what looks at one file alone; this process decides what depends on every earlier
# document (dedup, the val split), in file order, from fingerprints: the docstring's diagram.

VAL_EVERY = 50     # kept documents 1, 51, 101, ... of each source are held out for validation, so
                   # that even a source of two documents has a validation split
TRAIN, VAL = 1, 2  # a document's fate in the dedup decisions; 0 = dropped


def prepare(sources: List[str], out_dir: str, tokenizer: Optional[str] = None,
            vocab_size: int = 32000, weights: Optional[dict] = None, val_every: int = VAL_EVERY,
            language_id: Callable[[str], bool] = looks_english,
            quality: Optional[Callable[[str], bool]] = None, quiet: bool = False,
            workers: Optional[int] = None) -> dict:
    """Build a dataset in `out_dir` from sources "NAME[:KIND]=DIR"; return the stats report.

    Without `tokenizer`, a BPE of `vocab_size` pieces is trained on the cleaned training text.
    Without `weights`, the default mixture is Table 1 when every source is a RedPajama name, else
    each source in proportion to its tokens (one epoch of everything). `workers` processes
    (default: every core) clean and tokenize files in parallel; the output does not depend on
    their number. The sources, the mixture and the tokenizer are checked before any work starts,
    and the dataset is built in a temporary folder, renamed to `out_dir` when whole (`building`).
    """
    listing = _list_sources(sources)
    tok = _check_options([s[0] for s in listing], tokenizer, weights, val_every, vocab_size,
                         workers)
    with building(out_dir) as tmp:
        return _build(tmp, listing, tok, vocab_size, weights, val_every,
                      dict(language_id=language_id, quality=quality), quiet, workers)


def _build(tmp: str, listing: list, tok: Optional[Tokenizer], vocab_size: int,
           weights: Optional[dict], val_every: int, hooks: dict, quiet: bool,
           workers: Optional[int]) -> dict:
    """prepare's work inside the folder `building` gave: clean_file on every file into one part
    folder (as `prepare --shard 0/1` would), then _finish."""
    work = os.path.join(tmp, "work")
    _clean_part(work, listing, 0, 1, workers, hooks, quiet)
    report = _finish(tmp, _read_parts([work]), tok, vocab_size, weights, val_every, workers, quiet)
    shutil.rmtree(work)
    return report


def _finish(tmp: str, parts: list, tok: Optional[Tokenizer], vocab_size: int,
            weights: Optional[dict], val_every: int, workers: Optional[int], quiet: bool) -> dict:
    """From cleaned parts (see _read_parts) to a complete dataset in `tmp`: decide (stage 2),
    train a tokenizer if none was given, tokenize (stage 3), write NAME/{train,val}.{bin,idx}
    (stage 4), stats.json and manifest.json."""
    sources = parts[0][1]["sources"]
    counts = {key: count for _, part in parts for key, count in part["counts"].items()}
    prefix = {key: os.path.join(folder, key) for folder, part in parts for key in part["counts"]}
    keys = {s["name"]: [f"{s['name']}/{k:05d}" for k in range(len(s["files"]))] for s in sources}
    fates, stats = {}, {}
    for source in sources:  # every source's files in order: the global order
        files = [(key, prefix[key], counts[key]) for key in keys[source["name"]]]
        stats[source["name"]], source_fates = dedup_source(source, files, val_every)
        fates.update(source_fates)

    tok_path = os.path.join(tmp, "tokenizer.model")
    if tok is None:  # trained on the cleaned training text
        _train_on((text for key, fate in fates.items()
                   for text in _kept(prefix[key] + ".jsonl", fate, TRAIN)), tok_path, vocab_size)
    else:
        shutil.copyfile(tok.path, tok_path)
    trained, tok = tok is None, Tokenizer(tok_path)

    dtype, pieces = token_dtype(tok.n_words), os.path.join(tmp, "pieces")
    for name in keys:
        os.makedirs(os.path.join(pieces, name))
    tasks = [(key, prefix[key] + ".jsonl", fate, dtype, os.path.join(pieces, key))
             for key, fate in fates.items()]
    lengths = _each_file("tokenize", tokenize_file, tasks, workers, dict(tokenizer=tok), quiet)
    for name in keys:
        os.makedirs(os.path.join(tmp, name))
        for split in ("train", "val"):
            stats[name][split] = concatenate(pieces, keys[name], split, lengths,
                                             os.path.join(tmp, name, split))
    shutil.rmtree(pieces)

    if weights is None:
        table1 = all(name in TABLE1 for name in keys)
        weights = {n: TABLE1[n][0] if table1 else stats[n]["train"]["tokens"] for n in keys}
    report = dict(sources=stats, tokenizer_trained=trained)
    manifest = dict(format=FORMAT, tokenizer="tokenizer.model", tokenizer_sha256=_sha256(tok_path),
                    vocab_size=tok.n_words, dtype=dtype, bos_id=tok.bos_id, eos_id=tok.eos_id,
                    weights=weights, sources={n: {k: stats[n][k] for k in ("kind", "train", "val")}
                                              for n in keys})
    for filename, content in (("stats.json", report), ("manifest.json", manifest)):
        with open(os.path.join(tmp, filename), "w") as f:  # no timings: the same bytes each run
            json.dump(content, f, indent=2)
    return report


def clean_file(task):
    """Stage 1, in a worker: one file -> PREFIX.jsonl (each surviving document as a JSON string
    per line) and PREFIX.sig (its fingerprint); returns ("NAME/00000", counts of what was read
    and dropped)."""
    key, path, kind, prefix = task
    rules = rules_for(kind, _WORKER["language_id"], _WORKER["quality"])  # fresh: per-file scope
    fingerprint = Deduplicator().fingerprint
    dropped, removed, read = Counter(), Counter(), 0
    with open(prefix + ".jsonl", "w") as texts, open(prefix + ".sig", "wb") as prints:
        for record in read_records(path, dropped):
            read += 1
            text, rule = clean_document(record, kind, rules, removed)
            if rule:
                dropped[rule] += 1
                continue
            texts.write(json.dumps(text) + "\n")
            prints.write(fingerprint(text))
    sizes = {suffix: os.path.getsize(prefix + suffix) for suffix in (".jsonl", ".sig")}
    return key, dict(read=read, dropped=dict(dropped), removed=dict(removed), sizes=sizes)


def dedup_source(source: dict, files: list, val_every: int):
    """Stage 2, in this process: exact and near dedup of one source, its files [(key, prefix,
    counts from clean_file)] in order; kept documents 1, 1 + val_every, ... go to val. Returns
    the source's stats (what was read, kept and dropped by which rule) and {key: each document's
    fate in that file (0 dropped, TRAIN, VAL)}."""
    dedup = Deduplicator(NEAR_DUP_OVERLAP.get(source["kind"], DEFAULT_OVERLAP),
                         bands=NEAR_DUP_BANDS.get(source["kind"], DEFAULT_BANDS))
    dropped, removed, read, kept, fates = Counter(), Counter(), 0, 0, {}
    for key, prefix, count in files:
        read += count["read"]
        dropped.update(count["dropped"])
        removed.update(count["removed"])
        prints = np.fromfile(prefix + ".sig", dtype=dedup.record)
        fates[key] = fate = np.zeros(len(prints), dtype=np.int8)
        for i, fp in enumerate(prints):
            verdict = dedup.check_fingerprint(fp)
            if verdict:
                dropped[verdict] += 1
                continue
            fate[i] = VAL if kept % val_every == 1 else TRAIN
            kept += 1
    if kept == 0:
        raise ValueError(f"source {source['name']!r}: no documents left after filtering (read "
                         f"{read}, dropped {dict(dropped)}); check its folder and its kind")
    stats = dict(kind=source["kind"], files=len(files), read=read, kept=kept,
                 dropped=dict(dropped), chars_removed=dict(removed),
                 raw_mb=sum(size for _, size in source["files"]) / 1e6)
    return stats, fates


def _train_on(texts, path: str, vocab_size: int) -> str:
    """A tokenizer trained on `texts`, each non-blank line a sentence, as SentencePiece reads a
    text file; returns `path`."""
    return train_tokenizer((line for text in texts for line in text.split("\n") if line.strip()),
                           path, vocab_size)


def tokenize_file(task):
    """Stage 3, in a worker: the kept documents of one file as <s> doc </s>, ids end to end, into
    PIECE.train and PIECE.val; returns ("NAME/00000", {split: document lengths})."""
    key, path, fate, dtype, piece = task
    lengths = {}
    for split, name in ((TRAIN, "train"), (VAL, "val")):
        docs, sizes = _kept(path, fate, split), []
        with open(f"{piece}.{name}", "wb") as out:
            while batch := list(itertools.islice(docs, 512)):
                # PERF: 512 texts a call, not one: tests/bench_data.py sampler times both
                ids = _WORKER["tokenizer"].encode_batch(batch, bos=True, eos=True)
                sizes += [len(x) for x in ids]
                out.write(np.concatenate(ids).astype(dtype).tobytes())
        lengths[name] = np.array(sizes, dtype=np.int64)
    return key, lengths


def _kept(path: str, fate: np.ndarray, split: int):
    """The cleaned texts of one file (PREFIX.jsonl) whose fate is `split`, in order."""
    with open(path) as f:
        for line, fate_i in zip(f, fate, strict=True):  # _read_parts found the file whole
            if fate_i == split:
                yield json.loads(line)


def concatenate(pieces: str, keys: list, split: str, lengths: dict, base: str) -> dict:
    """Stage 4: BASE.bin, the pieces of `keys` end to end; BASE.idx, where each document starts,
    and the total, as int64, so that document i is bin[idx[i]:idx[i+1]]."""
    with open(base + ".bin", "wb") as out:
        for key in keys:
            with open(os.path.join(pieces, f"{key}.{split}"), "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    offsets = np.cumsum(np.concatenate([[0]] + [lengths[key][split] for key in keys]))
    offsets.astype(np.int64).tofile(base + ".idx")
    return dict(tokens=int(offsets[-1]), documents=len(offsets) - 1)


# =============================================================================================
# Below: what running it for real needs -- reading raw files whatever state they are in, worker
# processes, the checks before a build, --shard and merge, the checks of a prepared folder, the
# demo corpus and the command line.
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# 6. Reading sources
# ---------------------------------------------------------------------------------------------

SUFFIXES = (".jsonl", ".jsonl.gz", ".txt")


def source_files(folder: str) -> List[str]:
    """Every .jsonl/.jsonl.gz/.txt file under `folder`, symlinks followed, sorted so that a build
    is reproducible. A folder reached twice (a symlink loop, or two links to one folder), a link
    that leads nowhere, or a name that is no regular file (a FIFO, a device) is an error, not
    something to read twice, block on, or skip in silence."""
    if not os.path.isdir(folder):
        there = os.path.exists(folder)
        raise (NotADirectoryError if there else FileNotFoundError)(
            f"source folder {folder!r} {'is not a folder' if there else 'does not exist'}; give "
            f"a folder of {', '.join(SUFFIXES)} files")
    files, seen = [], {}
    for d, _, names in os.walk(folder, followlinks=True):
        # RedPajama's common_crawl is .jsonl.zst: zstandard is no dependency of ours, and a
        # source read without its compressed files would be a smaller source without a word
        for name in names:
            if name.endswith(".zst") and name[:-4].endswith(SUFFIXES) and name[:-4] not in names:
                raise ValueError(f"{os.path.join(d, name)!r} is zstd-compressed, which data.py "
                                 "does not read; decompress it first with `zstd -d` (it keeps "
                                 "the .zst beside)")
        real = os.path.realpath(d)
        if real in seen:
            raise ValueError(f"{d!r} leads back to {seen[real]!r} (a symlink loop, or a second "
                             "link to the same folder); remove the link")
        seen[real] = d
        for path in (os.path.join(d, name) for name in names if name.endswith(SUFFIXES)):
            if not os.path.exists(path):
                raise ValueError(f"{path!r} is a broken symlink or a symlink loop; fix or remove "
                                 "it")
            C.regular_file(path, "source file")      # a FIFO, a device: one line, not a hang
            files.append(path)
    if not files:
        raise ValueError(f"source folder {folder!r} holds no {', '.join(SUFFIXES)} files")
    return sorted(files)


RECORD_LIMIT = 256 << 20  # bytes of one jsonl record (a book is a few MB); longer ones: dropped


def read_records(path: str, dropped: Counter):
    """Yield the records of one file; count what cannot be read in `dropped`.

    A record is a dict with a "text" string (RedPajama's layout) or, for a raw StackExchange dump,
    a "question" string and a list of "answers" {text, score}. A .txt file is one record. A
    UTF-8 byte-order mark opening a file is not text: it is dropped.
    """
    if os.path.getsize(path) == 0:
        dropped["empty_file"] += 1
        return
    is_txt = path.endswith(".txt")       # one document, read whole: C.read_file's bound
    lines = ([C.read_file(path, what="source file", advice="split it into documents")] if is_txt
             else _lines(path, dropped))
    try:
        for n, line in enumerate(lines):
            line = line.removeprefix(codecs.BOM_UTF8) if n == 0 else line
            if not is_txt and not line.strip():
                continue
            try:
                text = line.decode("utf-8")
                record = {"text": text} if is_txt else json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                dropped["bad_utf8" if isinstance(e, UnicodeDecodeError) else "bad_json"] += 1
                continue
            if not _is_record(record):
                dropped["bad_json"] += 1
            elif any(map(LONE_SURROGATE.search, _texts(record))):
                dropped["bad_utf8"] += 1  # "\ud83c" escaped in JSON: half a character, no UTF-8
            else:
                yield record
    except (EOFError, gzip.BadGzipFile, zlib.error):  # a truncated or corrupt .gz: keep what
        dropped["bad_gzip"] += 1                        # was read before


def _lines(path: str, dropped: Counter):
    """The lines of a .jsonl or .jsonl.gz file, each read with a bound: a line longer than
    RECORD_LIMIT is skipped to its end and counted, never held whole in memory."""
    with open(path, "rb") as raw:
        f = gzip.open(raw) if path.endswith(".gz") else raw
        while line := f.readline(RECORD_LIMIT + 1):
            if len(line) > RECORD_LIMIT and not line.endswith(b"\n"):
                while (rest := f.readline(RECORD_LIMIT + 1)) and not rest.endswith(b"\n"):
                    pass
                dropped["record_too_long"] += 1
                continue
            yield line


def _is_thread(record: dict) -> bool:
    """A raw StackExchange record: a "question" string and a list of "answers" objects, each
    with its "text" string."""
    answers = record.get("answers")
    return isinstance(record.get("question"), str) and isinstance(answers, list) and all(
        isinstance(a, dict) and isinstance(a.get("text", ""), str) for a in answers)


def _is_record(record) -> bool:
    """A thread, or else a {"text"} record (a QA dump's text may carry its question and answers
    in other shapes: it is read as text)."""
    return isinstance(record, dict) and (_is_thread(record) or isinstance(record.get("text"), str))


LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's "\ud83c\udf0d" pairs decode to one "🌍"


def _texts(record: dict) -> list:
    """The strings of a record (_is_record's) that become its document."""
    if _is_thread(record):
        return [record["question"]] + [a.get("text", "") for a in record["answers"]]
    return [record["text"]]


# ---------------------------------------------------------------------------------------------
# 7. Worker processes
# ---------------------------------------------------------------------------------------------

def default_workers() -> int:
    """Every core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


_WORKER = {}  # NOTE: what each worker process holds for its tasks (the build's hooks, its
              # tokenizer). A task is pickled; a lambda cannot be, and a forked worker inherits it.


def _worker_init(hooks: dict, in_pool: bool):
    _WORKER.clear()
    _WORKER.update(hooks)
    if in_pool:  # Ctrl-C reaches every process; only the parent stops, and it stops the pool
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # NOTE: a task's exception travels back to the parent, so a worker has nothing to say
        # on stderr but the broken pipe it meets when its parent was killed: that is silenced.
        sys.stderr = open(os.devnull, "w")


def _map(fn, tasks: list, workers: Optional[int], hooks: dict, ordered: bool = False,
         label: str = "a"):
    """Yield fn(task) for every task from `workers` processes (None: every core): in the order
    of `tasks` if `ordered`, else as they finish (results then say which task they are for).

    A worker that dies (the out-of-memory killer's SIGKILL) fails the stage at once, in one
    line (ChildProcessError), instead of leaving its task lost and the parent waiting for it,
    as multiprocessing.Pool does. Each worker is sent one task at a time over its own pipe."""
    workers = min(workers or default_workers(), len(tasks))
    if workers <= 1:  # PERF: the simple version, a loop in this process; --workers 1 runs it
        _worker_init(hooks, in_pool=False)
        yield from map(fn, tasks)
        return
    # NOTE: "fork": workers start in milliseconds with this module (and torch) already imported.
    context = multiprocessing.get_context("fork")
    pipes = [context.Pipe() for _ in range(workers)]            # (this end, the worker's end)
    procs = [context.Process(target=_serve, args=(fn, theirs, pipes, hooks), daemon=True)
             for _, theirs in pipes]
    for proc, (_, theirs) in zip(procs, pipes):
        proc.start()
        theirs.close()
    queue, busy, results, first = iter(enumerate(tasks)), {}, {}, 0  # busy: worker -> task index

    def feed(k: int):
        if (item := next(queue, None)) is not None:
            busy[k], task = item
            pipes[k][0].send(task)
    try:
        for k in range(workers):
            feed(k)
        while busy:
            ready = multiprocessing.connection.wait(
                [pipes[k][0] for k in busy] + [procs[k].sentinel for k in busy])
            for k in list(busy):
                try:
                    message = pipes[k][0].recv() if pipes[k][0] in ready else None
                except (EOFError, OSError):      # it died while sending
                    message = None
                if message is None and procs[k].sentinel not in ready:
                    continue
                if message is None:
                    procs[k].join()
                    raise ChildProcessError(_died(procs[k].exitcode, label))
                i, (ok, result) = busy.pop(k), message
                if not ok:
                    raise result
                feed(k)
                results[i] = result
                if not ordered:
                    yield results.pop(i)
                while ordered and first in results:
                    yield results.pop(first)
                    first += 1
    finally:                                 # done, failed, interrupted or closed early
        for (mine, _), proc in zip(pipes, procs):
            with contextlib.suppress(OSError):
                mine.send(None)              # a worker between tasks ends
            mine.close()
            if busy:
                proc.terminate()             # one still working is stopped
            proc.join()


def _serve(fn, conn, pipes: list, hooks: dict):
    """A worker process: fn(task) for each task its parent sends on `conn`, each answered (True,
    result) or (False, the exception); it ends on None, or when its parent is gone."""
    for other in itertools.chain(*pipes):    # every end but its own: its pipe reads EOF once it
        if other is not conn:                # dies, and the parent's once the parent dies
            other.close()
    _worker_init(hooks, in_pool=True)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            answer = (True, fn(task))
        except Exception as e:
            answer = (False, e)
        try:
            conn.send(answer)
        except (OSError, EOFError):          # the parent is gone
            return
        except Exception as e:               # a result or exception that cannot be pickled
            conn.send((False, RuntimeError(f"{type(e).__name__}: {e}")))


def _died(code: Optional[int], label: str) -> str:
    how = (f"was killed by {signal.Signals(-code).name}" if code and code < 0
           and -code in signal.Signals._value2member_map_ else f"exited with status {code}")
    killer = " (the out-of-memory killer sends SIGKILL)" if code == -signal.SIGKILL else ""
    return (f"a worker process of the {label} stage {how}{killer} before it finished its "
            "task; nothing was written to --out: run again, with fewer --workers if memory ran "
            "short")


def _each_file(label: str, fn, tasks: list, workers: Optional[int], hooks: dict,
               quiet: bool) -> dict:
    """{key: result} of a stage fn(task) -> (key, result) over tasks (key, input file, ...) in
    `workers` processes, with a progress line for the bytes of input done."""
    size = {task[0]: os.path.getsize(task[1]) for task in tasks}
    bar, done, results = Progress(f"{label:<8}", sum(size.values()), quiet=quiet), 0, {}
    # PERF: the largest files first, so that no worker is left with a big one at the end (the
    # simple version: in file order)
    for key, result in _map(fn, sorted(tasks, key=lambda task: -size[task[0]]), workers, hooks,
                            label=label):
        results[key], done = result, done + size[key]
        bar.show(done, f"{done / bar.total:4.0%} {done / 1e6 / bar.seconds():6.1f} MB/s",
                 final=len(results) == len(tasks))
    return results


# ---------------------------------------------------------------------------------------------
# 8. prepare's options; --shard and merge
# ---------------------------------------------------------------------------------------------
# Beyond one machine, the way CCNet and datatrove split the work: any scheduler (a Slurm array,
# a shell loop over hosts) runs `prepare --shard I/N` over the same sources on N machines; each
# cleans and fingerprints files I, I+N, I+2N, ... into a part folder. `merge PART...` decides
# the dedup of all parts in file order, trains or copies the tokenizer, tokenizes with every
# core of its machine and writes one manifest: the same bytes as one `prepare` (tested).

PART_FORMAT = 2    # part.json, written by `prepare --shard` and read by `merge`; 2 added the
                   # sizes of each file's .jsonl and .sig, to find a copy cut short


def building(out_dir: str):
    """checkpoint.building (a temporary folder, renamed to OUT when whole), refusing first an
    OUT that already holds a prepared dataset or part."""
    check_new(out_dir)
    return C.building(out_dir)


def check_new(out_dir: str):
    """Refuse an OUT that already holds a prepared dataset or part."""
    if is_complete(out_dir) or os.path.exists(os.path.join(out_dir, "part.json")):
        raise FileExistsError(f"{os.path.abspath(out_dir)!r} already holds a prepared dataset; "
                              "delete it or choose another --out")


def parse_source(spec: str):
    """"NAME[:KIND]=DIR" -> (name, kind, dir); the kind defaults to Table 1's, else "text"."""
    left, sep, folder = spec.partition("=")
    name, _, kind = left.partition(":")
    kind = kind or TABLE1.get(name, (0, 0, "text"))[2]
    check([(sep and folder and re.fullmatch(NAME, name),
            f"bad source {spec!r}: write NAME=DIR or NAME:KIND=DIR, NAME in letters, digits, _ "
            "and -, e.g. github=/data/redpajama/github"),
           (kind in KINDS, f"unknown kind {kind!r} in {spec!r}; choose one of {', '.join(KINDS)}")])
    return name, kind, folder


def _list_sources(sources: List[str]) -> list:
    """[(name, kind, folder, [files])] for sources "NAME[:KIND]=DIR", each checked."""
    specs = [parse_source(s) for s in sources]
    names = [name for name, _, _ in specs]
    if not specs or len(set(names)) != len(names):
        raise ValueError(f"give one or more sources with distinct names, got {names}")
    return [(name, kind, folder, source_files(folder)) for name, kind, folder in specs]


def _check_options(names: list, tokenizer: Optional[str], weights: Optional[dict],
                   val_every: int, vocab_size: int = 260,
                   workers: Optional[int] = None) -> Optional[Tokenizer]:
    """Refuse, before any work starts, a mixture that names unknown sources, a val_every that
    would hold nothing out, a vocabulary too small to train or a worker count below 0 (0: every
    core); return the given tokenizer, loaded (so checked), or None. The command line checks the
    numbers as flags; this is for the calls from Python."""
    unknown = sorted(set(weights or {}) - set(names))
    check([(workers is None or workers >= 0,                   # None or 0: every core
            f"workers={workers} must be at least 1 (or 0: every core)"),
           (tokenizer or vocab_size >= 260,
            f"vocab_size={vocab_size} is too small for byte fallback; use at least 260"),
           (not unknown, f"mixture names {unknown} are not sources; the sources are {names}"),
           (val_every >= 2,
            f"val_every={val_every} must be at least 2 (every Nth document to val)")])
    return Tokenizer(tokenizer) if tokenizer else None


def prepare_shard(sources: List[str], out_dir: str, shard: int, shards: int,
                  language_id: Callable[[str], bool] = looks_english,
                  quality: Optional[Callable[[str], bool]] = None, quiet: bool = False,
                  workers: Optional[int] = None) -> dict:
    """`prepare --shard I/N`: clean and fingerprint files I, I+N, I+2N, ... of the sources (in
    their global order) into a part folder `out_dir`; `merge` joins the N parts, and refuses a
    set that is not 0/N .. N-1/N. Returns the part's part.json. Dedup, tokenizer and mixture
    options belong to `merge`."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard}/{shards}: write I/N with 0 <= I < N, e.g. 0/4")
    listing = _list_sources(sources)
    _check_options([s[0] for s in listing], None, None, VAL_EVERY, workers=workers)
    with building(out_dir) as tmp:
        return _clean_part(tmp, listing, shard, shards, workers,
                           dict(language_id=language_id, quality=quality), quiet)


def merge(parts: List[str], out_dir: str, tokenizer: Optional[str] = None,
          vocab_size: int = 32000, weights: Optional[dict] = None, val_every: int = VAL_EVERY,
          quiet: bool = False, workers: Optional[int] = None) -> dict:
    """Join the part folders of `prepare --shard 0/N ... N-1/N` into one dataset: exact and near
    dedup across all parts, a tokenizer, shards and one manifest -- the same files, byte for
    byte, as one `prepare` over every source. Returns the stats report.

    The dedup decisions do not spread: one process decides some 16,000 documents/s, holding
    8 KB per kept document (its MinHash, 32 LSH bucket entries), so one merge takes about 8M
    documents in 64 GB. Past that (1.4T tokens are some 1.4B documents) near dedup is itself
    split by LSH band, each band's (value, document) pairs sorted on their own machine and the
    duplicate pairs joined by union-find (datatrove's MinHash stages), or kept within a shard
    as CCNet does."""
    found = _read_parts(parts)
    names = [source["name"] for source in found[0][1]["sources"]]
    tok = _check_options(names, tokenizer, weights, val_every, vocab_size, workers)
    with building(out_dir) as tmp:
        return _finish(tmp, found, tok, vocab_size, weights, val_every, workers, quiet)


def _clean_part(folder: str, listing: list, shard: int, shards: int, workers: Optional[int],
                hooks: dict, quiet: bool) -> dict:
    """clean_file on files shard, shard + shards, ... of `listing`, into folder/NAME/00000.*;
    write folder/part.json: the listing (to check that parts fit together) and, per file of
    this part, what was read and dropped, and the sizes of its .jsonl and .sig. Returns the
    part.json."""
    files = [(f"{name}/{k:05d}", path, kind, os.path.join(folder, name, f"{k:05d}"))
             for name, kind, _, paths in listing for k, path in enumerate(paths)]
    for name, *_ in listing:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
    counts = _each_file("clean", clean_file, files[shard::shards], workers, hooks, quiet)
    sources = [dict(name=name, kind=kind, files=[[os.path.relpath(path, root),
                                                  os.path.getsize(path)] for path in paths])
               for name, kind, root, paths in listing]
    part = dict(format=PART_FORMAT, shard=[shard, shards], sources=sources,
                counts=dict(sorted(counts.items())))
    with open(os.path.join(folder, "part.json"), "w") as f:
        json.dump(part, f, indent=1)
    return part


def _read_parts(folders: List[str]) -> list:
    """[(folder, part.json)] of parts that fit together: one run's shards 0..N-1 over the same
    sources and files, each exactly once."""
    parts = []
    for folder in folders:
        path = os.path.join(folder, "part.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder!r} has no part.json: it is not the output of "
                                    "`python data.py prepare --shard I/N ...`")
        part = C.read_json(path, "run its shard again", "part")
        found = part.get("format") if isinstance(part, dict) else None
        if found != PART_FORMAT:
            raise ValueError(f"{folder!r} was written by another version of data.py (part format "
                             f"{found}, this one reads {PART_FORMAT}); run its shard again")
        for key, count in part["counts"].items():  # a part copied between machines, cut short
            for suffix, size in count["sizes"].items():
                path = os.path.join(folder, key + suffix)
                found = os.path.getsize(path) if os.path.isfile(path) else "no"
                if found != size:
                    raise ValueError(f"part {folder!r} is not whole: {key}{suffix} holds {found} "
                                     f"bytes, its part.json says {size} (a copy cut short?); "
                                     "copy the part again")
        if parts and part["sources"] != parts[0][1]["sources"]:
            raise ValueError(f"{folder!r} and {parts[0][0]!r} were prepared from different "
                             "sources or files; run every shard with the same --source flags "
                             "over the same folders")
        parts.append((folder, part))
    shards = parts[0][1]["shard"][1] if parts else 1
    have = sorted(tuple(part["shard"]) for _, part in parts)
    if have != [(i, shards) for i in range(shards)]:
        raise ValueError(f"merge needs the parts 0/N .. N-1/N of one run, each once; got "
                         f"{[f'{i}/{n}' for i, n in have] or 'none'}")
    return parts


# ---------------------------------------------------------------------------------------------
# 9. Dataset checks: a prepared folder against its manifest
# ---------------------------------------------------------------------------------------------

FORMAT = 2  # manifest.json's layout; 2 added the tokenizer's hash. Another format is refused.
NAME = r"[A-Za-z0-9_-]+"  # a source name: a plain folder name, never a path


def is_complete(data_dir: str) -> bool:
    """A build is complete when its manifest exists: the folder appears only once it does."""
    return os.path.isfile(os.path.join(data_dir, "manifest.json"))


def load_manifest(data_dir: str) -> dict:
    """The manifest of a prepared folder, once `check_dataset` found the files to agree with it."""
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{data_dir!r} has no manifest.json: it is not a prepared dataset "
                                "or its build was interrupted; run `python data.py prepare ...`")
    manifest = C.read_json(path, "prepare the dataset again", "manifest")
    try:
        check_dataset(data_dir, manifest)
    except (KeyError, TypeError, AttributeError) as e:
        # not UTF-8 JSON, or a field missing or of the wrong type; check_dataset's errors pass
        raise ValueError(f"{path!r} does not have the layout of a manifest ({type(e).__name__}: "
                         f"{e}); prepare the dataset again") from None
    return manifest


def check_dataset(data_dir: str, manifest: dict) -> None:
    """Refuse a folder whose files are not the ones its manifest describes, before a window is
    served from it: the tokenizer must be the one the shards were made with (its sha256), each
    source a folder inside `data_dir`, each .bin and .idx as long as its counts and dtype imply,
    and 4096 ids sampled evenly from each shard below the vocabulary size. A few milliseconds."""
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{data_dir!r} was prepared by another version of data.py (format "
                         f"{manifest.get('format')}, this one reads {FORMAT}); delete it and "
                         "prepare it again")
    tokenizer = os.path.join(data_dir, "tokenizer.model")
    vocab, dtype = manifest["vocab_size"], manifest["dtype"]
    check([(os.path.isfile(tokenizer) and _sha256(tokenizer) == manifest["tokenizer_sha256"],
            f"{tokenizer!r} is missing or is not the tokenizer the shards were made with (sha256 "
            "differs from the manifest's); put the original back, or prepare the data again with "
            "this one"),
           (dtype == token_dtype(vocab), f"dtype {dtype!r} in {data_dir}/manifest.json is not the "
            f"{token_dtype(vocab)} that {vocab} pieces are stored as; prepare the data again")])
    root = os.path.realpath(data_dir)
    for name, source in manifest["sources"].items():
        if not re.fullmatch(NAME, name):
            raise ValueError(f"source {name!r} in {data_dir}/manifest.json is not a folder name "
                             "(letters, digits, _ and -): a dataset reads only folders inside "
                             "itself; prepare the data again")
        for split in ("train", "val"):
            base, count = os.path.join(data_dir, name, split), source[split]
            for path, size in ((base + ".bin", count["tokens"] * np.dtype(dtype).itemsize),
                               (base + ".idx", (count["documents"] + 1) * 8)):
                if os.path.dirname(os.path.realpath(path)) != os.path.join(root, name):
                    raise ValueError(f"{path!r} leads out of {data_dir} (a symlink to "
                                     f"{os.path.realpath(path)!r}): a dataset reads only files "
                                     "inside itself; copy the files in, or prepare the data "
                                     "again")
                found = os.path.getsize(path) if os.path.isfile(path) else "no"
                if found != size:
                    raise ValueError(f"{path!r} holds {found} bytes where the manifest's "
                                     f"{count['tokens']} {dtype} tokens of {count['documents']} "
                                     f"documents make {size}: a shard of another dtype or "
                                     "build, or a copy cut short; prepare the data again")
            if count["tokens"]:
                tokens = np.memmap(base + ".bin", dtype=dtype, mode="r", shape=(count["tokens"],))
                sample = tokens[np.linspace(0, count["tokens"] - 1, 4096).astype(np.int64)]
                if sample.max() >= vocab:
                    raise ValueError(f"{base}.bin holds token id {sample.max()}, but the "
                                     f"tokenizer has {vocab} pieces: the shard was made with "
                                     "another tokenizer; prepare the data again")


def _sha256(path: str) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def dataset_identity(data_dir: str) -> dict:
    """What a run records of the dataset it reads (train.py keeps it in each checkpoint as
    dataset.json), for --resume to refuse the same folder prepared again: the manifest's
    tokenizer, dtype and default weights, and per source and split the counts and the sha256
    of 4096 ids and 4096 offsets sampled evenly (milliseconds; a full hash would read every
    token of a dataset that may hold a trillion)."""
    manifest = load_manifest(data_dir)
    sources = {}
    for name, source in sorted(manifest["sources"].items()):
        sources[name] = {}
        for split in ("train", "val"):
            base, count = os.path.join(data_dir, name, split), source[split]
            digest = hashlib.sha256()
            for path, dtype, n in ((base + ".bin", manifest["dtype"], count["tokens"]),
                                   (base + ".idx", np.int64, count["documents"] + 1)):
                if n:
                    values = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
                    digest.update(values[np.linspace(0, n - 1, 4096).astype(np.int64)].tobytes())
            sources[name][split] = dict(tokens=count["tokens"], documents=count["documents"],
                                        sample_sha256=digest.hexdigest())
    return dict(tokenizer_sha256=manifest["tokenizer_sha256"], dtype=manifest["dtype"],
                weights=manifest["weights"], sources=sources)


def dataset_changes(saved: dict, now: dict) -> Optional[str]:
    """The first way the dataset `now` differs from the one a run `saved` (dataset_identity),
    in words; None when it is the same. KeyError or TypeError: `saved` is damaged."""
    if saved["tokenizer_sha256"] != now["tokenizer_sha256"] or saved["dtype"] != now["dtype"]:
        return "its tokenizer.model is another one"
    if sorted(saved["sources"]) != sorted(now["sources"]):
        return f"its sources were {sorted(saved['sources'])}, now {sorted(now['sources'])}"
    for name, splits in saved["sources"].items():
        for split in ("train", "val"):
            was, new = splits[split], now["sources"][name][split]
            if (was["tokens"], was["documents"]) != (new["tokens"], new["documents"]):
                return (f"source {name}'s {split} split held {was['tokens']:,} tokens in "
                        f"{was['documents']:,} documents, now {new['tokens']:,} in "
                        f"{new['documents']:,}")
            if was["sample_sha256"] != new["sample_sha256"]:
                return f"source {name}'s {split} split holds other tokens (a sample differs)"
    if saved["weights"] != now["weights"]:
        return f"its default mixture was {saved['weights']}, now {now['weights']}"
    return None


# ---------------------------------------------------------------------------------------------
# 10. Demo corpus: the Python standard library
# ---------------------------------------------------------------------------------------------

# Three sources every Python carries, offline, weighted like Table 1 in miniature: over a run as
# long as the train split (1.7M tokens, Python 3.11) the small `reference` is seen 2.7 times (as
# Wikipedia 2.45), the large `code` 0.7 (GitHub 0.64); `python data.py stats` prints these.
DEMO_WEIGHTS = {"code": 0.5, "docs": 0.3, "reference": 0.2}
DEMO_KINDS = {"code": "code", "docs": "text", "reference": "text"}
DEMO_MB = {"code": 4.0, "docs": 1.5, "reference": 1.0}  # caps, in MB of raw text
DEMO_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
             "pydoc_data", "__pycache__"}  # tests: huge, repetitive; pydoc_data: `reference`


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


def _module_doc(task) -> tuple:
    """Worker: (module, its docstrings as one `docs` document, or "" when it has none)."""
    path, module = task
    try:
        tree = ast.parse(pathlib.Path(path).read_bytes().decode("utf-8", errors="replace"))
    except SyntaxError:
        return module, ""
    entries = [e for e in [ast.get_docstring(tree) or ""] + _module_docs(tree, "") if e]
    return module, f"Module {module}\n\n" + "\n\n".join(entries) if entries else ""


def demo_records(scale: float = 1.0, workers: Optional[int] = None) -> dict:
    """{source: [records]}: `code` = whole .py files, `docs` = one document of docstrings per
    module of the *other* files (so no text sits in two sources), `reference` = the language
    reference topics of pydoc_data."""
    from pydoc_data.topics import topics
    caps = {name: mb * 1e6 * scale for name, mb in DEMO_MB.items()}
    root = sysconfig.get_paths()["stdlib"]
    records = {"code": [], "docs": [], "reference": []}
    size, others = Counter(), []
    for path in stdlib_files():
        source = pathlib.Path(path).read_bytes().decode("utf-8", errors="replace")
        module = os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        if size["code"] + len(source) <= caps["code"]:
            records["code"].append({"text": source, "meta": {"module": module}})
            size["code"] += len(source)
        else:
            others.append((path, module))
    # PERF: parsing modules for their docstrings is most of the demo's reading time, so workers
    # parse them, in order, until the cap is reached; the simple version is a loop over _module_doc.
    docs = _map(_module_doc, others, workers, {}, ordered=True, label="demo's docs")
    for module, text in docs:
        if size["docs"] >= caps["docs"]:
            break
        if text:
            records["docs"].append({"text": text, "meta": {"module": module}})
            size["docs"] += len(text)
    docs.close()  # stops the workers
    for name in sorted(topics):
        if size["reference"] < caps["reference"]:
            records["reference"].append({"text": topics[name], "meta": {"topic": name}})
            size["reference"] += len(topics[name])
    return records


def prepare_demo(out_dir: str, vocab_size: int = 4096, scale: float = 1.0,
                 quiet: bool = False, workers: Optional[int] = None) -> str:
    """Build the demo dataset in `out_dir` (returns at once if it is already complete):
    raw/SOURCE/part-00000.jsonl, part-00001.jsonl, ... of half a megabyte each (so that workers
    share a source), then the ordinary `prepare` with a tokenizer trained on it."""
    if is_complete(out_dir):
        return out_dir
    if not scale > 0:
        raise ValueError(f"scale={scale} must be above 0 (1 is the whole demo, 0.05 a twentieth)")
    with building(out_dir) as tmp:
        sources = []
        for name, records in demo_records(scale, workers).items():
            folder = os.path.join(tmp, "raw", name)
            os.makedirs(folder)
            lines = [json.dumps(r) + "\n" for r in records]
            parts = np.cumsum([len(line) for line in lines]) // 500_000  # part of each record
            for part in np.unique(parts):
                with open(os.path.join(folder, f"part-{part:05d}.jsonl"), "w") as f:
                    f.writelines(line for line, p in zip(lines, parts) if p == part)
            sources.append(f"{name}:{DEMO_KINDS[name]}={folder}")
        _build(tmp, _list_sources(sources), None, vocab_size, DEMO_WEIGHTS, VAL_EVERY,
               dict(language_id=looks_english, quality=None), quiet, workers)
    return out_dir


# ---------------------------------------------------------------------------------------------
# 11. Command line: prepare, merge, stats
# ---------------------------------------------------------------------------------------------

def print_stats(data_dir: str, train_tokens: Optional[float] = None):
    """A table per source: kept and dropped documents, tokens, and the epochs that the weights
    imply for a run of `train_tokens` (default: as many tokens as the training split holds)."""
    manifest = load_manifest(data_dir)
    report = C.read_json(os.path.join(data_dir, "stats.json"), "prepare the dataset again")
    total_w = sum(manifest["weights"].values())
    tokens = {n: s["train"]["tokens"] for n, s in manifest["sources"].items()}
    train_tokens = train_tokens or sum(tokens.values())
    print(f"{data_dir}: {manifest['vocab_size']} pieces ({manifest['dtype']}), "
          f"epochs for a run of {train_tokens:,.0f} tokens")
    print(f"{'source':<14}{'kind':<14}{'weight':>7}{'raw MB':>8}{'read':>9}{'kept':>8}"
          f"{'train tok':>13}{'val tok':>11}{'epochs':>8}  dropped by rule")
    for name, s in report["sources"].items():
        weight = manifest["weights"].get(name, 0) / total_w
        drops = ", ".join(f"{r} {n}" for r, n in sorted(s["dropped"].items(), key=lambda x: -x[1]))
        print(f"{name:<14}{s['kind']:<14}{weight:>7.3f}{s['raw_mb']:>8.1f}{s['read']:>9}"
              f"{s['kept']:>8}{tokens[name]:>13,}{s['val']['tokens']:>11,}"
              f"{weight * train_tokens / max(tokens[name], 1):>8.2f}  {drops or '-'}")


def shard_flag(text: str) -> tuple:
    """"I/N" -> (I, N), 0 <= I < N."""
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not int(m[1]) < int(m[2]):
        raise argparse.ArgumentTypeError(f"use I/N with 0 <= I < N (0/4 is the first of four "
                                         f"shards), not {text!r}")
    return int(m[1]), int(m[2])


def main(argv=None):
    p = OneLineParser(prog="data.py",
                      description="Prepare LLaMA-style pretraining data and inspect it.")
    sub = p.add_subparsers(dest="command", required=True)
    pp, pm, ps = (sub.add_parser(name, help=text) for name, text in (
        ("prepare", "raw folders (or --demo) -> tokenized shards"),
        ("merge", "join the part folders of prepare --shard 0/N .. N-1/N"),
        ("stats", "print what prepare kept, dropped and tokenized")))
    pp.add_argument("--source", action="append", default=[], metavar="NAME[:KIND]=DIR",
                    help=f"a folder of .jsonl/.jsonl.gz/.txt; kinds: {', '.join(KINDS)}")
    pp.add_argument("--demo", action="store_true", help="build the offline stdlib demo corpus")
    pp.add_argument("--scale", type=number(float, 0, above=True),
                    help="size of the --demo corpus: 1 (default) is up to 6.5 MB of text "
                         "(5.7 from Python 3.11's library)")
    pp.add_argument("--shard", type=shard_flag, metavar="I/N",
                    help="clean files I, I+N, I+2N, ... into a part folder for `merge`")
    pm.add_argument("parts", nargs="+", metavar="PART", help="part folders of prepare --shard")
    for q, pieces in ((pp, "32000, 4096 with --demo"), (pm, "32000")):
        q.add_argument("--tokenizer", help="a SentencePiece .model (default: train one)")
        q.add_argument("--vocab-size", type=number(int, 260),
                       help=f"pieces of the tokenizer to train (default {pieces})")
        q.add_argument("--mix", help="default weights stored with the data, e.g. c4=15,github=4.5")
        q.add_argument("--val-every", type=number(int, 2),
                       help=f"every Nth kept document is held out (default {VAL_EVERY})")
        q.add_argument("--out", required=True, help="the folder to build (it must not exist yet)")
        q.add_argument("--quiet", action="store_true", help="no progress lines")
        q.add_argument("--workers", type=number(int, 1), help="processes (default: every core)")
    ps.add_argument("data_dir", help="a prepared dataset folder")
    ps.add_argument("--train-tokens", type=number(float, 0, above=True),
                    help="run length for the epochs column")
    args = p.parse_args(argv)
    if args.command == "prepare":
        for_merge = (args.tokenizer, args.vocab_size, args.mix, args.val_every)
        check([(args.demo != bool(args.source), "give either --demo or one or more --source "
                                                "NAME=DIR"),
               (args.demo or not args.scale, "--scale sizes the --demo corpus; drop it or add "
                                             "--demo"),
               (not args.demo or all(v is None for v in (args.tokenizer, args.mix, args.val_every)),
                "--demo builds its own tokenizer, mixture and validation split; drop "
                "--tokenizer, --mix and --val-every, or prepare --source folders"),
               (not args.shard or not (args.demo or any(v is not None for v in for_merge)),
                "--shard cleans sources into a part; give --tokenizer, --vocab-size, --mix and "
                "--val-every to `data.py merge`")], error=pp.error)
    try:
        if args.command == "stats":
            print_stats(args.data_dir, args.train_tokens)
            return
        start = time.perf_counter()
        # the build never writes into what it reads
        C.check_outputs([("--out", args.out)], [("--tokenizer", args.tokenizer)] + (
            [("PART", part) for part in args.parts] if args.command == "merge" else
            [("--source", parse_source(spec)[2]) for spec in args.source]))
        if args.command == "prepare" and args.shard:
            prepare_shard(args.source, args.out, *args.shard, quiet=args.quiet,
                          workers=args.workers)
        elif args.command == "prepare" and args.demo:
            check_new(args.out)  # prepare_demo keeps a complete one: train.py's first use
            prepare_demo(args.out, args.vocab_size or 4096, args.scale or 1.0, quiet=args.quiet,
                         workers=args.workers)
        else:
            build, inputs = ((merge, args.parts) if args.command == "merge"
                             else (prepare, args.source))
            build(inputs, args.out, args.tokenizer, args.vocab_size or 32000,
                  parse_mix(args.mix) if args.mix else None, args.val_every or VAL_EVERY,
                  quiet=args.quiet, workers=args.workers)
        print(f"{args.out} ready in {time.perf_counter() - start:.1f} s")
    except KeyboardInterrupt:
        sys.exit("interrupted: nothing was left half-written; run the same command again")
    except (ValueError, OSError) as e:  # OSError: a missing or unreadable path, a full disk
        full = getattr(e, "errno", None) == errno.ENOSPC
        sys.exit(f"error: {e}" + ("; free some space or choose an --out on another disk"
                                  if full else ""))


if __name__ == "__main__":
    main()
