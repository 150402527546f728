"""
tokenizer.py -- SentencePiece BPE, trained and used exactly as LLaMA's tokenizer.

LLaMA tokenizes with byte-pair encoding as implemented by SentencePiece [LLaMA §2.1], with two
twists: every number is split into single digits, and a character that is not in the vocabulary
is decomposed into its UTF-8 bytes instead of becoming <unk>. This file trains such a model with
Meta's own trainer settings (read back from the released `tokenizer.model`) and wraps any
`.model` file -- Meta's included, unchanged -- behind a small `Tokenizer` class.

    python tokenizer.py --train corpus.txt --vocab-size 4096 --out demo.model
    python tokenizer.py --model demo.model --encode "In 2023, LLaMA was released."

Reading order
  1. TRAINER_SPEC      Meta's settings, one line each with what it does
  2. train_tokenizer   files or an iterator of strings -> PATH.model, written atomically
  3. Tokenizer         load, encode(text, bos, eos), decode(ids), encode_batch, pieces
  ---------------------------------------------------------------------------- (the banner)
  4. Command line      main: train a model, or show how a text is cut (the kit is cli.py's);
                       its training files and --out checked before the training,
                       SentencePiece's failures in words

A worked example with Meta's 32000-piece model: "In 2023" encodes to
    <s> ▁In ▁ 2 0 2 3
"▁" marks a space (the dummy prefix adds one before the first word, so "In" at the start of a
text and "In" after a space are the same piece); digits are split, so "2023" is four pieces and
the model can learn arithmetic digit by digit. An emoji the vocabulary lacks, "🦙", becomes its
four UTF-8 bytes <0xF0> <0x9F> <0xA6> <0x99>, so no text is ever lost to <unk>.

What this file leaves out:
  - The BPE itself: the pieces are found by SentencePiece's C++ trainer; this file configures it.
  - A padding token (pad_id = -1, as Meta's): batching code pads with its own value.
"""

import io
import os
import re
import sys
import tempfile
from typing import Iterable, List, Union

import sentencepiece as spm

from cli import OneLineParser, number


# ---------------------------------------------------------------------------------------------
# 1. Meta's trainer settings
# ---------------------------------------------------------------------------------------------

# PAPER: read off the `trainer_spec` stored inside Meta's tokenizer.model [LLaMA §2.1].
TRAINER_SPEC = dict(
    model_type="bpe",
    split_digits=True,                 # "2023" -> 2 0 2 3
    byte_fallback=True,                # unknown characters -> their UTF-8 bytes, never <unk>
    allow_whitespace_only_pieces=True, # runs of spaces (code indentation) may be one piece
    character_coverage=0.99995,        # rarer characters are left to byte fallback
    max_sentencepiece_length=16,
    normalization_rule_name="identity",  # no NFKC: text is kept byte for byte
    add_dummy_prefix=True,             # a leading space before the first word
    remove_extra_whitespaces=False,    # keep whitespace exactly (matters for code)
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
)


# ---------------------------------------------------------------------------------------------
# 2. Training
# ---------------------------------------------------------------------------------------------

def train_tokenizer(source: Union[List[str], Iterable[str]], out: str, vocab_size: int = 32000,
                    max_sentences: int = 2_000_000, num_threads: int = 16) -> str:
    """Train a BPE model on text files or on strings; return `out`.

    `source` is either a list of file paths, or an iterator (a generator, `iter(texts)`) of
    strings. SentencePiece reads "sentences": for files, one per line; from an iterator, one each.
    At most `max_sentences` are sampled (the trainer holds them all in memory) with a fixed seed:
    the same text gives the same model, byte for byte. The model is written to a temporary
    file beside OUT and renamed, so an interrupted run never leaves a truncated `out` behind.
    """
    # NOTE: 260 is SentencePiece's own floor: 256 byte pieces, <unk> <s> </s>, and "▁", the
    # space the dummy prefix puts before every text; each other character of the text adds one.
    if vocab_size < 260:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback alone needs 256 "
                         "pieces plus <unk>, <s>, </s> and the space piece; use at least 260")
    if isinstance(source, (list, tuple)):
        check_training_files(source)          # below the banner
        sentences = dict(input=",".join(source))
    else:
        sentences = dict(sentence_iterator=iter(source))
    # NOTE: the model is handed back in memory (model_writer), not written under a model_prefix:
    # SentencePiece stores the prefix inside the model, and a temporary path would make two
    # trainings on the same text differ. The thread count is stored too, though it changes no
    # piece: a fixed 16 (SentencePiece's own default), not this machine's cores, so that the
    # same text gives the same file on any machine (a dataset prepared again elsewhere is the
    # same dataset to --resume).
    model = io.BytesIO()
    spm.set_random_generator_seed(0)  # the same sample of sentences on every run
    try:
        spm.SentencePieceTrainer.train(**TRAINER_SPEC, **sentences, model_writer=model,
                                       vocab_size=vocab_size, input_sentence_size=max_sentences,
                                       shuffle_input_sentence=True, num_threads=num_threads,
                                       minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece could not train on this text: {trainer_reason(e)}") \
            from None
    # NOTE: imported here, not above: checkpoint.py, the one owner of writes, imports this file.
    from checkpoint import write_atomic
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_atomic(out, model.getvalue())
    return out


# ---------------------------------------------------------------------------------------------
# 3. Tokenizer
# ---------------------------------------------------------------------------------------------

class Tokenizer:
    """Any SentencePiece `.model`: encode text to ids and back. Meta's loads unchanged."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model {model_path!r} not found; train one with "
                                    "`python tokenizer.py --train FILE --out PATH.model`")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_path!r} is not a valid SentencePiece model ({e})") from None
        self.path = model_path
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> List[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: List[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def encode_batch(self, texts: List[str], bos: bool = True, eos: bool = False,
                     threads: int = 1) -> list:
        """encode() of many texts at once: a list of int32 numpy arrays, one per text.
        PERF: replaces [encode(t) for t in texts]: one call into SentencePiece's C++ for the
        whole list, no Python list of ids per text; `threads` > 1 shares the list among C++
        threads (data.py runs one process per core instead; tests/bench_data.py times both)."""
        return self.sp.encode(texts, add_bos=bos, add_eos=eos, num_threads=threads,
                              return_type="numpy")

    def pieces(self, text: str) -> List[str]:
        """The pieces of `text`, for looking at what the model sees."""
        return self.sp.encode(text, out_type=str)


def token_dtype(n_words: int) -> str:
    """The id type of a token shard: uint16 when the vocabulary fits (half the bytes), else
    uint32. data.py writes shards with it; eval.py reads them."""
    return "uint16" if n_words <= 2**16 else "uint32"


# =============================================================================================
# Below: what running this file as a script needs -- its flags, and one-line refusals.
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# 4. Command line
# ---------------------------------------------------------------------------------------------

def check_training_files(paths: list):
    """Each a regular file: SentencePiece would wait forever on a FIFO, and call a folder or a
    missing file by another name. No comma in a name: SentencePiece's `input` is the names
    joined by commas, a string the model records (fed another way, the model's bytes differ)."""
    for path in paths:
        if "," in path:
            raise ValueError(f"training file {path!r} has a comma in its name, which "
                             "SentencePiece reads as a separator between files; rename it or "
                             "give a link to it without one")
        if not os.path.exists(path):
            raise FileNotFoundError(f"training file {path!r} does not exist")
        if not os.path.isfile(path):
            raise ValueError(f"training file {path!r} is not a regular file (a folder, a FIFO, a "
                             "device); give a text file")


def check_writable(out: str):
    """A file can be made where --out would go: its nearest existing folder (the folders below
    it are made after the training) takes a temporary file, so a path under a regular file or
    in a read-only folder is refused now, not once the training is done."""
    where = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(where):
        where = os.path.dirname(where)
    try:
        tempfile.TemporaryFile(dir=where).close()       # a regular file here: Not a directory
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written ({e.strerror}); choose a writable "
                         "path") from None


def trainer_reason(e: RuntimeError) -> str:
    """SentencePiece's own words for a failed training, its C++ source location dropped: they
    say what to change ("Vocabulary size is too high (32000). Please set it to a value <= 1234.").
    Some failures carry no words, only the check that failed: those are said here; and one
    carries advice for a flag of SentencePiece's own (--character_coverage), said in ours."""
    text = str(e)
    reason = text.rsplit("] ", 1)[-1].strip()
    if short := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", reason):
        given, needed = short.groups()
        return (f"--vocab-size {given} is less than the {needed} pieces it needs (256 bytes, "
                f"<unk> <s> </s>, and one for each character of the text); give --vocab-size "
                f"{needed} or more")
    if reason:
        return reason
    if "sentences_.empty()" in text:
        return "it holds no sentence to learn from (every line is empty); give it some text"
    check = text[text.find("[") + 1:text.rfind("]")] if "[" in text else text
    return f"its check `{check}` failed"


def main(argv=None):
    p = OneLineParser(prog="tokenizer.py",
                      description="Train or inspect a LLaMA-style SentencePiece BPE.")
    p.add_argument("--train", nargs="+", metavar="FILE", help="text files to train on")
    p.add_argument("--vocab-size", type=number(int, 260), default=32000,
                   help="pieces: 260 at least (256 bytes, <unk> <s> </s>, the space piece) and "
                        "one for each other character of the text; default %(default)s, LLaMA's")
    p.add_argument("--out", help="where to write the trained PATH.model")
    p.add_argument("--model", help="an existing .model to inspect with --encode")
    p.add_argument("--encode", metavar="TEXT", help="print the pieces and ids of TEXT")
    args = p.parse_args(argv)
    if args.encode is not None and not (args.model or args.train):
        p.error("--encode needs --model PATH, the .model that cuts the text (or --train FILE... "
                "--out PATH.model)")
    try:
        if args.train:
            if not args.out:
                p.error("--train needs --out PATH.model")
            if os.path.exists(args.out):
                p.error(f"--out {args.out} already exists; delete it or choose another path")
            check_writable(args.out)            # before the training, which may take minutes
            train_tokenizer(args.train, args.out, vocab_size=args.vocab_size)
            print(f"wrote {args.out} ({Tokenizer(args.out).n_words} pieces)")
        if args.encode is not None:
            try:
                args.encode.encode("utf-8")
            except UnicodeEncodeError:           # bytes that are not UTF-8 arrive as surrogates
                p.error(f"--encode {args.encode!r} is not valid UTF-8 text; give it as UTF-8")
            tok = Tokenizer(args.model or args.out or "")
            ids = tok.encode(args.encode)                      # <s> first, as the model reads it
            print(" ".join(tok.sp.id_to_piece(i) for i in ids))    # one piece for each id
            print(ids)
        if not args.train and args.encode is None:
            p.error("nothing to do: give --train FILE... --out PATH.model, or --model PATH "
                    "--encode TEXT")
    except (ValueError, OSError) as e:  # OSError: a missing, unreadable or full-disk path
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
