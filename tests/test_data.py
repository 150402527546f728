"""Tests for data.py: every cleaning rule (what it removes and what it keeps), exact and near
dedup, shard round trips, builds that are interrupted or killed (nothing half-written is left or
read), the checks of a dataset against its manifest, bad input and flags (one-line errors),
parallel and sharded builds that write the same bytes as one process, the mixture sampler
(shares, epochs, dp independence, resume, speed), and the demo corpus. Corpora are a few
kilobytes, built in tmp_path."""

import errno
import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import torch

import bench_data
import checkpoint as C
import data
from tokenizer import Tokenizer, train_tokenizer


# ---------------------------------------------------------------------------------------------
# Cleaning rules: (rule, input, substrings that must go, substrings that must stay)
# ---------------------------------------------------------------------------------------------

RULE_CASES = [
    (data.c4_boilerplate_lines,
     "Please enable JavaScript to view the comments.\nThis site uses cookies to improve things.\n"
     "The river floods every spring.",
     ["JavaScript", "cookies"], ["The river floods every spring."]),
    (data.c4_terminal_punctuation,
     "Home > News > Local\nIt rained all day.\nShe asked, \"why?\"\nClick here",
     ["Home > News", "Click here"], ["It rained all day.", "She asked, \"why?\""]),
    (data.c4_min_words, "Too short.\nThis line has five words.",
     ["Too short."], ["This line has five words."]),
    (data.code_license_header,
     "# Copyright (c) 2020 Example Corp.\n# Licensed under the MIT License.\n\nimport os\n"
     "print(os.name)  # a comment that stays\n",
     ["Copyright", "MIT License"], ["import os", "print(os.name)  # a comment that stays"]),
    (data.code_license_header,
     "/*\n * Copyright 2019 The Authors. All rights reserved.\n */\nint main(void) { return 0; }\n",
     ["Copyright", "*/"], ["int main(void) { return 0; }"]),
    (data.code_license_header, "# helpers for parsing dates\nimport time\n",
     [], ["# helpers for parsing dates", "import time"]),
    (data.wiki_comments, "Paris <!-- see talk page\n before editing --> is large.",
     ["<!--", "talk page", "-->"], ["Paris ", " is large."]),
    (data.wiki_templates,
     "Paris{{citation needed|date={{CURRENTYEAR}}}} is large.<ref name=a>Smith 2001, p. 4</ref>"
     " It is old.<ref name=a/>",
     ["{{", "citation", "Smith 2001", "<ref"], ["Paris is large. It is old."]),
    (data.wiki_links,
     "[[Paris|The capital]] of [[France]] lies on the Seine.[[Category:Cities]] "
     "[[File:Paris.jpg|thumb|A [[view]] of Paris]] See [https://paris.fr the city site].",
     ["[[", "]]", "Category", "File:", "https://", "thumb"],
     ["The capital of France lies on the Seine.", "See the city site."]),
    (data.wiki_formatting, "== History ==\n'''Paris''' is ''very'' old.<br/>\n=== Name ===",
     ["==", "'''", "''", "<br/>"], ["History\nParis is very old.\nName"]),
    (data.tex_comments,
     "We prove it. % to be checked\n% a whole comment line\nIt costs 50\\% less.",
     ["to be checked", "whole comment line"], ["We prove it. ", "It costs 50\\% less."]),
    (data.tex_inline_macros,
     "\\newcommand{\\R}{\\mathbb{R}}\n\\def\\eps{\\varepsilon}\n"
     "$x \\in \\R^n$, $\\eps > 0$, \\Rset",
     ["\\newcommand", "\\def", "\\R^n", "\\eps "],
     ["$x \\in \\mathbb{R}^n$, $\\varepsilon > 0$", "\\Rset"]),
    (data.tex_body,
     "\\documentclass{article}\n\\usepackage{amsmath}\n\\begin{document}\n\\maketitle\n"
     "\\section{Introduction}\nLLaMA is a model.\n\\begin{thebibliography}{9}\n\\bibitem{a} A.\n",
     ["documentclass", "usepackage", "maketitle", "thebibliography", "bibitem"],
     ["\\section{Introduction}\nLLaMA is a model."]),
    (data.strip_html,
     "<p>Use a <code>&lt;div&gt;</code> here.</p><p>Then <b>style</b> it &amp; go.</p>",
     ["<p>", "<code>", "<b>", "&lt;", "&amp;"], ["Use a <div> here.", "Then style it & go."]),
]


@pytest.mark.parametrize("rule,text,removed,kept", RULE_CASES,
                         ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(RULE_CASES)])
def test_cleaning_rule_removes_and_keeps(rule, text, removed, kept):
    out = rule(text)
    assert out is not None
    for s in removed:
        assert s not in out, f"{rule.__name__} left {s!r} in {out!r}"
    for s in kept:
        assert s in out, f"{rule.__name__} lost {s!r}: {out!r}"


DROP_CASES = [  # (rule, a document it must drop, one it must keep)
    (data.c4_page_filter, "Lorem ipsum dolor sit amet, consectetur.", "A plain page of prose."),
    (data.c4_page_filter, "Use function f() { return 1; } to start.", "A plain page of prose."),
    (data.c4_min_sentences, "One sentence. And two!", "One sentence. And two! Three?"),
    (data.code_line_length, "x = '" + "a" * 1500 + "'\n", "def f(x):\n    return x + 1\n"),
    (data.code_line_length, ("y = " + "1 + " * 40 + "1\n") * 10, "def f(x):\n    return x + 1\n"),
    (data.code_alnum_share, "=-=-=-=-=-=-=-=-=\n*** --- ***\n" * 5, "def f(x):\n    return x\n"),
    (data.tex_body, "\\begin{document}\nJust an abstract, no sections.\n\\end{document}",
     "\\section{A}\ntext"),
]


@pytest.mark.parametrize("rule,drop,keep", DROP_CASES,
                         ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(DROP_CASES)])
def test_document_rules_drop_and_keep(rule, drop, keep):
    assert rule(drop) is None
    assert rule(keep) == keep


def test_a_self_closing_ref_whose_name_holds_a_slash_keeps_the_prose_after_it():
    text = ('Paris is the capital.<ref name="insee/2020"/> It is on the Seine.<ref name="a/b">'
            '{{cite web|url=x}}</ref> The city is old.')
    assert data.wiki_templates(text) == "Paris is the capital. It is on the Seine. The city is old."


def _wiki(text):
    return data.clean_document({"text": text}, "wikipedia", data.rules_for("wikipedia"),
                               Counter())


def test_a_redpajama_wikipedia_record_of_plain_text_meets_no_wikitext_rule():
    # RedPajama's wiki.jsonl was made plain text: "<int>" is C++, "{{ name }}" Jinja, 2'' inches
    text = ("The <p> element defines a paragraph.\nIn C++, std::vector<int> holds integers.\n"
            "Jinja prints a variable with {{ name }}.\nIf a<b and b>c nothing follows.\n"
            "He was 6' 2'' tall.")
    assert _wiki(text) == (text, None)


def test_a_wikitext_table_is_removed_with_its_cells():
    text = ("'''Ada Lovelace''' was a [[mathematician]].\n== Works ==\n{| class=\"wikitable\"\n"
            "|-\n! Year !! Title\n|-\n| 1843 || Notes\n{| \n| nested\n|}\n|}\nShe died in 1852.")
    assert _wiki(text) == ("Ada Lovelace was a mathematician.\nWorks\nShe died in 1852.", None)


def test_a_table_mark_inside_a_line_is_text_as_tex_in_math():
    # MediaWiki opens and closes a table only at the start of a line; inside one, {| and |} are
    # TeX's braces around |x|, and the text between two of them is article text.
    text = ("'''Laplace''' tails are heavier than a Gaussian's <math>e^{|x|^2}</math>.\n"
            "Its characteristic function decays like <math>\\frac{1}{1+|t|}</math>.")
    assert _wiki(text)[0] == ("Laplace tails are heavier than a Gaussian's e^{|x|^2}.\n"
                              "Its characteristic function decays like \\frac{1}{1+|t|}.")
    plain = "A set S with n elements has 2^{|S|-1} subsets of even size, and n^{1/|S|} <a> b."
    assert _wiki(plain) == (plain, None)                     # no wikitext mark: no rule at all


def test_web_line_dedup_across_the_source():
    seen = set()
    page1 = "Home | News | Contact\nCopyright 2019 ACME.\nThe mayor opened the new bridge."
    page2 = "Home | News | Contact\nCopyright 2020 ACME.\n\nThe bridge cost two million."
    assert data.web_line_dedup(page1, seen) == page1  # first sight of every line: all kept
    out = data.web_line_dedup(page2, seen)  # navigation and (digit-normalized) footer repeat
    assert out == "\nThe bridge cost two million."  # the blank separator line stays


def test_english_heuristic():
    assert data.looks_english("The committee met on Tuesday and agreed that the new school "
                              "would be built near the river, which was a surprise to many.")
    assert not data.looks_english("Der Ausschuss traf sich am Dienstag und beschloss, dass die "
                                  "neue Schule in der Nähe des Flusses gebaut wird.")
    assert not data.looks_english("Le comité s'est réuni mardi et a décidé que la nouvelle école "
                                  "serait construite près de la rivière.")
    assert not data.looks_english("SKU 4411 Blue XL cotton; SKU 4412 Red M polyester; 19.99 EUR")


def test_code_license_metadata():
    assert data.code_license_ok({"text": "x", "meta": {"license": "mit"}})
    assert data.code_license_ok({"text": "x", "meta": {"license": "Apache-2.0"}})
    assert data.code_license_ok({"text": "x"})  # unknown: kept
    assert not data.code_license_ok({"text": "x", "meta": {"license": "gpl-3.0"}})


def test_a_record_with_text_and_answers_is_a_text_record():
    # what _is_record accepted as a {"text"} record is cleaned as one (QA dumps carry both)
    for answers in (["Paris"], [{"text": "Paris"}]):
        record = {"text": "Paris is the capital of France.", "answers": answers}
        assert data.clean_document(record, "text", data.rules_for("text"), Counter()) == \
            ("Paris is the capital of France.", None)
    # with its question too: answers that are no thread's objects leave it a text record
    record = {"text": "Paris is the capital of France.", "question": "Capital?",
              "answers": ["Paris"]}
    assert data._is_record(record) and not data._is_thread(record)
    assert data.clean_document(record, "text", data.rules_for("text"), Counter()) == \
        ("Paris is the capital of France.", None)


def test_an_answer_whose_score_is_no_number_sorts_as_zero():
    record = {"question": "Which?", "answers": [
        {"text": "minus one", "score": -1}, {"text": "not scored", "score": "n/a"},
        {"text": "two", "score": "2"}, {"text": "a list", "score": [5]},
        {"text": "nan", "score": "nan"}]}
    assert data.stackexchange_thread(record) == \
        "Q: Which?\n\nA: two\n\nA: not scored\n\nA: a list\n\nA: nan\n\nA: minus one"


def test_a_cpp_license_header_keeps_the_includes_after_it():
    source = ("/* Copyright 2020 Foo Inc. Licensed under the MIT License. */\n#ifndef FOO_H\n"
              "#define FOO_H\n#include <stdio.h>\n#pragma once\n\nint f(void);\n#endif\n")
    assert data.code_license_header(source) == source[source.index("#ifndef"):]
    spaced = ("/* Copyright 2020 Foo Inc. MIT License */\n# include <stdio.h>\n#  define N 3\n"
              "int n;\n")
    assert data.code_license_header(spaced) == spaced[spaced.index("# include"):]


def test_a_shebang_stays_above_a_removed_license_header():
    source = "#!/usr/bin/env python3\n# Copyright 2021 Bar. Apache-2.0 License\n#\nimport os\n"
    assert data.code_license_header(source) == "#!/usr/bin/env python3\nimport os\n"
    assert data.code_license_header("#!/bin/sh\n# no notice here\necho hi\n") == \
        "#!/bin/sh\n# no notice here\necho hi\n"


@pytest.mark.parametrize("header", [
    # a /* */ comment whose lines carry no " * " prefix: one span, whatever its lines start with
    "/*\n   Copyright 2016 The Example Authors.\n\n   Licensed under the Apache License, "
    "Version 2.0 (the \"License\");\n   you may not use this file except in compliance with "
    "the License.\n*/\n\n",
    # ISC and 0BSD write the copyright, the grant and the disclaimer as three paragraphs; the
    # grant and the disclaimer are notices too, not the file's own description
    "// Copyright (c) 2018 Example Authors\n\n"
    "// Permission to use, copy, modify, and distribute this software for any\n"
    "// purpose with or without fee is hereby granted.\n\n"
    "// THE SOFTWARE IS PROVIDED \"AS IS\" AND THE AUTHOR DISCLAIMS ALL WARRANTIES.\n"
    "// IN NO EVENT SHALL THE AUTHOR BE LIABLE FOR ANY DAMAGES.\n\n"])
def test_a_license_header_in_several_paragraphs_is_removed_whole(header):
    code = "package main\n\nfunc main() {}\n"
    assert data.code_license_header(header + code) == code


def test_a_markdown_bullet_list_that_mentions_a_license_is_no_comment():
    readme = ("# fastparse\n\n* Parses 1 GB/s on one core\n* MIT licensed, no dependencies\n\n"
              "Install it with `pip install fastparse`.\n")
    assert data.code_license_header(readme) == readme
    assert data.code_license_header("\n# a note\n\nimport os\n") == "\n# a note\n\nimport os\n"


def test_the_files_own_comment_after_the_license_and_a_blank_line_stays():
    source = ("# Copyright 2021 Jane Doe. Licensed under the MIT license.\n\n"
              "# Fibonacci numbers with memoization.\nimport functools\n")
    assert data.code_license_header(source) == \
        "# Fibonacci numbers with memoization.\nimport functools\n"
    block = ("/* Copyright 2020 Foo Inc. MIT License */\n/* The parser's entry points. */\n"
             "int parse(void);\n")
    assert data.code_license_header(block) == "/* The parser's entry points. */\nint parse(void);\n"
    two_notices = ("# ElementPath\n# Copyright (c) 2003 Fredrik Lundh.\n\n# Licensed to PSF.\n\n"
                   "# XPath support.\nimport re\n")
    assert data.code_license_header(two_notices) == "# XPath support.\nimport re\n"


def test_rust_attributes_right_after_a_license_comment_are_code():
    source = ("// Copyright 2019 The Example Developers. Licensed under the MIT license.\n"
              "#![no_std]\n#[macro_use]\nextern crate alloc;\n")
    assert data.code_license_header(source) == "#![no_std]\n#[macro_use]\nextern crate alloc;\n"


def test_stackexchange_answers_sorted_by_score():
    record = {"question": "How do I sort?", "answers": [
        {"text": "Use bubble sort.", "score": 1}, {"text": "Use sorted().", "score": 10},
        {"text": "Use list.sort().", "score": 5}]}
    text = data.stackexchange_thread(record)
    assert text.startswith("Q: How do I sort?")
    assert text.index("sorted()") < text.index("list.sort()") < text.index("bubble")


def test_a_redpajama_stackexchange_text_record_keeps_its_angle_brackets_and_entities():
    # RedPajama's posts were made plain text by its own processing (BeautifulSoup's get_text):
    # "<" here is code or math, "&lt;" text that a post wrote, neither is a tag to strip
    text = ("Q: Why does List<String> xs = new ArrayList<>(); fail when i < n && n > 0?\n"
            "A: Escape it in HTML as &lt;div&gt;.")
    cleaned = data.clean_document({"text": text}, "stackexchange",
                                  data.rules_for("stackexchange"), Counter())
    assert cleaned == (text, None)


def test_a_raw_stackexchange_thread_loses_the_html_of_its_posts():
    record = {"question": "<p>Why <code>&lt;div&gt;</code>?</p>",
              "answers": [{"text": "<p>Use <b>CSS</b> &amp; go.</p>", "score": 2}]}
    cleaned = data.clean_document(record, "stackexchange", data.rules_for("stackexchange"),
                                  Counter())
    assert cleaned == ("Q: Why <div>?\n\n\nA: Use CSS & go.\n", None)


def _arxiv(text):
    """The cleaned text of one arXiv paper, or the rule that dropped it."""
    cleaned, dropped_by = data.clean_document({"text": text}, "arxiv", data.rules_for("arxiv"),
                                              Counter())
    return cleaned if dropped_by is None else dropped_by


def test_a_preamble_that_restyles_section_keeps_the_body_from_its_first_section():
    # \renewcommand redefines a LaTeX command (here \section's style): nothing to inline
    paper = ("\\documentclass{article}\n\\makeatletter\n\\renewcommand\\section{\\@startsection"
             "{section}{1}{\\z@}{-3.5ex}{2.3ex}{\\normalfont\\Large\\bfseries}}\n\\makeatother\n"
             "\\begin{document}\n\\section{Introduction}\nWe prove a theorem.\n\\end{document}\n")
    assert _arxiv(paper) == "\\section{Introduction}\nWe prove a theorem.\n"


def test_a_section_with_a_short_title_starts_the_body():
    paper = ("\\begin{document}\n\\section[Intro]{Introduction}\nImportant text.\n"
             "\\section[Method]{Our method}\nMethod text.\n\\end{document}\n")
    assert _arxiv(paper) == ("\\section[Intro]{Introduction}\nImportant text.\n"
                             "\\section[Method]{Our method}\nMethod text.\n")


def test_macros_nested_two_braces_deep_or_defined_by_other_macros_are_inlined_in_full():
    paper = ("\\newcommand{\\vx}{\\boldsymbol{\\mathbf{x}}}\n\\newcommand{\\R}{\\mathbb{R}}\n"
             "\\newcommand{\\Rn}{\\R^n}\n\\section{A}\nWe use $\\vx \\in \\Rn$.\n")
    assert _arxiv(paper) == "\\section{A}\nWe use $\\boldsymbol{\\mathbf{x}} \\in \\mathbb{R}^n$.\n"


def test_a_comment_right_after_a_latex_line_break_is_removed():
    paper = "\\section{A}\na & b \\\\% this row goes later\n50\\% kept. % a note\n"
    assert _arxiv(paper) == "\\section{A}\na & b \\\\\n50\\% kept. \n"


def test_the_bibliography_style_is_cut_with_the_bibliography():
    paper = "\\section{A}\nText.\n\\bibliographystyle{plain}\n\\bibliography{refs}\n"
    assert _arxiv(paper) == "\\section{A}\nText.\n"


def test_web_rules_in_order_on_a_page():
    rules = data.rules_for("web")
    page = ("Menu\nAccept our cookie policy to continue reading this page.\nThe council voted "
            "to build a new library in the town centre. It will open next year with a large "
            "collection. Children will have their own floor.\nShare this")
    text, rule = data.clean_document({"text": page}, "web", rules, Counter())
    assert rule is None and text.startswith("The council voted") and "Menu" not in text
    german = {"text": "Der Rat hat beschlossen, eine neue Bibliothek zu bauen. Sie wird im "
                      "nächsten Jahr eröffnet. Kinder haben eine eigene Etage mit vielen Büchern."}
    assert data.clean_document(german, "web", rules, Counter()) == (None, "language_id")


def test_common_crawl_is_cleaned_as_ccnet_and_c4_by_its_own_heuristics():
    # PAPER: CCNet's steps for CommonCrawl, C4's heuristics for C4 only [LLaMA §2.1]
    assert data.TABLE1["common_crawl"][2] == "ccnet" and data.TABLE1["c4"][2] == "web"
    assert [name for name, _ in data.rules_for("ccnet")] == ["web_line_dedup", "language_id"]
    page = ("Getting started\nThe function takes a dictionary such as {\"a\": 1} and returns "
            "the keys in the order they were inserted, which is what the users expect of it.")
    rules = data.rules_for("ccnet", quality=lambda text: "function" in text)
    assert data.clean_document({"text": page}, "ccnet", rules, Counter()) == (page, None)
    assert data.clean_document({"text": page}, "web", data.rules_for("web"), Counter()) == \
        (None, "c4_page_filter")


def test_language_and_quality_hooks_replace_the_heuristics():
    page = {"text": "Der Rat hat beschlossen, eine neue Bibliothek zu bauen. Sie wird im nächsten "
                    "Jahr eröffnet. Kinder haben eine eigene Etage mit vielen Büchern."}
    german = data.rules_for("web", language_id=lambda text: "Rat" in text)
    assert data.clean_document(page, "web", german, Counter())[1] is None
    strict = data.rules_for("web", language_id=lambda text: True,
                            quality=lambda text: len(text) > 1000)
    assert data.clean_document(page, "web", strict, Counter()) == (None, "quality")


# ---------------------------------------------------------------------------------------------
# Deduplication
# ---------------------------------------------------------------------------------------------

def _random_docs(n, words=300, seed=0):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    return [[rng.choice(vocab) for _ in range(words)] for _ in range(n)]


def test_exact_and_near_duplicates_found_distinct_kept():
    docs = _random_docs(20)
    near = list(docs[5])
    near[100:115] = [f"new{i}" for i in range(15)]  # 15 of 300 words changed: ~95% shared
    half = docs[7][:150] + docs[8][150:]  # 50% from each of two documents: not a duplicate
    stream = [" ".join(d) for d in docs] + [" ".join(docs[3]), " ".join(near), " ".join(half)]
    dedup = data.Deduplicator()
    verdicts = [dedup.check(t) for t in stream]
    assert verdicts[:20] == [None] * 20
    assert verdicts[20:] == ["exact_dup", "near_dup", None]


def test_books_threshold_is_ninety_percent_overlap():
    # PAPER: books overlapping by more than 90% are dropped [LLaMA §2.1]; other sources at 0.8
    assert data.NEAR_DUP_OVERLAP["books"] == 0.9 and data.DEFAULT_OVERLAP == 0.8
    book, other = _random_docs(2, words=2000, seed=1)
    copy97 = book[:1940] + other[:60]     # 97% overlap: dropped at 0.9
    copy86 = book[:1730] + other[:270]    # 86% overlap: kept at 0.9, dropped at 0.8
    copy70 = book[:1400] + other[:600]    # 70% overlap: kept at 0.9
    for overlap, variant, expected in ((0.9, copy97, "near_dup"), (0.9, copy86, None),
                                       (0.8, copy86, "near_dup"), (0.9, copy70, None)):
        dedup = data.Deduplicator(overlap)
        assert dedup.check(" ".join(book)) is None
        assert dedup.check(" ".join(variant)) == expected


def test_a_book_wholly_inside_an_anthology_three_times_its_size_is_dropped(tmp_path):
    # overlap 100% > 90%, Jaccard similarity 1/3: books' 64 bands of 2 rows make each such pair
    # a candidate (probability 0.9995); the 128-value MinHash estimate then puts its overlap
    # over 0.9 with probability 0.83 (32 bands of 4 rows found only a third of them)
    docs = []
    for anthology in _random_docs(20, words=15000, seed=2):
        docs += [" ".join(anthology), " ".join(anthology[5000:10000])]
    fingerprint = data.Deduplicator().fingerprint
    with open(tmp_path / "books.sig", "wb") as f:
        f.write(b"".join(fingerprint(text) for text in docs))
    source = {"name": "book", "kind": "books", "files": [("books.jsonl", 1)]}
    count = {"read": len(docs), "dropped": {}, "removed": {}}
    stats, _ = data.dedup_source(source, [("book/00000", str(tmp_path / "books"), count)], 50)
    assert stats["kept"] + stats["dropped"]["near_dup"] == 40
    assert stats["dropped"]["near_dup"] >= 15


def test_prepare_keeps_an_86_percent_copy_of_a_book_but_not_of_a_text(corpus, tmp_path):
    _, model = corpus
    book, other = _random_docs(2, words=2000, seed=1)
    copy86 = book[:1730] + other[:270]
    for name in ("library", "notes"):
        (tmp_path / name).mkdir()
        _write_jsonl(tmp_path / name / "a.jsonl", [" ".join(book), " ".join(copy86)])
    report = data.prepare([f"library:books={tmp_path}/library", f"notes={tmp_path}/notes"],
                          str(tmp_path / "out"), tokenizer=model, quiet=True, workers=1)
    assert report["sources"]["library"]["kept"] == 2                 # books: dropped above 0.9
    assert report["sources"]["library"]["dropped"] == {}
    assert report["sources"]["notes"]["kept"] == 1                   # text: dropped above 0.8
    assert report["sources"]["notes"]["dropped"] == {"near_dup": 1}


# ---------------------------------------------------------------------------------------------
# prepare: shards round-trip, bad input, no partial output
# ---------------------------------------------------------------------------------------------

WIKI_DOCS = [f"'''Town {i}''' is a [[town]] in [[Region {i % 3}|the region]].{{{{Infobox}}}}\n"
             f"== History ==\nIt was founded in {1800 + i} by settlers.<!-- check -->"
             for i in range(12)]
NOTES = [f"Note {i}: the quick brown fox jumps over {i} lazy dogs, then rests under a tree.\n"
         f"Numbers like {i * 37} and symbols like é, ü and 🦙 survive the round trip."
         for i in range(9)]


def _write_jsonl(path, texts):
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two small sources in both layouts (jsonl, jsonl.gz and txt) and a 320-piece tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "wiki").mkdir()
    _write_jsonl(root / "wiki" / "a.jsonl", WIKI_DOCS[:6])
    with gzip.open(root / "wiki" / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in WIKI_DOCS[6:])
    (root / "notes").mkdir()
    for i, t in enumerate(NOTES):
        (root / "notes" / f"{i}.txt").write_text(t, encoding="utf-8")
    model = train_tokenizer(iter((WIKI_DOCS + NOTES) * 3), str(root / "tok.model"), vocab_size=320)
    return root, model


def test_shards_round_trip_to_the_cleaned_text(corpus, tmp_path):
    root, model = corpus
    out = tmp_path / "ds"
    report = data.prepare([f"wiki:wikipedia={root}/wiki", f"notes={root}/notes"], str(out),
                          tokenizer=model, val_every=4, quiet=True)
    assert data.is_complete(str(out))
    manifest = data.load_manifest(str(out))
    assert manifest["dtype"] == "uint16" and manifest["sources"]["wiki"]["kind"] == "wikipedia"
    tok = Tokenizer(str(out / "tokenizer.model"))
    for name, kind, texts in (("wiki", "wikipedia", WIKI_DOCS), ("notes", "text", NOTES)):
        expected = {data.clean_document({"text": t}, kind, data.rules_for(kind), Counter())[0]
                    for t in texts}
        decoded = set()
        for split in ("train", "val"):
            for ids in data.documents(str(out), name, split):
                assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
                decoded.add(tok.decode(ids[1:-1].tolist()))
        assert decoded == expected
        assert report["sources"][name]["kept"] == len(texts)
        assert manifest["sources"][name]["val"]["documents"] == len(range(1, len(texts), 4))
    assert all("[[" not in t and "{{" not in t for t in decoded | expected)


def test_bad_input_is_counted_and_reported(corpus, tmp_path):
    _, model = corpus
    src = tmp_path / "src"
    src.mkdir()
    _write_jsonl(src / "good.jsonl", [f"Document number {i} is fine." for i in range(5)])
    (src / "bad.jsonl").write_bytes(b'{"text": "caf\xe9 in latin-1"}\n{"text": "cut off\n'
                                    b'{"meta": {"no": "text"}}\n{"text": ""}\n')
    (src / "latin1.txt").write_bytes("Schlo\xdf".encode("latin-1"))
    whole = gzip.compress(b'{"text": "A document in a file that was cut short."}\n')
    (src / "truncated.jsonl.gz").write_bytes(whole[:-12])  # the end-of-stream marker is lost
    (src / "empty.txt").write_bytes(b"")
    report = data.prepare([f"misc={src}"], str(tmp_path / "out"), tokenizer=model, quiet=True)
    stats = report["sources"]["misc"]
    assert stats["kept"] == 5
    assert stats["dropped"] == {"bad_utf8": 2, "bad_json": 2, "empty_file": 1, "bad_gzip": 1,
                                "empty_document": 1}
    assert json.load(open(tmp_path / "out" / "stats.json"))["sources"]["misc"]["dropped"] == \
        stats["dropped"]


def test_a_lone_surrogate_in_a_record_is_counted_as_bad_utf8_and_dropped(corpus, tmp_path):
    _, model = corpus
    src = tmp_path / "src"
    src.mkdir()
    # valid JSON that json.loads accepts, but \ud83c alone is half a character: no UTF-8 for it
    (src / "a.jsonl").write_text(
        '{"text": "A llama \\ud83e\\udd99 is a whole character, kept."}\n'
        '{"text": "\\ud83c half of one"}\n'
        '{"question": "Why?", "answers": [{"text": "half \\udd99"}]}\n'
        '{"text": "The last record is fine too."}\n')
    report = data.prepare([f"misc={src}"], str(tmp_path / "out"), tokenizer=model, quiet=True,
                          workers=1)
    assert report["sources"]["misc"]["kept"] == 2
    assert report["sources"]["misc"]["dropped"] == {"bad_utf8": 2}


def _contents(folder):
    """{path inside `folder`: its bytes}; empty if there is no such folder."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(folder) for f in fs}


def _leftovers(folder):
    return sorted(_contents(folder))


def test_bad_sources_refused_before_work_and_nothing_left(corpus, tmp_path):
    root, model = corpus
    out = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.prepare([f"wiki={root}/wiki", f"gone={tmp_path}/missing"], out, tokenizer=model)
    assert not os.path.exists(out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        data.prepare([f"e={tmp_path}/empty"], out, tokenizer=model)
    with pytest.raises(ValueError, match="unknown kind"):
        data.prepare([f"wiki:latex={root}/wiki"], out, tokenizer=model)
    # a source whose every document is filtered away: found after cleaning, before any shard
    (tmp_path / "web").mkdir()
    _write_jsonl(tmp_path / "web" / "a.jsonl", ["menu", "click here", "login"])
    with pytest.raises(ValueError, match="no documents left after filtering"):
        data.prepare([f"wiki={root}/wiki", f"c4={tmp_path}/web"], out, tokenizer=model, quiet=True)
    assert _leftovers(out) == []


def test_a_source_of_zst_files_says_to_decompress_them(corpus, tmp_path):
    _, model = corpus
    folder = tmp_path / "common_crawl" / "2019-30"
    folder.mkdir(parents=True)
    (folder / "en_head_0000.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")  # zstd's magic number
    message = (f"'{folder}/en_head_0000.jsonl.zst' is zstd-compressed, which data.py does not "
               "read; decompress it first with `zstd -d` (it keeps the .zst beside)")
    for done in ([], ["en_head_0001.jsonl"]):     # alone, or beside files decompressed already
        for name in done:
            (folder / name).write_text('{"text": "one document"}\n')
            (folder / (name + ".zst")).write_bytes(b"\x28\xb5\x2f\xfd")
        with pytest.raises(ValueError) as e:
            data.prepare([f"common_crawl={tmp_path}/common_crawl"], str(tmp_path / "out"),
                         tokenizer=model)
        assert str(e.value) == message
    (folder / "en_head_0000.jsonl.zst").unlink()      # every .zst has its decompressed file
    assert data.source_files(str(tmp_path / "common_crawl")) == [str(folder / "en_head_0001.jsonl")]


def test_crash_midway_leaves_no_partial_output(corpus, tmp_path, monkeypatch):
    root, model = corpus
    out = tmp_path / "out"
    real, calls = data.tokenize_file, []

    def crash_on_second_source(task):
        calls.append(task[0])
        if task[0].startswith("notes/"):
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during tokenization
        return real(task)
    monkeypatch.setattr(data, "tokenize_file", crash_on_second_source)
    with pytest.raises(KeyboardInterrupt):
        data.prepare([f"wiki={root}/wiki", f"notes={root}/notes"], str(out), tokenizer=model,
                     quiet=True, workers=1)
    assert any(c.startswith("wiki/") for c in calls)
    assert sorted(os.listdir(tmp_path)) == []  # neither OUT nor its .tmp-out folder


def test_out_must_be_new_or_empty(corpus, tmp_path):
    root, model = corpus
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's file")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        data.prepare([f"notes={root}/notes"], str(out), tokenizer=model, quiet=True)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "the user's file"
    (out / "keep.txt").unlink()  # an empty folder is replaced by the dataset
    data.prepare([f"notes={root}/notes"], str(out), tokenizer=model, quiet=True)
    assert data.is_complete(str(out))
    with pytest.raises(FileExistsError, match="already holds a prepared dataset"):
        data.prepare([f"notes={root}/notes"], str(out), tokenizer=model, quiet=True)


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--source", f"x={tmp_path}/nope", "--tokenizer", "t.model",
                   "--out", str(tmp_path / "o")])
    assert str(e.value).startswith("error: source folder") and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        data.main(["stats", str(tmp_path)])
    assert "no manifest.json" in str(e.value)


def _run_cli(argv, cwd, code):
    """Run `python data.py ARGV` in a fresh interpreter, after the Python lines `code`."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = f"import sys; sys.path.insert(0, {repo!r}); import data\n{code}\ndata.main({argv!r})"
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True)


def test_killed_prepare_leaves_a_leftover_that_is_never_data_and_the_next_run_removes(
        corpus, tmp_path):
    root, model = corpus
    argv = ["prepare", "--source", f"wiki={root}/wiki", "--source", f"notes={root}/notes",
            "--tokenizer", model, "--out", str(tmp_path / "out"), "--quiet"]
    killed = _run_cli(argv, tmp_path, "import os, signal\n"
                      "data.concatenate = lambda *a: os.kill(os.getpid(), signal.SIGKILL)")
    assert killed.returncode == -signal.SIGKILL  # SIGKILL: no handler, no cleanup ran
    assert sorted(os.listdir(tmp_path)) == [".tmp-out"]  # the leftover, under another name
    assert not data.is_complete(str(tmp_path / ".tmp-out"))
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        data.MixtureSampler(str(tmp_path / "out"), 8)
    done = _run_cli(argv, tmp_path, "")
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the leftover is gone, the dataset is whole
    assert data.MixtureSampler(str(tmp_path / "out"), 8).next_batch(2).shape == (2, 9)


def test_killed_while_workers_run_they_die_quietly_and_release_the_build(corpus, tmp_path):
    root, model = corpus
    argv = ["prepare", "--source", f"wiki={root}/wiki", "--source", f"notes={root}/notes",
            "--tokenizer", model, "--out", str(tmp_path / "out"), "--workers", "2"]
    killed = _run_cli(argv, tmp_path, "import cli, os, signal, time\n"  # killed at the first
                      "real = data.clean_file\n"            # result, while a worker still works
                      "def slow(task):\n    time.sleep(0.3)\n    return real(task)\n"
                      "data.clean_file = slow\n"            # the progress line shows each result
                      "cli.Progress.show = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)")
    # run() returns once the workers have closed the stderr they inherited: they have exited
    assert killed.returncode == -signal.SIGKILL and "Traceback" not in killed.stderr
    assert sorted(os.listdir(tmp_path)) == [".tmp-out"]
    data.prepare([f"wiki={root}/wiki"], str(tmp_path / "out"), tokenizer=model, quiet=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("stage,stalls", [("clean", "clean_document"), ("tokenize", "_kept")])
def test_a_worker_killed_mid_stage_fails_the_build_in_one_line(corpus, tmp_path, stage, stalls):
    """SIGKILL of one pool worker, as the out-of-memory killer sends it, in the middle of each
    stage: the build ends within seconds in one line, and leaves neither OUT nor .tmp-OUT (a
    multiprocessing.Pool starts a new worker, loses the task, and its parent waits forever)."""
    root, model = corpus
    marker = tmp_path / "worker.pid"
    argv = ["prepare", "--source", f"wiki={root}/wiki", "--source", f"notes={root}/notes",
            "--tokenizer", model, "--out", str(tmp_path / "out"), "--workers", "2", "--quiet"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = (f"import os, sys, time; sys.path.insert(0, {repo!r}); import data\n"
              f"parent, real = os.getpid(), data.{stalls}\n"
              "def stall(*a, **k):   # a worker of this stage tells its pid, then works forever\n"
              "    if os.getpid() != parent:\n"
              f"        open({str(marker)!r}, 'w').write(str(os.getpid()))\n"
              "        time.sleep(300)\n"
              "    return real(*a, **k)\n"
              f"data.{stalls} = stall\n"
              f"data.main({argv!r})")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(int(marker.read_text()), signal.SIGKILL)
        out, err = proc.communicate(timeout=60)             # today's Pool: a hang, then this fails
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1 and out == ""
    assert err == (f"error: a worker process of the {stage} stage was killed by SIGKILL (the "
                   "out-of-memory killer sends SIGKILL) before it finished its task; nothing was "
                   "written to --out: run again, with fewer --workers if memory ran short\n")
    assert sorted(os.listdir(tmp_path)) == ["worker.pid"]    # no OUT, no .tmp-out


def test_a_build_in_progress_is_not_mistaken_for_a_leftover(tmp_path):
    with C.building(str(tmp_path / "out")) as tmp:
        open(os.path.join(tmp, "x"), "w").close()
        with pytest.raises(FileExistsError, match="another process is building"):
            with C.building(str(tmp_path / "out")):
                pass
        assert os.path.exists(os.path.join(tmp, "x"))  # the running build's files are intact
    assert os.listdir(tmp_path / "out") == ["x"]


@pytest.mark.parametrize("name", ["../outside", "/abs/path", "a/../../outside"])
def test_manifest_sources_must_stay_inside_the_dataset(tmp_path, name):
    folder = make_dataset(tmp_path / "ds", {"a": 100}, {"a": 1})
    manifest = json.load(open(tmp_path / "ds" / "manifest.json"))
    manifest["sources"][name] = manifest["sources"].pop("a")
    manifest["weights"] = {name: 1}
    json.dump(manifest, open(tmp_path / "ds" / "manifest.json", "w"))
    with pytest.raises(ValueError, match="is not a folder name"):
        data.MixtureSampler(folder, 8)
    with pytest.raises(ValueError, match="is not a folder name"):
        data.validation_windows(folder, 8, 2)


@pytest.fixture
def prepared(corpus, tmp_path):
    root, model = corpus
    out = str(tmp_path / "ds")
    data.prepare([f"wiki:wikipedia={root}/wiki", f"notes={root}/notes"], out, tokenizer=model,
                 quiet=True, workers=1)
    return out


def test_a_swapped_tokenizer_is_refused(prepared, tmp_path):
    data.MixtureSampler(prepared, 8)  # the dataset as built is accepted
    other = train_tokenizer(iter(WIKI_DOCS * 3), str(tmp_path / "other.model"), vocab_size=320)
    shutil.copyfile(other, os.path.join(prepared, "tokenizer.model"))  # same vocabulary size
    for read in (lambda: data.MixtureSampler(prepared, 8),
                 lambda: data.validation_windows(prepared, 8, 2)):
        with pytest.raises(ValueError, match="not the tokenizer the shards were made with"):
            read()


def test_a_shard_of_the_wrong_dtype_or_vocabulary_is_refused(prepared):
    path = os.path.join(prepared, "wiki", "train.bin")
    ids = np.fromfile(path, dtype=np.uint16)
    ids.astype(np.uint32).tofile(path)  # the same ids written 4 bytes wide
    with pytest.raises(ValueError, match=rf"holds {4 * len(ids)} bytes where .* uint16 .* make "
                                         rf"{2 * len(ids)}"):
        data.MixtureSampler(prepared, 8)
    (ids + 320).astype(np.uint16).tofile(path)  # right size, ids of a larger vocabulary
    with pytest.raises(ValueError, match="tokenizer has 320 pieces: the shard was made with"):
        data.MixtureSampler(prepared, 8)


def test_a_manifest_of_another_format_or_layout_is_refused(prepared):
    path = os.path.join(prepared, "manifest.json")
    manifest = json.load(open(path))
    json.dump(dict(manifest, format=1), open(path, "w"))
    with pytest.raises(ValueError, match="format 1, this one reads 2"):
        data.MixtureSampler(prepared, 8)
    del manifest["tokenizer_sha256"]
    json.dump(manifest, open(path, "w"))
    with pytest.raises(ValueError, match="does not have the layout of a manifest.*prepare"):
        data.MixtureSampler(prepared, 8)
    json.dump(dict(manifest, sources=[1, 2]), open(path, "w"))
    with pytest.raises(SystemExit, match="^error: .*does not have the layout of a manifest"):
        data.main(["stats", prepared])


@pytest.mark.parametrize("make_loop,message", [
    (lambda src: os.symlink(".", src / "loop"), "leads back to"),            # folder -> itself
    (lambda src: (os.mkdir(src / "sub"), os.symlink("..", src / "sub" / "up")), "leads back to"),
    (lambda src: os.symlink("x.jsonl", src / "x.jsonl"), "symlink loop; fix or remove it"),
    (lambda src: os.symlink("missing.jsonl", src / "gone.jsonl"), "broken symlink"),
])
def test_symlink_loops_are_one_line_errors(corpus, tmp_path, make_loop, message):
    _, model = corpus
    src = tmp_path / "src"
    src.mkdir()
    _write_jsonl(src / "a.jsonl", ["A document."])
    make_loop(src)
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--source", f"s={src}", "--tokenizer", model,
                   "--out", str(tmp_path / "out")])
    assert str(e.value).startswith("error: ") and message in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,make", [
    ("pipe.jsonl", os.mkfifo), ("zero.txt", lambda path: os.symlink("/dev/zero", path))])
def test_a_fifo_or_a_device_among_the_sources_is_named_not_read(corpus, tmp_path, name, make):
    """A FIFO would block the build forever and /dev/zero never end; they were called "a broken
    symlink"."""
    _, model = corpus
    src = tmp_path / "src"
    src.mkdir()
    _write_jsonl(src / "a.jsonl", ["A document."])
    make(src / name)
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--source", f"s={src}", "--tokenizer", model,
                   "--out", str(tmp_path / "out")])
    assert str(e.value) == (f"error: source file {src / name} is not a regular file but a FIFO, "
                            "a device or a socket, which cannot be read to an end; give a file")
    assert not (tmp_path / "out").exists()


def test_a_source_that_is_no_folder_is_called_so(corpus, tmp_path):
    _, model = corpus
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--source", "s=/dev/zero", "--tokenizer", model,
                   "--out", str(tmp_path / "out")])
    assert str(e.value) == ("error: source folder '/dev/zero' is not a folder; give a folder of "
                            ".jsonl, .jsonl.gz, .txt files")


def test_a_txt_document_larger_than_the_bound_is_refused_in_one_line(corpus, tmp_path,
                                                                    monkeypatch):
    _, model = corpus
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.txt").write_text("word " * 400)
    monkeypatch.setattr(C, "TEXT_LIMIT", 1000, raising=False)   # the bound, at test size
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--source", f"s={src}", "--tokenizer", model,
                   "--out", str(tmp_path / "out"), "--workers", "1", "--quiet"])
    assert str(e.value) == (f"error: source file {src}/big.txt holds 2,000 bytes, more than the "
                            "1,000 bytes read at once; split it into documents")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_a_record_longer_than_the_bound_is_skipped_and_counted(corpus, tmp_path, monkeypatch):
    """A jsonl line is read with a bound: one longer (a file with no line breaks) is never held
    whole; it is skipped to its end and counted."""
    _, model = corpus
    src = tmp_path / "src"
    src.mkdir()
    _write_jsonl(src / "a.jsonl", ["Short one.", "x" * 500, "Another short one."])
    monkeypatch.setattr(data, "RECORD_LIMIT", 100, raising=False)
    report = data.prepare([f"s={src}"], str(tmp_path / "out"), tokenizer=model, quiet=True,
                          workers=1)
    assert report["sources"]["s"]["kept"] == 2
    assert report["sources"]["s"]["dropped"] == {"record_too_long": 1}


def test_a_byte_order_mark_does_not_cost_the_first_record(corpus, tmp_path):
    _, model = corpus
    src = tmp_path / "src"
    src.mkdir()
    lines = [json.dumps({"text": f"Document number {i} is fine."}) for i in range(4)]
    (src / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    (src / "bom.txt").write_bytes(b"\xef\xbb\xbfA text file saved by Notepad.")
    report = data.prepare([f"s={src}"], str(tmp_path / "out"), tokenizer=model, quiet=True,
                          workers=1)
    assert report["sources"]["s"]["kept"] == 5 and report["sources"]["s"]["dropped"] == {}
    tok = Tokenizer(model)
    texts = {tok.decode(ids[1:-1].tolist()) for split in ("train", "val")
             for ids in data.documents(str(tmp_path / "out"), "s", split)}
    assert "A text file saved by Notepad." in texts and "Document number 0 is fine." in texts


@pytest.mark.parametrize("out", ["src/ds", "src"])
def test_an_out_inside_a_source_is_refused(corpus, tmp_path, out):
    _, model = corpus
    src = tmp_path / "src"
    src.mkdir()
    _write_jsonl(src / "a.jsonl", ["A document."])
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--source", f"s={src}", "--tokenizer", model,
                   "--out", str(tmp_path / out)])
    assert str(e.value) == (f"error: --out {tmp_path / out} "
                            f"{'is' if out == 'src' else 'lies inside'} --source {src}: writing "
                            "it would overwrite what this command reads; choose an --out "
                            "outside it")
    assert sorted(os.listdir(src)) == ["a.jsonl"]


def test_a_source_folder_symlinked_out_of_the_dataset_is_refused(prepared, tmp_path):
    """The README says a dataset reads only folders inside itself; a link out was followed."""
    outside = tmp_path / "elsewhere"
    shutil.move(os.path.join(prepared, "wiki"), outside)
    os.symlink(outside, os.path.join(prepared, "wiki"))
    with pytest.raises(ValueError, match=r"wiki/train.bin' leads out of .* a dataset reads "
                                         r"only files inside itself"):
        data.MixtureSampler(prepared, 8)


def test_the_identity_of_a_dataset_names_what_changed(corpus, tmp_path):
    root, model = corpus
    sources = [f"wiki:wikipedia={root}/wiki", f"notes={root}/notes"]
    data.prepare(sources, str(tmp_path / "a"), tokenizer=model, quiet=True, workers=1)
    data.prepare(sources, str(tmp_path / "b"), tokenizer=model, val_every=3, quiet=True,
                 workers=1)
    data.prepare(sources, str(tmp_path / "c"), tokenizer=model, quiet=True, workers=1,
                 weights={"wiki": 1, "notes": 3})
    a = data.dataset_identity(str(tmp_path / "a"))
    assert data.dataset_changes(a, data.dataset_identity(str(tmp_path / "a"))) is None
    b = data.load_manifest(str(tmp_path / "b"))["sources"]["notes"]
    assert data.dataset_changes(a, data.dataset_identity(str(tmp_path / "b"))) == (
        f"source notes's train split held {a['sources']['notes']['train']['tokens']:,} tokens in "
        f"{a['sources']['notes']['train']['documents']} documents, now "
        f"{b['train']['tokens']:,} in {b['train']['documents']}")
    assert data.dataset_changes(a, data.dataset_identity(str(tmp_path / "c"))).startswith(
        "its default mixture was {'wiki': ")
    bin_path = tmp_path / "a" / "notes" / "val.bin"
    ids = np.fromfile(bin_path, dtype=np.uint16)
    np.roll(ids, 1).tofile(bin_path)                     # the same counts, other tokens
    assert data.dataset_changes(a, data.dataset_identity(str(tmp_path / "a"))) == (
        "source notes's val split holds other tokens (a sample differs)")


def test_a_full_disk_is_a_one_line_error_and_leaves_nothing(corpus, tmp_path, monkeypatch):
    root, model = corpus

    def fill_up(src, dst, *args):  # the disk fills while the shards are joined
        dst.write(src.read()[:10])
        raise OSError(errno.ENOSPC, "No space left on device", dst.name)
    monkeypatch.setattr(data.shutil, "copyfileobj", fill_up)
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--source", f"notes={root}/notes", "--tokenizer", model,
                   "--out", str(tmp_path / "out"), "--quiet"])
    assert str(e.value).startswith("error: [Errno 28] No space left on device")
    assert str(e.value).endswith("free some space or choose an --out on another disk")
    assert os.listdir(tmp_path) == []


def _fill_up(task):  # at module level: a Pool sends its function to the workers by name
    open(task[3] + ".jsonl", "w").write("half")
    raise OSError(errno.ENOSPC, "No space left on device", task[3] + ".jsonl")


def test_a_full_disk_in_a_worker_process(corpus, tmp_path, monkeypatch):
    root, model = corpus
    monkeypatch.setattr(data, "clean_file", _fill_up)  # forked workers inherit the patch
    with pytest.raises(SystemExit, match=r"^error: \[Errno 28\] No space left on device"):
        data.main(["prepare", "--source", f"wiki={root}/wiki", "--source", f"notes={root}/notes",
                   "--tokenizer", model, "--out", str(tmp_path / "out"), "--workers", "2"])
    assert os.listdir(tmp_path) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A tmpfs of 32 pages of 4 KB; skipped where mounting one is not allowed (it needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", str(disk)])


def test_a_really_full_disk(corpus, tiny_disk):
    root, model = corpus  # the 9 files of notes need 4 pages each, 36 in all: more than the disk
    with pytest.raises(SystemExit, match="No space left on device.*free some space"):
        data.main(["prepare", "--source", f"notes={root}/notes", "--tokenizer", model,
                   "--out", str(tiny_disk / "out"), "--quiet", "--workers", "1"])
    assert os.listdir(tiny_disk) == []
    data.prepare([f"wiki={root}/wiki"], str(tiny_disk / "out"), tokenizer=model, quiet=True)
    assert data.is_complete(str(tiny_disk / "out"))  # the 2 files of wiki fit


FLAG_CASES = [  # (argv, the flag, what the message asks for)
    (["prepare", "--demo", "--out", "o", "--vocab-size", "100"], "--vocab-size", "of at least 260"),
    (["prepare", "--demo", "--out", "o", "--vocab-size", "4k"], "--vocab-size", "of at least 260"),
    (["prepare", "--demo", "--out", "o", "--scale", "0"], "--scale", "a number above 0"),
    (["prepare", "--demo", "--out", "o", "--scale", "nan"], "--scale", "a number above 0"),
    (["prepare", "--demo", "--out", "o", "--scale", "inf"], "--scale", "a number above 0"),
    (["prepare", "--demo", "--out", "o", "--workers", "0"], "--workers", "of at least 1"),
    (["prepare", "--demo", "--out", "o", "--val-every", "1"], "--val-every", "of at least 2"),
    (["prepare", "--source", "a=b", "--out", "o", "--shard", "2/2"], "--shard", "0 <= I < N"),
    (["prepare", "--source", "a=b", "--out", "o", "--shard=-1/2"], "--shard", "0 <= I < N"),
    (["merge", "p", "--out", "o", "--workers", "-3"], "--workers", "of at least 1"),
    (["merge", "p", "--out", "o", "--val-every", "x"], "--val-every", "of at least 2"),
    (["stats", "d", "--train-tokens", "-5"], "--train-tokens", "a number above 0"),
    (["bench", "sampler", "d", "--seq-len", "0"], "--seq-len", "of at least 1"),
    (["bench", "sampler", "d", "--batch", "2.5"], "--batch", "of at least 1"),
    (["bench", "sampler", "d", "--mb", "0"], "--mb", "a number above 0"),
    (["bench", "prepare", "--workers", "1", "0"], "--workers", "of at least 1"),
    (["bench", "prepare", "--mb", "-1"], "--mb", "a number above 0"),
    (["bench", "prepare", "--vocab-size", "10"], "--vocab-size", "of at least 260"),
    (["bench", "sampler", "d", "--workers", "0"], "--workers", "of at least 1"),
    (["merge", "p", "--out", "o", "--vocab-size", "0"], "--vocab-size", "of at least 260"),
]


@pytest.mark.parametrize("argv,flag,asks", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_every_numeric_flag_is_checked_in_one_line(argv, flag, asks, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:        # "bench ...": tests/bench_data.py's flags
        bench_data.main(argv[1:]) if argv[0] == "bench" else data.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: argument {flag}: use ") and asks in err
    assert os.listdir(tmp_path) == []


def test_option_clashes_are_one_line(capsys):
    for argv, says in ((["prepare", "--out", "o"], "either --demo or"),
                       (["prepare", "--source", "a=b", "--out", "o", "--scale", "2"], "--scale"),
                       (["prepare", "--source", "a=b", "--out", "o", "--shard", "0/2",
                         "--vocab-size", "300"], "to `data.py merge`")):
        with pytest.raises(SystemExit) as e:
            data.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and says in err, err


@pytest.mark.parametrize("flag", [["--mix", "code=1"], ["--val-every", "2"],
                                  ["--tokenizer", "t.model"]])
def test_prepare_demo_refuses_the_options_it_does_not_use(flag, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--demo", "--out", str(tmp_path / "o"), *flag])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(
        "error: --demo builds its own tokenizer, mixture and validation split; drop --tokenizer, "
        "--mix and --val-every, or prepare --source folders")
    assert os.listdir(tmp_path) == []


def test_prepare_demo_refuses_an_out_that_holds_a_dataset(prepared):
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--demo", "--scale", "0.01", "--out", prepared])
    assert str(e.value) == (f"error: {os.path.abspath(prepared)!r} already holds a prepared "
                            "dataset; delete it or choose another --out")
    assert data.load_manifest(prepared)["sources"].keys() == {"wiki", "notes"}
    assert data.prepare_demo(prepared) == prepared  # train.py's first use: a complete one is kept


def test_parse_mix():
    assert data.parse_mix("code=0.6, docs=0.3,reference=0.1") == \
        {"code": 0.6, "docs": 0.3, "reference": 0.1}
    assert data.parse_mix("c4=15,common_crawl=67") == {"c4": 15.0, "common_crawl": 67.0}
    for bad, message in (("code", "NAME=WEIGHT"), ("code=-1", "NAME=WEIGHT"),
                         ("code=abc", "NAME=WEIGHT"), ("a=1,a=2", "twice"), ("a=0", "positive"),
                         ("=3", "NAME=WEIGHT")):
        with pytest.raises(ValueError, match=message):
            data.parse_mix(bad)


# ---------------------------------------------------------------------------------------------
# Parallel prepare and shards: the same bytes however the work is divided
# ---------------------------------------------------------------------------------------------

BOILERPLATE = "Subscribe to our newsletter for the latest news from the town."


def _page(rng, i, n=12):
    nouns = ["council", "bridge", "school", "river", "market", "library", "harbour", "museum"]
    verbs = ["opened", "closed", "rebuilt", "visited", "praised", "painted", "measured"]
    return [f"The {rng.choice(nouns)} of town {i} was {rng.choice(verbs)} by {rng.randint(2, 99)} "
            f"people on day {rng.randint(1, 300)} of the year." for _ in range(n)]


@pytest.fixture(scope="module")
def many_files(tmp_path_factory):
    """Three sources in 12 files. c4 pages repeat a boilerplate line in every file, except an
    original (file 0), its exact copy (file 1) and a near copy (file 2): dedup must work across
    files, and across shards once the files are split among them."""
    root, rng = tmp_path_factory.mktemp("many"), random.Random(0)
    pages = ["\n".join([BOILERPLATE] + _page(rng, i)) for i in range(10)]
    original = _page(rng, 10)
    near = list(original)
    near[5] = "A single sentence of this page was changed by an editor, nothing else."
    original, near = "\n".join(original), "\n".join(near)
    files = [[original, pages[1], pages[2]], [pages[3], original, pages[4]],
             [near, pages[5], pages[6]], [pages[7], pages[8], pages[9]]]
    (root / "c4").mkdir()
    for f, file_pages in enumerate(files):
        _write_jsonl(root / "c4" / f"{f}.jsonl", file_pages)
    (root / "wiki").mkdir()
    for f in range(3):
        _write_jsonl(root / "wiki" / f"{f}.jsonl", WIKI_DOCS[4 * f:4 * f + 4])
    (root / "notes").mkdir()
    for f in range(5):
        (root / "notes" / f"{f}.txt").write_text(NOTES[f % 4])  # file 4 repeats file 0
    return [f"c4={root}/c4", f"wiki:wikipedia={root}/wiki", f"notes={root}/notes"]


def _prepare_cli(*argv):
    data.main(["prepare", *argv, "--quiet"])


def test_workers_and_shards_write_the_same_bytes(many_files, tmp_path):
    sources = [arg for s in many_files for arg in ("--source", s)]
    options = ["--vocab-size", "330", "--val-every", "3"]
    _prepare_cli(*sources, *options, "--workers", "1", "--out", str(tmp_path / "one"))
    _prepare_cli(*sources, *options, "--workers", "2", "--out", str(tmp_path / "two"))
    for n, workers in ((2, "2"), (3, "1")):
        parts = [str(tmp_path / f"part{i}of{n}") for i in range(n)]
        for i in range(n):
            _prepare_cli(*sources, "--shard", f"{i}/{n}", "--workers", workers, "--out", parts[i])
        data.main(["merge", *parts[::-1], *options, "--workers", str(3 - int(workers)),
                   "--out", str(tmp_path / f"merged{n}"), "--quiet"])
    one = str(tmp_path / "one")
    for other in ("two", "merged2", "merged3"):
        assert _contents(one) == _contents(str(tmp_path / other)), other
    stats = json.load(open(os.path.join(one, "stats.json")))["sources"]
    assert stats["c4"]["dropped"]["exact_dup"] == 1 and stats["c4"]["dropped"]["near_dup"] == 1
    assert stats["notes"]["dropped"] == {"exact_dup": 1}
    assert (stats["c4"]["kept"], stats["wiki"]["kept"], stats["notes"]["kept"]) == (10, 12, 4)


def test_web_line_dedup_is_per_file(many_files, tmp_path):
    out = str(tmp_path / "ds")
    data.prepare(many_files[:1], out, vocab_size=300, quiet=True, workers=1)
    tok = Tokenizer(os.path.join(out, "tokenizer.model"))
    texts = [tok.decode(ids[1:-1].tolist()) for split in ("train", "val")
             for ids in data.documents(out, "c4", split)]
    # kept in the first page of each file that has it; a dedup across files would keep it once
    assert len(texts) == 10 and sum(BOILERPLATE in t for t in texts) == 4


def test_merge_refuses_parts_that_do_not_fit(many_files, corpus, tmp_path, capsys):
    parts = [str(tmp_path / f"p{i}") for i in range(3)]
    for i in range(3):
        data.prepare_shard(many_files, parts[i], i, 3, quiet=True, workers=1)
    root, _ = corpus
    data.prepare_shard([f"notes={root}/notes"], str(tmp_path / "other"), 0, 1, quiet=True)
    out = str(tmp_path / "out")
    (tmp_path / "no-part").mkdir()
    for given, says in ((parts[:2], "got ['0/3', '1/3']"),
                        ([parts[0], parts[0], parts[1]], "got ['0/3', '0/3', '1/3']"),
                        ([parts[0], str(tmp_path / "other")], "different sources or files"),
                        ([str(tmp_path / "no-part")], "has no part.json")):
        with pytest.raises(SystemExit) as e:
            data.main(["merge", *given, "--out", out])
        assert str(e.value).startswith("error: ") and says in str(e.value)
        assert "\n" not in str(e.value) and not os.path.exists(out)
    part = json.load(open(os.path.join(parts[0], "part.json")))
    assert sorted(part["counts"]) == ["c4/00000", "c4/00003", "notes/00002", "wiki/00002"]


@pytest.mark.parametrize("suffix,keep", [(".jsonl", "whole lines"), (".jsonl", "mid-line"),
                                         (".sig", "mid-line")])
def test_merge_refuses_a_part_whose_files_were_cut_short(many_files, tmp_path, suffix, keep):
    parts = [str(tmp_path / f"p{i}") for i in range(2)]
    for i in range(2):
        data.prepare_shard(many_files, parts[i], i, 2, quiet=True, workers=1)
    path = os.path.join(parts[1], "c4", "00001" + suffix)  # as a killed rsync leaves it
    whole = open(path, "rb").read()
    cut = whole[:whole.index(b"\n") + 1] if keep == "whole lines" else whole[:len(whole) // 2]
    open(path, "wb").write(cut)
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        data.main(["merge", *parts, "--out", out, "--quiet", "--workers", "1"])
    assert str(e.value) == (
        f"error: part {parts[1]!r} is not whole: c4/00001{suffix} holds {len(cut)} bytes, its "
        f"part.json says {len(whole)} (a copy cut short?); copy the part again")
    assert not os.path.exists(out)


def test_a_fingerprint_is_532_bytes():
    dedup = data.Deduplicator()
    assert dedup.record.itemsize == 532 == len(dedup.fingerprint("any text at all, " * 1000))


def test_bench_prints_the_four_ways_to_tokenize(demo_data, capsys):
    bench_data.main(["sampler", demo_data, "--seq-len", "16", "--batch", "4", "--mb", "0.05"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("MixtureSampler: ") and len(lines) == 5
    for line, way in zip(lines[1:], ("sentencepiece, one text a call", "encode_batch, 512 texts",
                                     "C++ threads", "processes (prepare)")):
        assert way in line and float(line.split()[-6]) > 0


def test_bench_prepare_checks_its_runs_agree(demo_data, capsys):
    bench_data.main(["prepare", "--mb", "0.2", "--workers", "1", "2",
               "--tokenizer", os.path.join(demo_data, "tokenizer.model")])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.endswith("same bytes as 1 worker(s): True")
                                   for line in lines)


# ---------------------------------------------------------------------------------------------
# MixtureSampler on synthetic shards: source k holds tokens k*100000 + 0, 1, 2, ...
# ---------------------------------------------------------------------------------------------

def make_dataset(folder, train_tokens: dict, weights: dict, val_tokens: int = 0):
    """Write the documented layout by hand: per source train/val .bin/.idx and manifest.json."""
    sources = {}
    for k, (name, n) in enumerate(train_tokens.items()):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for split, count, base in (("train", n, 0), ("val", val_tokens, 50000)):
            tokens = (k * 100000 + base + np.arange(count)).astype(np.uint32)
            tokens.tofile(os.path.join(folder, name, f"{split}.bin"))
            np.array([0, count], dtype=np.int64).tofile(os.path.join(folder, name, f"{split}.idx"))
        sources[name] = {"kind": "text", "train": {"tokens": n, "documents": 1},
                         "val": {"tokens": val_tokens, "documents": 1}}
    open(os.path.join(folder, "tokenizer.model"), "w").close()  # hash of no bytes: see below
    manifest = dict(format=data.FORMAT, tokenizer="tokenizer.model",
                    tokenizer_sha256=hashlib.sha256(b"").hexdigest(), vocab_size=2**32,
                    dtype="uint32", bos_id=1, eos_id=2, weights=weights, sources=sources)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return str(folder)


@pytest.fixture
def mix(tmp_path):
    return make_dataset(tmp_path, {"a": 20000, "b": 5000, "c": 3001},
                        {"a": 0.6, "b": 0.3, "c": 0.1}, val_tokens=700)


def test_windows_are_contiguous_slices_on_a_grid(mix):
    batch = data.MixtureSampler(mix, seq_len=16).next_batch(64)
    assert batch.shape == (64, 17) and batch.dtype == torch.int64
    assert torch.all(batch[:, 1:] - batch[:, :-1] == 1)       # one contiguous slice each
    assert torch.all((batch[:, 0] % 100000) % 16 == 0)         # starting at a multiple of T


def test_realized_shares_follow_the_weights(mix):
    sampler = data.MixtureSampler(mix, seq_len=16)
    rows = torch.cat([sampler.next_batch(100) for _ in range(100)])  # 10k windows
    counts = torch.bincount(rows[:, 0] // 100000, minlength=3)
    share = counts.double() / len(rows)
    assert torch.allclose(share, torch.tensor([0.6, 0.3, 0.1], dtype=torch.double), atol=0.01)
    assert sampler.tokens_by_source() == {n: c * 17 for n, c in zip("abc", counts.tolist())}


def test_each_epoch_visits_every_window_once_in_a_new_order(mix):
    sampler = data.MixtureSampler(mix, seq_len=16, weights={"c": 1.0})
    n = (3001 - 1) // 16  # 187 windows in source c
    starts = sampler.next_batch(2 * n)[:, 0] % 100000 // 16
    assert sorted(starts[:n].tolist()) == list(range(n)) == sorted(starts[n:].tolist())
    assert starts[:n].tolist() != starts[n:].tolist()
    assert sampler.epochs_by_source() == {"c": 2.0}


def test_epochs_match_table1(tmp_path):
    # Sources sized as Table 1 implies (share / epochs, in windows of 8+1 tokens); a run of as
    # many windows as 1.4T tokens in miniature gives back Table 1's epochs.
    scale = 50
    sizes = {n: round(share / epochs * scale) * 8 + 1
             for n, (share, epochs, _) in data.TABLE1.items()}
    folder = make_dataset(tmp_path, sizes, {n: v[0] for n, v in data.TABLE1.items()})
    sampler = data.MixtureSampler(folder, seq_len=8)  # default weights: the manifest's Table 1
    sampler.next_batch(100 * scale)
    for name, epochs in sampler.epochs_by_source().items():
        assert epochs == pytest.approx(data.TABLE1[name][1], rel=0.03), name


def test_table1_shares_stay_within_one_window_of_their_targets_at_every_step(tmp_path):
    # Deficit scheduling: after t windows, source s has served within one window of w_s * t.
    # The source of a window is read from its tokens (make_dataset numbers source k from
    # k * 100000), so the check does not trust the sampler's own counts.
    folder = make_dataset(tmp_path, {n: 10 * 8 + 1 for n in data.TABLE1},
                          {n: v[0] for n, v in data.TABLE1.items()})
    rows = data.MixtureSampler(folder, seq_len=8).next_batch(20000)
    source = rows[:, 0] // 100000                                         # (windows,)
    served = torch.nn.functional.one_hot(source, len(data.TABLE1)).cumsum(0).double()
    share = torch.tensor([v[0] / 100 for v in data.TABLE1.values()], dtype=torch.double)
    target = torch.arange(1, len(rows) + 1, dtype=torch.double)[:, None] * share
    assert (served - target).abs().max() < 1


def test_global_batch_identical_for_dp_1_2_4(mix):
    def global_batches(dp):
        ranks = [data.MixtureSampler(mix, seq_len=16, seed=3) for _ in range(dp)]
        return [torch.cat([s.next_batch(8, r, dp) for r, s in enumerate(ranks)]) for _ in range(6)]
    one = global_batches(1)
    for dp in (2, 4):
        assert all(torch.equal(x, y) for x, y in zip(one, global_batches(dp)))
    with pytest.raises(ValueError, match="must divide"):
        data.MixtureSampler(mix, seq_len=16).next_batch(6, 0, 4)


def test_resume_continues_exactly(mix, tmp_path):
    straight = data.MixtureSampler(mix, seq_len=16, seed=1)
    expected = [straight.next_batch(32) for _ in range(60)]  # b and c pass an epoch boundary
    first = data.MixtureSampler(mix, seq_len=16, seed=1)
    for _ in range(13):
        first.next_batch(32)
    torch.save(json.loads(json.dumps(first.state_dict())), tmp_path / "state.pt")
    resumed = data.MixtureSampler(mix, seq_len=16, seed=1)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert all(torch.equal(resumed.next_batch(32), e) for e in expected[13:])
    assert resumed.tokens_by_source() == straight.tokens_by_source()
    assert resumed.epochs_by_source() == straight.epochs_by_source()
    other = data.MixtureSampler(mix, seq_len=16, seed=2)
    assert not torch.equal(other.next_batch(32), expected[0])  # the seed matters
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(first.state_dict())


def test_sampler_refuses_bad_configuration(mix):
    with pytest.raises(ValueError, match=r"unknown source\(s\) \['web'\].*\['a', 'b', 'c'\]"):
        data.MixtureSampler(mix, 16, weights={"a": 1, "web": 1})
    with pytest.raises(ValueError, match="fewer than one window"):
        data.MixtureSampler(mix, seq_len=4000)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        data.MixtureSampler(os.path.dirname(mix) + "/nowhere", 16)


def test_validation_windows_are_fixed_and_held_out(mix):
    val = data.validation_windows(mix, seq_len=16, n_windows=20)
    assert val.shape == (20, 17)
    assert torch.equal(val, data.validation_windows(mix, seq_len=16, n_windows=20))
    assert torch.all(val[:, 0] % 100000 >= 50000)  # from the val shards only


def test_batch_assembly_is_fast(tmp_path):
    folder = make_dataset(tmp_path, {"a": 4_000_000, "b": 1_000_000}, {"a": 2, "b": 1})
    sampler = data.MixtureSampler(folder, seq_len=256)
    sampler.next_batch(64)
    start = time.perf_counter()
    for _ in range(20):
        sampler.next_batch(64)
    rate = 20 * 64 * 257 / (time.perf_counter() - start)
    # a 5M-parameter model trains at ~1e4 tokens/s on this CPU: 2e6 leaves a 200x margin
    assert rate > 2e6, f"sampler assembles only {rate:.0f} tokens/s"


# ---------------------------------------------------------------------------------------------
# Demo corpus
# ---------------------------------------------------------------------------------------------

def test_demo_builds_small_and_is_idempotent(tmp_path, capsys):
    out = str(tmp_path / "demo")
    data.prepare_demo(out, vocab_size=512, scale=0.05, quiet=True)
    assert data.is_complete(out)
    manifest = data.load_manifest(out)
    assert manifest["weights"] == data.DEMO_WEIGHTS and manifest["vocab_size"] == 512
    assert all(manifest["sources"][n]["train"]["tokens"] > 1000 for n in data.DEMO_WEIGHTS)
    batch = data.MixtureSampler(out, seq_len=64).next_batch(4)
    assert batch.shape == (4, 65) and batch.max() < 512
    stamp = os.path.getmtime(os.path.join(out, "manifest.json"))
    start = time.perf_counter()
    assert data.prepare_demo(out, vocab_size=512, scale=0.05) == out
    assert time.perf_counter() - start < 1.0 and os.path.getmtime(
        os.path.join(out, "manifest.json")) == stamp
    data.main(["stats", out])
    printed = capsys.readouterr().out
    assert all(name in printed for name in data.DEMO_WEIGHTS)


def test_c4_cuts_citation_marks_before_it_asks_for_a_full_stop_and_drops_a_teaser():
    page = ("The Golden Gate Bridge opened to traffic in May 1937.[1]\n"
            "It was the longest suspension span in the world.[citation needed]\n"
            "Click here to read the rest of this story...")
    assert data.c4_terminal_punctuation(page) == (
        "The Golden Gate Bridge opened to traffic in May 1937.\n"
        "It was the longest suspension span in the world.")


def test_a_files_final_newline_does_not_lower_its_mean_line_length():
    line = "x = " + "1" * 196                                       # 200 characters
    assert len(line) == 200
    assert data.code_line_length(line) is None
    assert data.code_line_length(line + "\n") is None              # still a mean of 200
    assert data.code_line_length("x = 1\n" * 3) == "x = 1\n" * 3
