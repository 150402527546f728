"""Tests for tokenizer.py: Meta's trainer spec (digits, byte fallback, special ids), round trips on
mixed-script text, the CLI, and clear errors for missing or corrupt model files."""

import pytest

import tokenizer as tk

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
