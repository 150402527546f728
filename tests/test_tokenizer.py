"""Tests for tokenizer.py: Meta's trainer spec (digits, byte fallback, special ids), round trips on
mixed-script text, batch encoding, training reproducible byte for byte, the CLI (one-line errors,
never overwriting a model, nothing left by a full disk), and clear errors for missing or corrupt
model files."""

import errno
import io
import json
import os
import re
import subprocess
import sys

import pytest

import checkpoint as C
import tokenizer as tk
from distributed import ROOT

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "In 1969, 600 million people watched the landing.",
    "Les modèles de langue apprennent à prédire le mot suivant.",
    "Языковые модели предсказывают следующее слово.",
] * 40


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "t.model"
    tk.train_tokenizer(iter(CORPUS), str(path), vocab_size=400)
    return tk.Tokenizer(str(path))


def test_special_ids_as_meta(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, -1)
    assert tok.sp.unk_id() == 0
    assert tok.n_words == 400
    ids = tok.encode("hello", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.encode("hello", bos=False, eos=False) == ids[1:-1]


def test_digits_split_one_per_token(tok):
    pieces = tok.pieces("year 1969 and 600")
    digits = [p.lstrip("▁") for p in pieces if p.lstrip("▁").isdigit()]
    assert digits == list("1969600")


def test_unseen_character_falls_back_to_bytes(tok):
    pieces = tok.pieces("🦙")
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert 0 not in tok.encode("🦙 日本語", bos=False)     # never <unk>


@pytest.mark.parametrize("text", [
    "Mixed: English, français, русский, 日本語, العربية, 🦙 and\ttabs  and   spaces.",
    "    indented code\n\n\nwith blank lines",
    "12345678901234567890",
])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_identity_normalization_keeps_text(tok):
    # NFKC would turn the ligature "ﬁ" into "fi" and the full-width "Ａ" into "A".
    assert tok.decode(tok.encode("ﬁ Ａ")) == "ﬁ Ａ"


def test_cli_trains_from_files(tmp_path, capsys):
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(CORPUS))
    out = tmp_path / "cli.model"
    tk.main(["--train", str(src), "--vocab-size", "400", "--out", str(out)])
    assert tk.Tokenizer(str(out)).n_words == 400
    assert "wrote" in capsys.readouterr().out


def test_cli_encode_prints_a_piece_for_each_id(tok, capsys):
    """The docstring's worked example: "In 2023" is <s> ▁In ▁ 2 0 2 3, ids from 1 (<s>)."""
    tk.main(["--model", tok.path, "--encode", "In 2023 🦙"])
    pieces, ids = capsys.readouterr().out.splitlines()
    assert ids == str(tok.encode("In 2023 🦙", bos=True)) and ids.startswith("[1, ")
    assert pieces.split(" ") == ["<s>", *tok.pieces("In 2023 🦙")]
    assert pieces.split(" ")[-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert len(pieces.split(" ")) == len(json.loads(ids))


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found; train one"):
        tk.Tokenizer(str(tmp_path / "nope.model"))


def test_corrupt_model_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        tk.Tokenizer(str(bad))


def test_too_large_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Please set it to a value <= "):
        tk.train_tokenizer(iter(["tiny text"] * 3), str(tmp_path / "x.model"), vocab_size=5000)
    assert not (tmp_path / "x.model").exists()


def test_cli_error_exits_nonzero(tmp_path):
    with pytest.raises(SystemExit) as e:
        tk.main(["--model", str(tmp_path / "missing.model"), "--encode", "x"])
    assert "not found" in str(e.value.code)


def test_missing_training_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tk.train_tokenizer([str(tmp_path / "absent.txt")], str(tmp_path / "x.model"), vocab_size=300)


def test_text_without_a_sentence_says_so(tmp_path):
    """SentencePiece fails here with no words of its own, only the check that failed: the
    message ended in an empty reason."""
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SystemExit) as e:
        tk.main(["--train", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "x.model")])
    assert e.value.code == ("error: SentencePiece could not train on this text: it holds no "
                            "sentence to learn from (every line is empty); give it some text")
    assert not (tmp_path / "x.model").exists()


@pytest.mark.parametrize("raised,said", [
    ("Internal: src/trainer_interface.cc(683) [(trainer_spec_.vocab_size()) == (model_proto->"
     "pieces_size())] Vocabulary size is too high (32000). Please set it to a value <= 1234.",
     "Vocabulary size is too high (32000). Please set it to a value <= 1234."),
    ("Internal: src/trainer_interface.cc(429) [!sentences_.empty()] ",
     "it holds no sentence to learn from (every line is empty); give it some text"),
    ("INTERNAL: src/trainer_interface.cc(638) [(static_cast<int>(required_chars_.size() + "
     "meta_pieces_.size())) <= (trainer_spec_.vocab_size())] Vocabulary size is smaller than "
     "required_chars. 260 vs 269. Increase vocab_size or decrease character_coverage with "
     "--character_coverage option.",                  # a flag neither script has: ours instead
     "--vocab-size 260 is less than the 269 pieces it needs (256 bytes, <unk> <s> </s>, and one "
     "for each character of the text); give --vocab-size 269 or more"),
    ("Internal: src/trainer_interface.cc(100) [some_check()] ",      # any other wordless one
     "its check `some_check()` failed")])
def test_a_failed_training_is_said_in_sentencepiece_words_or_by_its_check(raised, said):
    """SentencePiece's own words, its source location dropped; where it has none, the check."""
    assert tk.trainer_reason(RuntimeError(raised)) == said

def test_too_small_a_vocabulary_for_the_texts_characters_names_the_size_that_trains(tmp_path):
    text = "".join(chr(c) for c in range(0x3b1, 0x3c9)) * 20 + "\nabc def\n"   # Greek + Latin
    (tmp_path / "t.txt").write_text(text)
    with pytest.raises(SystemExit) as e:
        tk.main(["--train", str(tmp_path / "t.txt"), "--vocab-size", "260",
                 "--out", str(tmp_path / "x.model")])
    needed = int(re.search(r"give --vocab-size (\d+) or more$", e.value.code).group(1))
    assert needed > 260 and not (tmp_path / "x.model").exists()
    tk.main(["--train", str(tmp_path / "t.txt"), "--vocab-size", str(needed),
             "--out", str(tmp_path / "x.model")])                    # the size it names trains
    assert tk.Tokenizer(str(tmp_path / "x.model")).n_words == needed


def test_a_fifo_to_train_on_is_named_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "pipe.txt")                      # SentencePiece would wait forever
    with pytest.raises(SystemExit) as e:
        tk.main(["--train", str(tmp_path / "pipe.txt"), "--out", str(tmp_path / "x.model")])
    assert e.value.code == (f"error: training file '{tmp_path / 'pipe.txt'}' is not a regular "
                            "file (a folder, a FIFO, a device); give a text file")


def test_a_training_file_whose_name_holds_a_comma_is_refused_in_one_line(tmp_path):
    (tmp_path / "a,b.txt").write_text("\n".join(CORPUS))  # SentencePiece splits its input on ","
    with pytest.raises(SystemExit) as e:
        tk.main(["--train", str(tmp_path / "a,b.txt"), "--vocab-size", "400",
                 "--out", str(tmp_path / "x.model")])
    assert e.value.code == (f"error: training file '{tmp_path / 'a,b.txt'}' has a comma in its "
                            "name, which SentencePiece reads as a separator between files; "
                            "rename it or give a link to it without one")
    assert not (tmp_path / "x.model").exists()


def test_encode_without_a_model_asks_for_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        tk.main(["--encode", "hi"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        "error: --encode needs --model PATH, the .model that cuts the text (or --train FILE... "
        "--out PATH.model); see python tokenizer.py --help\n")


def test_encode_batch_is_encode_of_each_text(tok):
    texts = [t for t in CORPUS[:5]] + ["", "🦙 12345"]
    for threads in (1, 2):
        batch = tok.encode_batch(texts, bos=True, eos=True, threads=threads)
        assert [ids.tolist() for ids in batch] == [tok.encode(t, bos=True, eos=True) for t in texts]


def test_training_is_reproducible_byte_for_byte(tmp_path):
    # 300 of 1000 distinct sentences are sampled, always the same 300
    texts = [f"Line {i}: {CORPUS[i % 5]} {CORPUS[(i * 7) % 5][::-1]}" for i in range(1000)]
    paths = []
    for i, threads in enumerate((1, 1, 2)):
        paths.append(tk.train_tokenizer(iter(texts), str(tmp_path / f"{i}.model"), vocab_size=400,
                                        max_sentences=300, num_threads=threads))
    models = [open(p, "rb").read() for p in paths]
    assert models[0] == models[1] and str(tmp_path).encode() not in models[0]
    a, b = tk.Tokenizer(paths[0]), tk.Tokenizer(paths[2])  # the thread count is recorded, no more
    assert [a.sp.id_to_piece(i) for i in range(400)] == [b.sp.id_to_piece(i) for i in range(400)]


def test_the_same_text_gives_the_same_file_on_machines_of_any_core_count(tmp_path):
    """SentencePiece stores the thread count it trained with: were it the machine's cores, data
    prepared again on another machine would hold another tokenizer.model, and --resume would
    refuse it. Each training runs as on a machine of 2 or 64 cores (os.cpu_count patched)."""
    text = tmp_path / "text.txt"
    text.write_text("\n".join(CORPUS))
    (tmp_path / "sitecustomize.py").write_text(
        "import os\nos.cpu_count = lambda: int(os.environ['CORES'])\n")
    models = []
    for cores in ("2", "64"):
        out = tmp_path / f"{cores}.model"
        subprocess.run([sys.executable, "tokenizer.py", "--train", str(text), "--out", str(out),
                        "--vocab-size", "400"], cwd=ROOT, check=True, capture_output=True,
                       env=dict(os.environ, CORES=cores, PYTHONPATH=str(tmp_path)))
        models.append(out.read_bytes())
    assert models[0] == models[1]


@pytest.mark.parametrize("argv", [["--train", "x.txt", "--out", "o.model", "--vocab-size", "259"],
                                  ["--train", "x.txt", "--out", "o.model", "--vocab-size", "1e4"],
                                  ["--train", "x.txt", "--out", "o.model", "--vocab-size",
                                   "9" * 400]])              # too large for a float: no traceback
def test_cli_numeric_flags_are_one_line_errors(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        tk.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: argument --vocab-size: use a whole number of at least 260")
    assert os.listdir(tmp_path) == []


def test_encode_of_text_that_is_not_utf8_is_one_line(tok, tmp_path, capsys):
    path = str(tmp_path / "t.model")
    open(path, "wb").write(tok.sp.serialized_model_proto())
    with pytest.raises(SystemExit) as e:             # bytes that are not UTF-8: surrogates
        tk.main(["--model", path, "--encode", "caf\udce9"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: --encode 'caf\\udce9' is not valid UTF-8 text; "
                                       "give it as UTF-8; see python tokenizer.py --help\n")


def test_cli_never_overwrites_a_model(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("\n".join(CORPUS))
    (tmp_path / "o.model").write_bytes(b"an earlier model")
    with pytest.raises(SystemExit) as e:
        tk.main(["--train", str(tmp_path / "c.txt"), "--vocab-size", "400",
                 "--out", str(tmp_path / "o.model")])
    assert e.value.code == 2 and "already exists; delete it" in capsys.readouterr().err
    assert (tmp_path / "o.model").read_bytes() == b"an earlier model"


def test_an_out_that_cannot_be_written_is_refused_before_the_training(tmp_path, monkeypatch):
    """A path under a regular file can never be written: it was refused only once SentencePiece
    had trained (minutes on a real corpus), as a raw "[Errno 17] File exists"."""
    (tmp_path / "c.txt").write_text("\n".join(CORPUS))
    (tmp_path / "notes").write_text("a file, not a folder")
    trained = []
    monkeypatch.setattr(tk.spm.SentencePieceTrainer, "train", lambda **kw: trained.append(kw))
    out = tmp_path / "notes" / "new" / "o.model"           # the nearest existing path: a file
    with pytest.raises(SystemExit) as e:
        tk.main(["--train", str(tmp_path / "c.txt"), "--vocab-size", "400", "--out", str(out)])
    assert e.value.code == (f"error: --out {out} cannot be written (Not a directory); choose a "
                            "writable path")
    assert trained == []


def test_the_vocabulary_floor_of_260_is_sentencepieces_own(tmp_path, capsys):
    """256 bytes, <unk> <s> </s>, and the "▁" the dummy prefix puts before every text: on spaces
    alone, the one text with no other character, SentencePiece refuses 259 and trains 260."""
    spaces = [" "] * 50
    with pytest.raises(RuntimeError, match="smaller than required_chars. 259 vs 260"):
        tk.spm.SentencePieceTrainer.train(**tk.TRAINER_SPEC, sentence_iterator=iter(spaces),
                                          model_writer=io.BytesIO(), vocab_size=259,
                                          minloglevel=2)
    tok = tk.Tokenizer(tk.train_tokenizer(iter(spaces), str(tmp_path / "o.model"), 260))
    assert tok.n_words == 260 and tok.sp.id_to_piece(259) == "▁"
    with pytest.raises(SystemExit):
        tk.main(["--help"])
    assert "pieces: 260 at least (256 bytes, <unk> <s> </s>, the space piece)" in " ".join(
        capsys.readouterr().out.split())


def test_a_full_disk_leaves_no_model(tmp_path, monkeypatch):
    (tmp_path / "c.txt").write_text("\n".join(CORPUS))

    class FullDisk:  # takes ten bytes, then the disk is full
        def __init__(self, path, mode):
            self.f = open(path, mode)

        def write(self, data):
            self.f.write(data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(C, "open", FullDisk, raising=False)  # checkpoint.py's open(): its writes
    with pytest.raises(SystemExit, match=r"^error: \[Errno 28\] No space left on device$"):
        tk.main(["--train", str(tmp_path / "c.txt"), "--vocab-size", "400",
                 "--out", str(tmp_path / "o.model")])
    assert sorted(os.listdir(tmp_path)) == ["c.txt"]
