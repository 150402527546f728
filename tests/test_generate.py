"""Tests for generate.py: cached decoding against full recomputation, the static (CUDA-graph)
and compiled steps against the eager forward, sampling rules, tensor-parallel decoding on two gloo
workers against one process, Meta's sharded layout, the Hugging Face export (weights against an
independent rotate-half forward written here, tokenizer.json against a byte-pair merge by hand,
and transformers itself, which the test command installs: a varied corpus, logits, greedy and
padded generation without a warning; SentencePiece models of another kind refused), the command
line, and one-line errors on bad input."""

import contextlib
import io
import json
import os
import random
import shutil
from dataclasses import asdict

import pytest
import sentencepiece as spm
import torch

import bench_cpu
import checkpoint as C
import generate as G
import model as M
from distributed import spawn
from tokenizer import TRAINER_SPEC, Tokenizer, train_tokenizer

WORDS = ("the a cat dog sat on mat question answer yes no is it true that sun moon water fire "
         "tree house bird fish runs jumps eats big small red blue green because when where what "
         "who why how one two three and or but with").split()


def tiny_text(n_lines=400, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) + rng.choice(".?!")
            for _ in range(n_lines)]


pytestmark = pytest.mark.usefixtures("one_thread")        # tests/conftest.py


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    return train_tokenizer(iter(tiny_text()), path, vocab_size=320)


def tiny_model(seed=0, **kw):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=16,
                max_seq_len=64)
    torch.manual_seed(seed)
    return M.Transformer(M.ModelArgs(**{**base, **kw})).eval()


def write_checkpoint(folder, model, tok_path, n_shards=1, meta=False):
    """Our layout (params.json = asdict(ModelArgs)), or Meta's release layout: only Meta's keys
    in params.json, vocab_size -1, tokenizer.model in the parent folder."""
    os.makedirs(folder, exist_ok=True)
    params = asdict(model.args)
    if meta:
        params = {k: params[k] for k in ("dim", "multiple_of", "n_heads", "n_layers", "norm_eps")}
        params["vocab_size"] = -1
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f)
    for i, shard in enumerate(C.split_state_dict(model.state_dict(), n_shards)):
        torch.save(shard, os.path.join(folder, f"consolidated.{i:02d}.pth"))
    where = os.path.dirname(os.path.abspath(folder)) if meta else folder
    shutil.copyfile(tok_path, os.path.join(where, "tokenizer.model"))
    return str(folder)


def greedy_by_recomputation(model, prompt, n):
    """The plain definition: run the whole sequence again for every new token, no cache."""
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq]))                    # (1, T, V)
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


# --- decoding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("static", [False, True])
def test_cached_batched_decoding_equals_full_recomputation(static):
    model = tiny_model()
    prompts = [[1, 5, 9, 200, 17, 3, 44, 81, 12], [1], [1, 77, 78, 79]]   # different lengths
    outs = G.generate_tokens(model, prompts, 8, temperature=0.0, static=static)
    for prompt, out in zip(prompts, outs):
        assert out == greedy_by_recomputation(model, prompt, 8)
    assert model.layers[0].attention.cache_k is None              # the cache is released


def test_compiled_decoding_equals_plain_decoding():
    # On CPU at batch 1 the compiled step multiplies by each weight as a product and a sum
    # (model.Linear); the tokens must be those of the plain forward.
    model = tiny_model()
    for prompts in ([[1, 5, 9, 200, 17]], [[1, 5, 9], [1, 77]]):
        plain = G.generate_tokens(model, prompts, 8, temperature=0.0)
        assert G.generate_tokens(model, prompts, 8, temperature=0.0, static=True,
                                 compile=True) == plain


def test_compiled_decoding_compiles_once():
    # The step is compiled before the prefill, for the very shapes and strides every later step
    # passes: a recompilation inside the timed decode would be an error here.
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        G.generate_tokens(tiny_model(), [[1, 5, 9, 200, 17]], 8, temperature=0.0, static=True,
                          compile=True)


def test_eos_stops_each_row_and_is_excluded():
    model = tiny_model()
    prompts = [[1, 10, 11], [1, 12]]
    free = G.generate_tokens(model, prompts, 10, temperature=0.0)
    eos = free[0][3]
    outs = G.generate_tokens(model, prompts, 10, temperature=0.0, eos_id=eos)
    assert outs[0] == free[0][:free[0].index(eos)]
    assert outs[1] == (free[1][:free[1].index(eos)] if eos in free[1] else free[1])
    assert all(len(o) == 10 for o in free)                        # max_new_tokens per row


def test_sampling_rules():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    assert torch.equal(G.sample(logits, temperature=0), logits.argmax(-1))
    # a tiny temperature is greedy, not inf / inf = nan
    assert torch.equal(G.sample(logits * 30, temperature=1e-40, generator=g), logits.argmax(-1))
    assert torch.equal(G.sample(logits, 1.0, top_p=1.0, top_k=1, generator=g), logits.argmax(-1))
    # probabilities 0.5 0.3 0.15 0.05: the nucleus of p=0.7 is {0, 1} (0.5 < 0.7 <= 0.8)
    row = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    drawn = G.sample(row, 1.0, top_p=0.7, generator=g)
    assert set(drawn.tolist()) == {0, 1}
    assert abs((drawn == 0).float().mean().item() - 0.5 / 0.8) < 0.04   # renormalized
    assert set(G.sample(row, 1.0, top_p=1.0, top_k=3, generator=g).tolist()) == {0, 1, 2}
    assert set(G.sample(row, 1.0, top_p=1.0, generator=g).tolist()) == {0, 1, 2, 3}
    # temperature 0.5 squares the probabilities: token i comes p_i^2 / sum_j p_j^2 of the time
    # (0.25 / 0.365 = 0.685 for token 0); 20,000 draws put each share within 0.02 (6 sigma)
    many = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(20000, 4)
    drawn = G.sample(many, 0.5, top_p=1.0, generator=g)
    shares = torch.bincount(drawn, minlength=4).float() / len(drawn)
    want = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    assert torch.allclose(shares, want / want.sum(), atol=0.02), shares


def test_seed_makes_sampling_reproducible():
    model = tiny_model()
    prompts = [[1, 3, 5], [1, 7]]
    a = G.generate_tokens(model, prompts, 12, temperature=1.0, top_p=0.95, seed=3)
    b = G.generate_tokens(model, prompts, 12, temperature=1.0, top_p=0.95, seed=3)
    c = G.generate_tokens(model, prompts, 12, temperature=1.0, top_p=0.95, seed=4)
    assert a == b and a != c


def test_text_api_keeps_the_leading_space(tok_path):
    model, tok = tiny_model(), Tokenizer(tok_path)
    texts = G.generate(model, tok, ["the cat sat", "a dog"], max_new_tokens=6, temperature=0)
    ids = G.generate_tokens(model, [tok.encode(p) for p in ["the cat sat", "a dog"]], 6,
                            temperature=0, eos_id=tok.eos_id)
    for prompt, text, new in zip(["the cat sat", "a dog"], texts, ids):
        assert prompt + text == tok.decode(tok.encode(prompt) + new)


def test_prompt_too_long_is_refused():
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        G.generate_tokens(tiny_model(), [[1] * 60], 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_decoding_equals_plain_decoding(compile):
    model = tiny_model(max_seq_len=128).cuda()
    prompts = [[1, 5, 9, 200], [1], [1, 77, 78, 79, 80, 81]]
    plain = G.generate_tokens(model, prompts, 16, temperature=0.0)
    graph = G.generate_tokens(model, prompts, 16, temperature=0.0, static=True, cuda_graph=True,
                              compile=compile)
    assert plain == graph


def generate_on_a_rank(argv) -> str:
    """One rank of `torchrun generate.py ARGV` (distributed.spawn sets torchrun's variables):
    what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        G.main(argv)
    return printed.getvalue()


@pytest.mark.slow
def test_tensor_parallel_generation_equals_one_process(tmp_path, tok_path, capsys):
    pytest.importorskip("parallel")
    ckpt = write_checkpoint(tmp_path / "tp", tiny_model(), tok_path, n_shards=2)
    argv = ["--ckpt", ckpt, "--device", "cpu", "--prompt", "the cat", "--prompt",
            "is it true that", "--max-new-tokens", "8", "--temperature", "0.8", "--seed", "5"]
    G.main(argv)
    expected = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    rank0, rank1 = spawn(generate_on_a_rank, 2, argv + ["--tp", "2"])
    assert [line for line in rank0.splitlines() if line.startswith("[")] == expected
    assert len(expected) == 2
    assert rank1 == ""                                          # only rank 0 prints


# --- loading -----------------------------------------------------------------------------------

def test_ours_loads_with_same_logits_and_fp32_rope(tmp_path, tok_path):
    model = tiny_model()
    ckpt = write_checkpoint(tmp_path / "ours", model, tok_path)
    loaded, tok = G.load_model(ckpt)
    x = torch.tensor([[1, 5, 9, 13]])
    assert torch.equal(loaded(x), model(x)) and tok.n_words == 320
    half, _ = G.load_model(ckpt, dtype=torch.bfloat16, max_seq_len=32)
    assert half.output.weight.dtype == torch.bfloat16 and half.rope_cos.dtype == torch.float32
    assert half.rope_cos.shape[0] == 32 and not half.training


def test_meta_two_shards_equal_one_shard(tmp_path, tok_path):
    model = tiny_model(n_kv_heads=4)                   # LLaMA-1: no grouped KV heads
    one = write_checkpoint(tmp_path / "release" / "7B", model, tok_path, 1, meta=True)
    two = write_checkpoint(tmp_path / "release" / "7B-tp2", model, tok_path, 2, meta=True)
    half = torch.load(os.path.join(two, "consolidated.01.pth"), weights_only=True)
    assert half["layers.0.attention.wq.weight"].shape == (32, 64)      # really split
    texts = []
    for ckpt in (one, two):
        m, tok = G.load_model(ckpt)
        assert m.args.vocab_size == 320 and m.args.max_seq_len == 2048   # Meta's defaults
        texts.append(G.generate(m, tok, ["the cat", "is it true that the sun"], 12,
                                temperature=0))
    assert texts[0] == texts[1]
    args, state, _ = C.read_checkpoint(two)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_permute_rows_is_the_rotate_half_layout():
    w = torch.arange(6.0)[:, None].expand(6, 2)        # one head, E = 6: row i holds i
    assert C.permute_rows(w, 1, to_hf=True)[:, 0].tolist() == [0, 2, 4, 1, 3, 5]
    w = torch.randn(4 * 8, 5)
    assert torch.equal(C.permute_rows(C.permute_rows(w, 4, True), 4, False), w)


def safe_open_keys(path):
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return list(f.keys())


def hf_style_logits(folder, ids):
    """An independent Llama forward in Hugging Face's layout and names: rotate-half rotary
    embeddings, q/k/v/o_proj, gate/up/down_proj. Written from the HF modeling equations."""
    from safetensors.torch import load_file
    cfg = json.load(open(os.path.join(folder, "config.json")))
    W = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            W.update(load_file(os.path.join(folder, name)))
    D, H, K = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    E, T = D // H, len(ids)
    inv_freq = 1.0 / cfg["rope_theta"] ** (torch.arange(0, E, 2).float() / E)
    angles = torch.outer(torch.arange(T).float(), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rotate_half(x):
        return torch.cat([-x[..., E // 2:], x[..., :E // 2]], -1)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"]) * w

    h = W["model.embed_tokens.weight"][torch.tensor(ids)]                # (T, D)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, W[p + "input_layernorm.weight"])
        q = (x @ W[p + "self_attn.q_proj.weight"].T).view(T, H, E).transpose(0, 1)
        k = (x @ W[p + "self_attn.k_proj.weight"].T).view(T, K, E).transpose(0, 1)
        v = (x @ W[p + "self_attn.v_proj.weight"].T).view(T, K, E).transpose(0, 1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(H // K, 0), v.repeat_interleave(H // K, 0)
        att = (q @ k.transpose(-1, -2) / E ** 0.5).masked_fill(~causal, float("-inf"))
        out = (att.softmax(-1) @ v).transpose(0, 1).reshape(T, D)
        h = h + out @ W[p + "self_attn.o_proj.weight"].T
        x = rms(h, W[p + "post_attention_layernorm.weight"])
        gate, up = x @ W[p + "mlp.gate_proj.weight"].T, x @ W[p + "mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ W[p + "mlp.down_proj.weight"].T
    return rms(h, W["model.norm.weight"]) @ W["lm_head.weight"].T       # (T, V)


def test_hf_export_matches_independent_forward_and_reads_back(tmp_path, tok_path):
    model = tiny_model()
    ckpt = write_checkpoint(tmp_path / "ours", model, tok_path)
    out = str(tmp_path / "hf")
    C.export_hf(*C.read_checkpoint(ckpt), out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["intermediate_size"] == model.args.ffn_hidden and cfg["num_key_value_heads"] == 2
    assert {"hidden_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps",
            "rope_theta", "vocab_size", "max_position_embeddings", "hidden_act"} <= set(cfg)
    names = set(safe_open_keys(os.path.join(out, "model.safetensors")))
    assert "model.layers.1.self_attn.q_proj.weight" in names and "lm_head.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names and len(names) == 2 + 1 + 2 * 9
    ids = [1, 7, 42, 99, 5, 300, 2, 18]
    ours = model(torch.tensor([ids]))[0]
    torch.testing.assert_close(hf_style_logits(out, ids), ours, rtol=1e-4, atol=1e-4)
    back, tok = G.load_model(out)
    assert torch.equal(back(torch.tensor([ids]))[0], ours)
    assert back.args.ffn_hidden == model.args.ffn_hidden and tok.n_words == 320
    assert json.load(open(os.path.join(out, "generation_config.json"))) == {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}        # <unk> pads
    assert cfg["pad_token_id"] == 0
    assert json.load(open(os.path.join(out, "tokenizer.json"))) == C.hf_tokenizer_json(tok_path)
    tok_cfg = json.load(open(os.path.join(out, "tokenizer_config.json")))
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (tok_cfg["pad_token"], tok_cfg["padding_side"]) == ("<unk>", "left")


@pytest.fixture(scope="module")
def spaced_tok_path(tmp_path_factory):
    """A tokenizer that has also seen indented lines, so that it owns whitespace-only pieces."""
    rng = random.Random(3)
    lines = tiny_text() + [" " * rng.choice([2, 4, 8]) + line for line in tiny_text(300, seed=2)]
    path = str(tmp_path_factory.mktemp("tok") / "spaced.model")
    return train_tokenizer(iter(lines), path, vocab_size=400)


def space_stress_texts(n=300, seed=0):
    """Texts with leading, trailing and runs of spaces, tabs, newlines, digits, and characters
    the vocabulary lacks (byte fallback): where tokenizers that emulate SentencePiece slip."""
    rng = random.Random(seed)
    parts = WORDS + ["\n", "\t", "2023", "é", "🦙", ",", ".", "The", "Cat"]
    texts = ["", " ", "  ", "\n", " the cat", "  the  cat   sat "]
    for _ in range(n):
        words = [rng.choice(parts) for _ in range(rng.randint(1, 8))]
        texts.append(rng.choice(["", " ", "  ", "    "]) + "".join(
            w + rng.choice([" ", " ", "  ", "    ", ""]) for w in words))
    return texts


def bpe_by_hand(spec: dict, text: str) -> list:
    """tokenizer.json applied as `tokenizers` defines it, written plainly: the normalizer ("▁"
    before a non-empty text, every space a "▁"), characters, then the adjacent pair of lowest
    merge rank (the leftmost of equals) merged until none is left; a symbol the vocabulary lacks
    becomes its UTF-8 bytes."""
    vocab = spec["model"]["vocab"]
    rank = {tuple(m.split(" ")): r for r, m in enumerate(spec["model"]["merges"])}
    symbols = list("▁" + text.replace(" ", "▁")) if text else []
    while True:
        pairs = [(rank[p], i) for i, p in enumerate(zip(symbols, symbols[1:])) if p in rank]
        if not pairs:
            break
        _, i = min(pairs)
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return [i for s in symbols for i in ([vocab[s]] if s in vocab else
                                         [vocab[f"<0x{b:02X}>"] for b in s.encode()])]


def test_hf_tokenizer_json_encodes_as_sentencepiece(spaced_tok_path):
    spec, tok = C.hf_tokenizer_json(spaced_tok_path), Tokenizer(spaced_tok_path)
    assert {"▁▁", "▁▁▁▁"} <= set(spec["model"]["vocab"])      # whitespace-only pieces exist
    assert spec["pre_tokenizer"] is None                        # as bpe_by_hand assumes
    assert spec["normalizer"]["normalizers"] == [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]
    for text in space_stress_texts():
        assert bpe_by_hand(spec, text) == tok.encode(text, bos=False), repr(text)


def test_hf_export_that_fails_midway_leaves_no_folder(tmp_path, tok_path, monkeypatch):
    ckpt = write_checkpoint(tmp_path / "ours", tiny_model(), tok_path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(C, "save_file", disk_full)      # the weights, written first
    with pytest.raises(OSError):
        C.export_hf(*C.read_checkpoint(ckpt), str(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path)) == ["ours"]     # no half folder, no .tmp- leftover


VARIED = ["def add(a, b):", "    return a + b  # the sum", "\tif x == 10:", "\t\tprint(f'{x:>4}')",
          "for i in range(2023):", '{"key": [1, 2, 3], "ok": true}',
          "café naïve façade über straße", "Москва и Санкт-Петербург", "東京は日本の首都です",
          "مرحبا بالعالم", "🦙 🎉 👍🏽 👨‍👩‍👧 🇫🇷", "3.14159 1,000,000 0x1F",
          "e\u0301 a\u0308"]                  # code, tabs, scripts, emoji, digits, combining marks


@pytest.fixture(scope="module")
def varied_tok_path(tmp_path_factory):
    """Meta's settings trained on the tiny text and VARIED's lines, indented: its pieces hold
    indentation, Cyrillic and Japanese words, emoji ("▁👍🏽"), "return", "▁é" (e + accent)."""
    rng = random.Random(5)
    lines = tiny_text() + [rng.choice(["", "  ", "    ", "\t"]) + v for v in VARIED * 30]
    path = str(tmp_path_factory.mktemp("tok") / "varied.model")
    return train_tokenizer(iter(lines), path, vocab_size=600)


def varied_texts(n=300, seed=0):
    """Leading spaces, runs of spaces, tabs, newlines (\\r\\n too), a no-break space, accents,
    Cyrillic, Japanese, Arabic, emoji with skin tones, ZWJ families and flags, digits, numbers,
    code, and characters no piece holds (byte fallback): every way the two can part."""
    rng = random.Random(seed)
    parts = WORDS[:12] + VARIED + ["\n", "\r\n", "\t", "2023", "007", "é", "🦙", "𝔘𝔫𝔦", "\u00a0",
                                   "()", "->", "==", "x_1", "Cat"]
    texts = ["", " ", "\t", "  leading", "trailing  ", "a\u00a0b", "\n\n", "1234567890", "x" * 40]
    for _ in range(n):
        words = [rng.choice(parts) for _ in range(rng.randint(1, 6))]
        texts.append(rng.choice(["", " ", "  ", "\t", "    "]) + "".join(
            w + rng.choice([" ", "", "  ", "\t", "    ", "\n"]) for w in words))
    return texts


def test_hf_tokenizer_json_encodes_a_varied_corpus_as_sentencepiece(varied_tok_path):
    spec, tok = C.hf_tokenizer_json(varied_tok_path), Tokenizer(varied_tok_path)
    assert {"▁Москва", "▁👍🏽", "return"} <= set(spec["model"]["vocab"])
    for text in varied_texts():
        assert bpe_by_hand(spec, text) == tok.encode(text, bos=False), repr(text)


def needs_transformers():
    """transformers, which the test command installs (requirements-test.txt): its round trip is
    checked on every run, never skipped."""
    try:
        import transformers
    except ImportError:
        pytest.fail("transformers is not installed: install the test requirements first, "
                    "pip install -r requirements-test.txt")
    return transformers


def hf_export(tmp_path, tok_path, vocab_size):
    """(our model, its Hugging Face export folder, written by generate.py's exporter)."""
    model = tiny_model(vocab_size=vocab_size)
    ckpt = write_checkpoint(tmp_path / "ours", model, tok_path)
    C.export_hf(*C.read_checkpoint(ckpt), str(tmp_path / "hf"))
    return model, str(tmp_path / "hf")


def test_transformers_loads_the_export(tmp_path, varied_tok_path):
    """AutoTokenizer encodes and decodes a varied corpus as our SentencePiece model,
    LlamaForCausalLM gives our logits and our greedy tokens, generate() knows <s> and </s>."""
    transformers = needs_transformers()
    model, out = hf_export(tmp_path, varied_tok_path, 600)
    hf_tok, tok = transformers.AutoTokenizer.from_pretrained(out), Tokenizer(varied_tok_path)
    for text in varied_texts():
        ids = hf_tok(text)["input_ids"]
        assert ids == tok.encode(text, bos=True), repr(text)
        assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids), repr(text)
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    for text in ("the cat sat on  the mat", "    return a + b  # Москва 🦙", "\t2023"):
        ids = tok.encode(text, bos=True)
        with torch.no_grad():
            torch.testing.assert_close(hf(torch.tensor([ids])).logits[0],
                                       model(torch.tensor([ids]))[0], rtol=1e-4, atol=1e-4)
            new = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
        ours = G.generate_tokens(model, [ids], 8, temperature=0.0, eos_id=tok.eos_id)[0]
        assert new[0, len(ids):].tolist()[:len(ours)] == ours and len(ours) > 0
    config = transformers.GenerationConfig.from_pretrained(out)
    assert (config.bos_token_id, config.eos_token_id) == (tok.bos_id, tok.eos_id) == (1, 2)


def test_the_export_encodes_the_spelling_of_a_control_piece_as_text(tmp_path, tok_path):
    """"<s>", "</s>" and "<unk>" written inside a text are ordinary characters to SentencePiece
    (and our Tokenizer), not control ids: AutoTokenizer on the export splits them alike, and
    still puts the real <s> first."""
    transformers = needs_transformers()
    _, out = hf_export(tmp_path, tok_path, 320)
    hf_tok, tok = transformers.AutoTokenizer.from_pretrained(out), Tokenizer(tok_path)
    for text in ("The <s>old</s> price", "a <unk> b", "<s>"):
        ids = hf_tok(text)["input_ids"]
        assert ids == tok.encode(text, bos=True), repr(text)
        assert ids[0] == tok.bos_id and ids[1:].count(tok.bos_id) == 0, repr(text)
        assert hf_tok.decode(ids, skip_special_tokens=True) == text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tok.bos_id, tok.eos_id) == (1, 2)


@contextlib.contextmanager
def transformers_says(transformers):
    """Every warning transformers gives in the block, in a list: Python's warnings, and its
    logger's records at WARNING or above (printed once a process otherwise: forgotten first)."""
    import logging
    import warnings
    said = []

    class Keep(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())
    logger = transformers.logging.get_logger("transformers")     # the library's root logger
    handler = Keep(logging.WARNING)
    logging.Logger.warning_once.cache_clear()            # transformers' own once-a-process cache
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield said
    finally:
        logger.removeHandler(handler)
    said += [str(w.message) for w in caught]


def test_the_exports_generate_says_nothing_and_pads_a_batch(tmp_path, tok_path, capfd):
    """generate() on the export warns of nothing, one prompt or a batch, with or without an
    attention mask, and a batch padded by its tokenizer decodes each row as ours alone."""
    transformers = needs_transformers()
    model, out = hf_export(tmp_path, tok_path, 320)
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    capfd.readouterr()                                        # loading's progress bars
    texts = ["the cat", "a dog sat on the mat because it"]
    with transformers_says(transformers) as said, torch.no_grad():
        hf.generation_config.pad_token_id = None              # the export's pad token left out:
        hf.generate(torch.tensor([[1, 5, 9], [1, 7, 8]]), max_new_tokens=3, do_sample=False)
    assert any("attention mask" in line for line in said)     # ... warns, and is heard here
    hf.generation_config.pad_token_id = 0
    with transformers_says(transformers) as said, torch.no_grad():
        hf.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False)
        hf.generate(torch.tensor([[1, 5, 9], [1, 7, 8]]), max_new_tokens=3, do_sample=False)
        hf.generate(**hf_tok(texts[:1], return_tensors="pt"), max_new_tokens=3, do_sample=False)
        batch = hf_tok(texts, return_tensors="pt", padding=True)
        new = hf.generate(**batch, max_new_tokens=6, do_sample=False)
    new = new[:, batch["input_ids"].shape[1]:]                              # (B, 6) new tokens
    assert said == [] and capfd.readouterr().err == ""
    assert batch["input_ids"][0, 0] == 0 and batch["attention_mask"][0, 0] == 0   # left-padded
    for row, text in zip(new.tolist(), texts):
        ids = Tokenizer(tok_path).encode(text, bos=True)
        ours = G.generate_tokens(model, [ids], 6, temperature=0.0, eos_id=2)[0]
        assert row[:len(ours)] == ours


def train_spm(path, **settings) -> str:
    """A SentencePiece model of the tiny text: Meta's settings (tokenizer.TRAINER_SPEC) with
    `settings` over them."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(tiny_text()), model_writer=model,
                                   minloglevel=2, **{**TRAINER_SPEC, "vocab_size": 320, **settings})
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return str(path)


# Mistral's tokenizer as we know it (v0.3's tokenizer.model, from memory: none can be fetched
# here): Meta's trainer settings -- BPE, byte fallback, digits split, identity normalization,
# dummy prefix, whitespace kept, unk 0 bos 1 eos 2 -- and control pieces from id 3 on, [INST]
# to [control_768], before the 256 bytes. Here with its first 7 named ones and 13 more.
MISTRAL = dict(vocab_size=400, control_symbols=[
    "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]"] + [f"[control_{i}]" for i in range(8, 21)])
REFUSED_BECAUSE = ("{path} cannot be exported as a tokenizer.json that encodes as it does: {why}. "
                   "The export writes LLaMA's kind (BPE, no normalization, spaces kept, byte "
                   "fallback: tokenizer.py's TRAINER_SPEC); convert this one with transformers' "
                   "own converter")


@pytest.mark.parametrize("settings,why", [
    (dict(model_type="unigram"), "its model type is unigram, not bpe"),
    (dict(normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True),
     "it normalizes text (nmt_nfkc); it removes extra whitespace (remove_extra_whitespaces)"),
])
def test_export_refuses_what_its_tokenizer_json_would_get_wrong(tmp_path, settings, why):
    """The issue's two: the tokenizer.json the exporter would write encodes the stress texts
    otherwise than SentencePiece, and generate.py --export-hf refuses in one line, before it
    writes anything."""
    path = train_spm(tmp_path / "odd.model", **settings)
    spec, tok = C.hf_tokenizer_json(path), Tokenizer(path)
    wrong = [t for t in space_stress_texts() if bpe_by_hand(spec, t) != tok.encode(t, bos=False)]
    assert len(wrong) > len(space_stress_texts()) / 2       # most: no exact export possible
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_model(vocab_size=tok.n_words), path)
    with pytest.raises(SystemExit) as info:
        G.main(["--ckpt", ckpt, "--export-hf", str(tmp_path / "hf")])
    assert info.value.code == "error: " + REFUSED_BECAUSE.format(
        path=os.path.join(ckpt, "tokenizer.model"), why=why)
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "odd.model"]             # nothing written


@pytest.mark.parametrize("settings,why", [
    (dict(byte_fallback=False, vocab_size=200), "it has no byte fallback"),
    (dict(add_dummy_prefix=False), "it adds no dummy prefix (add_dummy_prefix false)"),
    (dict(treat_whitespace_as_suffix=True), "it puts the ▁ after words "
                                            "(treat_whitespace_as_suffix)"),
    (dict(user_defined_symbols=["cat", "->"]), "it has 2 piece(s) of kind user-defined"),
])
def test_export_refuses_every_other_kind_of_sentencepiece_model(tmp_path, settings, why):
    path = train_spm(tmp_path / "odd.model", **settings)
    assert one_line_error(ValueError, C.check_exportable, path) == REFUSED_BECAUSE.format(
        path=path, why=why)


def test_export_accepts_llama_style_models_ours_and_mistrals(tmp_path, tok_path):
    """Ours (Meta's settings, tokenizer.py) and a Mistral-style model are exported, and their
    tokenizer.json encodes as SentencePiece, by hand and through transformers."""
    transformers = needs_transformers()
    mistral = train_spm(tmp_path / "mistral.model", **MISTRAL)
    assert Tokenizer(mistral).sp.is_control(3) and Tokenizer(mistral).sp.id_to_piece(3) == "[INST]"
    for path, vocab in ((tok_path, 320), (mistral, 400)):
        spec, tok = C.hf_tokenizer_json(path), Tokenizer(path)
        for text in space_stress_texts():
            assert bpe_by_hand(spec, text) == tok.encode(text, bos=False), repr(text)
        _, out = hf_export(tmp_path / str(vocab), path, vocab)
        hf_tok = transformers.AutoTokenizer.from_pretrained(out)
        for text in varied_texts(100):
            assert hf_tok(text)["input_ids"] == tok.encode(text, bos=True), repr(text)


@pytest.mark.parametrize("dim,hidden", [(4096, 11008), (64, 176), (64, 96), (2048, 5632)])
def test_hf_intermediate_size_is_reproduced(dim, hidden):
    args = M.ModelArgs(dim=dim, n_heads=4, n_layers=1, vocab_size=10, **C.ffn_args(dim, hidden))
    assert args.ffn_hidden == hidden


def transformers_llama(transformers, folder, tok_path, **config):
    """A tiny LlamaForCausalLM made and saved by transformers itself, our tokenizer beside it."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=320, **config)).eval()
    hf.save_pretrained(folder)
    shutil.copyfile(tok_path, os.path.join(folder, "tokenizer.model"))
    return hf


def test_a_llama_3_rope_theta_saved_by_transformers_reads_back_with_its_logits(tmp_path,
                                                                              tok_path):
    """transformers 5 writes rope_theta inside "rope_parameters" (4 wrote it at the top level):
    Llama 3's 500000 is read from there, and the model gives transformers' own logits."""
    transformers = needs_transformers()
    hf = transformers_llama(transformers, tmp_path / "hf", tok_path, rope_theta=500000.0)
    args, state, _ = C.read_checkpoint(str(tmp_path / "hf"))
    assert args.rope_theta == 500000.0
    model = M.Transformer(args).eval()
    model.load_state_dict(state)
    ids = torch.arange(200)[None] % 320          # positions far enough for theta to matter
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_llama_3_1_scaled_rope_saved_by_transformers_is_refused(tmp_path, tok_path):
    transformers = needs_transformers()
    transformers_llama(transformers, tmp_path / "hf", tok_path, rope_theta=500000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192})
    config = os.path.join(tmp_path / "hf", "config.json")
    assert one_line_error(ValueError, C.read_checkpoint, str(tmp_path / "hf")) == (
        f"{config}: it describes rope_type='llama3', a scaled rotary embedding (Llama 3.1's and "
        "later): not read here; only plain Llama is supported")


def test_a_tied_model_saved_by_transformers_exports_with_its_own_lm_head(tmp_path, tok_path):
    """tie_word_embeddings: no lm_head.weight in the file; the embedding is read as both, and
    the export writes the output as its own tensor, which transformers loads with the logits."""
    transformers = needs_transformers()
    hf = transformers_llama(transformers, tmp_path / "tied", tok_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in safe_open_keys(str(tmp_path / "tied" / "model.safetensors"))
    C.export_hf(*C.read_checkpoint(str(tmp_path / "tied")), str(tmp_path / "hf"))
    names = safe_open_keys(str(tmp_path / "hf" / "model.safetensors"))
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    back = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.tensor([[1, 7, 42, 99, 5, 300, 2, 18]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_only_a_full_disk_is_called_a_full_disk_when_safetensors_fails(tmp_path, monkeypatch):
    """Only an error of the disk becomes an OSError, and only ENOSPC asks about space; a tensor
    safetensors refuses is raised as it is."""
    from safetensors import SafetensorError
    shared = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match="share memory"):
        C.save_safetensors({"a": shared, "b": shared}, str(tmp_path / "x.safetensors"))

    def denied(tensors, path, **k):
        raise SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)")
    monkeypatch.setattr(C, "save_file", denied)
    assert one_line_error(OSError, C.save_safetensors, {}, "x.safetensors") == (
        "could not write x.safetensors (Error while serializing: I/O error: Permission denied "
        "(os error 13))")


@pytest.mark.parametrize("config,says", [
    (dict(hidden_act="gelu"), "it describes hidden_act='gelu', not silu"),
    (dict(head_dim=32), "it describes head_dim=32, not hidden_size / num_attention_heads = 16")])
def test_a_hf_config_that_changes_what_llama_fixes_is_refused_naming_the_field(tmp_path, tok_path,
                                                                               config, says):
    """A GELU MLP would load as SiLU (wrong logits, no word); heads wider than dim / n_heads
    would be called weights of another model."""
    transformers = needs_transformers()
    transformers_llama(transformers, tmp_path / "hf", tok_path, **config)
    config_json = os.path.join(tmp_path / "hf", "config.json")
    assert one_line_error(ValueError, C.read_checkpoint, str(tmp_path / "hf")) == (
        f"{config_json}: {says}: only plain Llama is supported")


# --- bad input: one-line errors that say what is wrong -----------------------------------------

def one_line_error(exc_type, fn, *args):
    with pytest.raises(exc_type) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_files(tmp_path, tok_path):
    assert "does not exist" in one_line_error(FileNotFoundError, G.load_model, str(tmp_path / "no"))
    weights = os.path.join(write_checkpoint(tmp_path / "w", tiny_model(), tok_path),
                           "consolidated.00.pth")               # a file of the folder, not it
    assert one_line_error(NotADirectoryError, G.load_model, weights) == (
        f"checkpoint {weights} is a file; give the folder that holds it, {tmp_path / 'w'}")
    (tmp_path / "empty").mkdir()
    assert "neither params.json" in one_line_error(FileNotFoundError, C.read_checkpoint,
                                                   str(tmp_path / "empty"))
    ckpt = write_checkpoint(tmp_path / "a" / "b", tiny_model(), tok_path, 3 - 1)
    os.remove(os.path.join(ckpt, "tokenizer.model"))
    assert "no tokenizer.model" in one_line_error(FileNotFoundError, C.read_checkpoint, ckpt)
    shutil.copyfile(tok_path, os.path.join(ckpt, "tokenizer.model"))
    os.rename(os.path.join(ckpt, "consolidated.01.pth"), os.path.join(ckpt, "consolidated.02.pth"))
    assert "a shard is missing" in one_line_error(FileNotFoundError, C.read_checkpoint, ckpt)
    for f in os.listdir(ckpt):
        if f.endswith(".pth"):
            os.remove(os.path.join(ckpt, f))
    assert "no consolidated.NN.pth" in one_line_error(FileNotFoundError, C.read_checkpoint, ckpt)


def test_shapes_that_do_not_match_params_json(tmp_path, tok_path):
    ckpt = write_checkpoint(tmp_path / "c", tiny_model(), tok_path)
    params = json.load(open(os.path.join(ckpt, "params.json")))
    json.dump({**params, "dim": 128}, open(os.path.join(ckpt, "params.json"), "w"))
    msg = one_line_error(ValueError, G.load_model, ckpt)
    assert "params.json" in msg and "(320, 64)" in msg and "implies (320, 128)" in msg
    assert "different models" in msg


def test_shard_files_of_different_checkpoints_are_refused_naming_the_file(tmp_path, tok_path):
    """Two consolidated.NN.pth that do not belong together -- a tensor missing from one, or a
    width that differs in a dimension Meta does not split -- are named before they are merged."""
    ckpt = write_checkpoint(tmp_path / "mixed", tiny_model(), tok_path, 2)
    first, second = (os.path.join(ckpt, f"consolidated.0{i}.pth") for i in (0, 1))
    shard = torch.load(second, weights_only=True)
    torch.save({k: v for k, v in shard.items() if k != "layers.1.feed_forward.w2.weight"}, second)
    assert one_line_error(ValueError, G.load_model, ckpt) == (
        f"{second} lacks layers.1.feed_forward.w2.weight, which {first} holds: the shard files "
        "come from different checkpoints; put back the consolidated.NN.pth files of one "
        "checkpoint (re-download or re-save them)")
    torch.save({**shard, "layers.0.attention.wq.weight": torch.zeros(32, 80)}, second)
    assert one_line_error(ValueError, G.load_model, ckpt) == (
        f"layers.0.attention.wq.weight in {second} has shape (32, 80) but (32, 64) in {first}: "
        "the shard files come from different checkpoints; put back the consolidated.NN.pth "
        "files of one checkpoint (re-download or re-save them)")


def test_tokenizer_of_another_model(tmp_path, tok_path):
    ckpt = write_checkpoint(tmp_path / "d", tiny_model(), tok_path)
    train_tokenizer(iter(tiny_text(seed=1)), os.path.join(ckpt, "tokenizer.model"), vocab_size=300)
    msg = one_line_error(ValueError, G.load_model, ckpt)
    assert "300 pieces" in msg and "embeds 320" in msg


def test_a_model_with_tokens_added_beyond_its_tokenizer_is_told_to_trim_them(tmp_path,
                                                                            tok_path):
    """An embedding with more rows than tokenizer.model has pieces: tokens added in fine-tuning
    (transformers' add_special_tokens + resize_token_embeddings) or a padded vocabulary."""
    ckpt = write_checkpoint(tmp_path / "added", tiny_model(vocab_size=321), tok_path)
    assert one_line_error(ValueError, G.load_model, ckpt) == (
        f"tokenizer {ckpt}/tokenizer.model has 320 pieces but the model embeds 321 tokens: tokens "
        "added beyond tokenizer.model (added tokens, or a padded vocabulary) are not supported; "
        "trim the embedding and output rows back to its 320 pieces (or, if it is another model's "
        "tokenizer, use the model's own tokenizer.model)")
    ckpt = write_checkpoint(tmp_path / "fewer", tiny_model(vocab_size=319), tok_path)
    assert one_line_error(ValueError, G.load_model, ckpt) == (
        f"tokenizer {ckpt}/tokenizer.model has 320 pieces but the model embeds 319 tokens: it "
        "belongs to another model; use the model's own tokenizer.model")


def test_hf_folder_without_weights(tmp_path, tok_path):
    out = str(tmp_path / "hf")
    C.export_hf(*C.read_checkpoint(write_checkpoint(tmp_path / "e", tiny_model(), tok_path)), out)
    os.remove(os.path.join(out, "model.safetensors"))
    assert "no *.safetensors" in one_line_error(FileNotFoundError, G.load_model, out)


# --- the command line and the speed bound ------------------------------------------------------

def test_weight_bytes_leave_out_the_embedding():
    model = tiny_model()
    assert G.weight_bytes(model) == 4 * M.count_parameters(model.args, embedding=False)
    assert bench_cpu.memory_bandwidth("cpu", nbytes=8 << 20, reps=2) > 1e8   # > 0.1 GB/s anywhere


def test_main_streams_prints_rates_and_exports(tmp_path, tok_path, capsys):
    ckpt = write_checkpoint(tmp_path / "f", tiny_model(), tok_path)
    G.main(["--ckpt", ckpt, "--prompt", "the cat", "--max-new-tokens", "5", "--temperature", "0"])
    out = capsys.readouterr().out
    model, tok = G.load_model(ckpt)
    expected = G.generate(model, tok, ["the cat"], 5, temperature=0)[0]
    assert out.startswith("the cat" + expected + "\n")
    with pytest.raises(SystemExit) as e:   # refused before the prompt is echoed, on its own line
        G.main(["--ckpt", ckpt, "--prompt", "the cat " * 40, "--max-new-tokens", "5"])
    assert str(e.value.code).startswith("error: the longest prompt (")
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit) as e:
        G.main(["--ckpt", ckpt, "--prompt", "a", "--seed", str(2**64)])
    assert e.value.code == f"error: --seed={2**64} must be 0 to 2**64 - 1"
    assert "tokens/s" in out and "MB of weights" in out and "GB/s" in out
    G.main(["--ckpt", ckpt, "--prompt", "a", "--prompt", "the dog", "--max-new-tokens", "3",
            "--export-hf", str(tmp_path / "hf")])
    out = capsys.readouterr().out
    assert "[0] a" in out and "[1] the dog" in out
    assert os.path.isfile(tmp_path / "hf" / "config.json")
    with pytest.raises(SystemExit, match="error: checkpoint folder .* does not exist"):
        G.main(["--ckpt", str(tmp_path / "missing"), "--prompt", "x"])
    # A refused export creates nothing, not even the folders of its path.
    with pytest.raises(SystemExit, match="error: checkpoint folder .* does not exist"):
        G.main(["--ckpt", str(tmp_path / "missing"), "--export-hf", str(tmp_path / "x" / "hf")])
    assert not os.path.exists(tmp_path / "x")
