"""
bench_data.py -- data.py's speed: the sampler's tokens/s, the tokenizer's MB/s four ways, and
prepare's MB/s with 1, 2, ... worker processes (checking that every run writes the same bytes).

    PYTHONPATH=. python tests/bench_data.py sampler data/demo --seq-len 256
    PYTHONPATH=. python tests/bench_data.py prepare --mb 96 --workers 1 2

Timings on a shared machine vary: read ratios, not absolute figures, and rerun.
"""

import contextlib
import json
import os
import random
import sys
import tempfile
import time
from typing import List, Optional

import data
from cli import OneLineParser, number
from data import (DEMO_MB, MixtureSampler, _map, _sha256, _train_on, _WORKER, default_workers,
                  demo_records, documents, load_manifest, prepare)
from tokenizer import Tokenizer


def sampler(data_dir: str, seq_len: int, batch: int, mb: float = 8.0,
          workers: Optional[int] = None, steps: int = 50):
    """Print the tokens per second that MixtureSampler assembles (one process, dp = 1), then the
    MB/s of the dataset's tokenizer encoding the same `mb` MB of its documents (decoded back from
    the train shards) four ways: one text per call (Tokenizer.encode); one call per 512 texts
    (Tokenizer.encode_batch); that call shared among `workers` C++ threads; and `workers`
    processes, each encoding its texts as `prepare` does."""
    sampler = MixtureSampler(data_dir, seq_len)
    sampler.next_batch(batch)  # first touch of the memory maps
    start = time.perf_counter()
    for _ in range(steps):
        sampler.next_batch(batch)
    rate = steps * batch * (seq_len + 1) / (time.perf_counter() - start)
    print(f"MixtureSampler: {rate / 1e6:.1f} M tokens/s (seq_len {seq_len}, batch {batch})")

    workers = workers or default_workers()
    tok, texts = Tokenizer(os.path.join(data_dir, "tokenizer.model")), []
    sources = load_manifest(data_dir)["sources"]
    for name in sources:  # an equal share of text from each source
        size = 0
        for doc in documents(data_dir, name):
            if size >= mb * 1e6 / len(sources):
                break
            texts.append(tok.decode(doc[1:-1]))
            size += len(texts[-1].encode())
    total = sum(len(t.encode()) for t in texts) / 1e6
    batches = [texts[i:i + 512] for i in range(0, len(texts), 512)]

    def encode_batch(threads):
        return sum(len(ids) for b in batches for ids in tok.encode_batch(b, eos=True,
                                                                         threads=threads))
    ways = [  # (name, cores, a run that returns the number of ids)
        ("sentencepiece, one text a call", 1,
         lambda: sum(len(tok.encode(t, bos=True, eos=True)) for t in texts)),
        ("encode_batch, 512 texts a call", 1, lambda: encode_batch(1)),
        (f"encode_batch, {workers} C++ threads", workers, lambda: encode_batch(workers)),
        (f"{workers} processes (prepare)", workers,  # tasks of 64 texts, so that no process waits
         lambda: sum(_map(_encode_count, [texts[i:i + 64] for i in range(0, len(texts), 64)],
                          workers, dict(tokenizer=tok)))),
    ]
    counts = set()
    for way, cores, run in ways:
        start = time.perf_counter()
        counts.add(run())
        rate = total / (time.perf_counter() - start)
        print(f"tokenize, {way:<34} {rate:6.2f} MB/s  {rate / cores:6.2f} MB/s per core")
    if len(counts) != 1:
        raise RuntimeError(f"the ways to tokenize disagree on the number of ids: {counts}")


def _encode_count(texts: List[str]) -> int:
    """Worker of sampler: encode a batch as prepare does, return its number of ids."""
    return sum(len(ids) for ids in _WORKER["tokenizer"].encode_batch(texts, bos=True, eos=True))


def _bench_corpus(folder: str, mb: float, records: dict, files: int = 16) -> List[str]:
    """`mb` MB of jsonl, `files` files per source, from the demo's `records`: documents of five
    20-line pieces drawn at random, so that they read like the demo's yet are all distinct. The
    `docs` source is cleaned as web text, the kind most of LLaMA's data is."""
    rng, sources = random.Random(0), []
    for name, kind in (("code", "code"), ("docs", "web"), ("reference", "text")):
        lines = [line for r in records[name] for line in r["text"].split("\n")]
        pieces = ["\n".join(lines[i:i + 20]) for i in range(0, len(lines) - 20, 20)]
        budget = mb * 1e6 * DEMO_MB[name] / sum(DEMO_MB.values()) / files
        os.makedirs(os.path.join(folder, name))
        for f in range(files):
            with open(os.path.join(folder, name, f"part-{f:05d}.jsonl"), "w") as out:
                while out.tell() < budget:
                    out.write(json.dumps({"text": "\n\n".join(rng.sample(pieces, 5))}) + "\n")
        sources.append(f"{name}:{kind}={folder}/{name}")
    return sources


def bench_prepare(mb: float, workers: List[int], tokenizer: Optional[str] = None,
                  vocab_size: int = 8000):
    """Time `prepare` of one `mb` MB corpus (_bench_corpus) with each number of workers, and
    check that every run writes the same bytes; print one line per run. The tokenizer is given
    (default: one of `vocab_size` pieces trained on the demo's text beforehand, untimed)."""
    records = demo_records()
    with tempfile.TemporaryDirectory() as tmp:
        sources = _bench_corpus(os.path.join(tmp, "raw"), mb, records)
        if tokenizer is None:
            tokenizer = _train_on((r["text"] for texts in records.values() for r in texts),
                                  os.path.join(tmp, "tok.model"), vocab_size)
        for run, n in enumerate(workers):
            out = os.path.join(tmp, f"out-{run}")
            start = time.perf_counter()
            with stage_seconds() as stages:
                report = prepare(sources, out, tokenizer=tokenizer, workers=n, quiet=True)
            seconds = time.perf_counter() - start
            first = seconds if run == 0 else first
            stats = report["sources"].values()
            tokens = sum(s[split]["tokens"] for s in stats for split in ("train", "val"))
            raw, read = sum(s["raw_mb"] for s in stats), sum(s["read"] for s in stats)
            print(f"prepare {mb:g} MB, {n} workers: {seconds:.1f} s ("
                  f"{', '.join(f'{k} {v:.1f}' for k, v in stages.items())}), "
                  f"{raw / seconds:.1f} MB/s, speedup {first / seconds:.2f}, "
                  f"{tokens / seconds / n * 3600 / 1e9:.2f} G tokens/h per core, "
                  f"dedup {read / max(stages['dedup'], 1e-9):,.0f} documents/s, same bytes as "
                  f"{workers[0]} worker(s): {_same_files(out, os.path.join(tmp, 'out-0'))}")


@contextlib.contextmanager
def stage_seconds():
    """Yield {stage: seconds}, filled while a build runs in the block: data.py's stages are
    wrapped with a clock (the work of the workers is timed by the _each_file call that waits
    for it, under its label), and put back at the end."""
    seconds = dict(clean=0.0, dedup=0.0, tokenizer=0.0, tokenize=0.0)
    stage_of = {"_each_file": None, "dedup_source": "dedup", "_train_on": "tokenizer",
                "concatenate": "tokenize"}                # None: the label, "clean" or "tokenize"
    real = {name: getattr(data, name) for name in stage_of}

    def clocked(name):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real[name](*args, **kwargs)
            finally:
                seconds[stage_of[name] or args[0]] += time.perf_counter() - start
        return run
    for name in real:
        setattr(data, name, clocked(name))
    try:
        yield seconds
    finally:
        for name, fn in real.items():
            setattr(data, name, fn)


def _same_files(a: str, b: str) -> bool:
    """Whether two folders hold the same files with the same bytes."""
    def contents(folder):  # {path inside the folder: sha256 of its bytes}
        return {os.path.relpath(os.path.join(d, name), folder): _sha256(os.path.join(d, name))
                for d, _, names in os.walk(folder) for name in names}
    return contents(a) == contents(b)



def main(argv=None):
    p = OneLineParser(prog="tests/bench_data.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ps = sub.add_parser("sampler", help="the sampler's tokens/s and the tokenizer's MB/s")
    pr = sub.add_parser("prepare", help="time prepare of one corpus with 1, 2, ... workers")
    ps.add_argument("data_dir")
    ps.add_argument("--seq-len", type=number(int, 1), default=2048)
    ps.add_argument("--batch", type=number(int, 1), default=64)
    ps.add_argument("--workers", type=number(int, 1),
                    help="threads and processes (default: every core)")
    pr.add_argument("--tokenizer", help="a SentencePiece .model (default: train one)")
    pr.add_argument("--vocab-size", type=number(int, 260),
                    help="pieces of the tokenizer to train (default 8000)")
    pr.add_argument("--workers", type=number(int, 1), nargs="+", default=[1, default_workers()])
    for q, mb, what in ((ps, 8.0, "tokenize"), (pr, 96.0, "prepare")):
        q.add_argument("--mb", type=number(float, 0, above=True), default=mb,
                       help=f"MB of text to {what}")
    args = p.parse_args(argv)
    try:
        if args.command == "sampler":
            sampler(args.data_dir, args.seq_len, args.batch, args.mb, args.workers)
        else:
            bench_prepare(args.mb, args.workers, args.tokenizer, args.vocab_size or 8000)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
