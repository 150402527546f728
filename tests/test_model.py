"""Tests for model.py: golden parameter counts and FLOPs per token, parity with a plain
re-derivation of the LLaMA equations, fp32 rotary tables, attention backends (the xformers probe,
its backward included), the KV cache and the static-shape decoding step, the hand-written SwiGLU
backward, Meta's key names and shard layout, and refusal of impossible architectures."""

import math
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import checkpoint as C
import model as M


def small_args(**kw):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                max_seq_len=32)
    return M.ModelArgs(**{**base, **kw})


def build(args, seed=0):
    torch.manual_seed(seed)
    return M.Transformer(args).eval()


# --- golden numbers ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("7b", 6_738_415_616), ("13b", 13_015_864_320),
    ("33b", 32_528_943_616), ("65b", 65_285_660_672),
])
def test_paper_parameter_counts(name, expected):
    args = M.preset(name)
    with torch.device("meta"):       # no memory: shapes only
        model = M.Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert M.count_parameters(args) == expected


def test_paper_shapes():
    assert M.preset("7b").ffn_hidden == 11008
    assert M.preset("13b").ffn_hidden == 13824
    assert M.preset("33b").ffn_hidden == 17920
    assert M.preset("65b").ffn_hidden == 22016
    for name in ("7b", "13b", "33b", "65b"):
        assert M.preset(name).head_dim == 128


def test_flops_per_token_formula():
    args = M.preset("7b")
    n = M.count_parameters(args, embedding=False)
    assert n == M.count_parameters(args) - 32000 * 4096
    assert M.flops_per_token(args, 2048) == 6 * n + 12 * 32 * 4096 * 2048


def test_linear_perf_note_rates_stay_under_the_bound_of_the_weights_a_token_reads():
    """model.Linear's note quotes tests/bench_cpu.py decode: its model (dim 768, 12 layers) has
    134,105,856 parameters, and a step reads all but the embedding, 438 MB in fp32. A rate
    above bandwidth / bytes is impossible: the note once claimed 83 tokens/s beside 35 GB/s."""
    args = M.ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32000, max_seq_len=512)
    weights = 4 * M.count_parameters(args, embedding=False)                  # fp32 bytes
    assert M.count_parameters(args) == 134_105_856 and round(weights / 1e6) == 438
    note = " ".join(M.Linear.__doc__.split())
    assert "a 134M-parameter model, 438 MB of weights read a token" in note
    ranges = [(int(a), int(b)) for a, b in re.findall(r"(\d+)-(\d+) tokens/s", note)]
    *measured, (low, high) = ranges                          # the last range is the bound
    bandwidth = float(re.search(r"a copy's (\d+) GB/s", note)[1]) * 1e9
    assert low <= bandwidth / weights <= high + 1            # 26 GB/s, rounded: 59.3 tokens/s
    assert len(measured) == 2 and all(rate < low for pair in measured for rate in pair)


def test_tiny_preset_admits_tp_1_2_4():
    a = M.preset("tiny")
    for tp in (1, 2, 4):
        assert a.n_heads % tp == 0 and a.n_kv_heads % tp == 0 and a.vocab_size % tp == 0
        assert a.ffn_hidden % tp == 0


# --- an independent plain implementation of the equations -------------------------------------

def reference_forward(state, args, tokens):
    """LLaMA written out with explicit loops over heads and explicit 2x2 rotations of each pair."""
    H, K, E = args.n_heads, args.n_kv_heads, args.dim // args.n_heads
    B, T = tokens.shape

    def rmsnorm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + args.norm_eps) * w

    def rotate(x, pos):                         # x: (E,) one head at one position
        out = torch.empty_like(x)
        for i in range(E // 2):
            angle = pos * args.rope_theta ** (-2 * i / E)
            c, s = math.cos(angle), math.sin(angle)
            out[2 * i] = c * x[2 * i] - s * x[2 * i + 1]
            out[2 * i + 1] = s * x[2 * i] + c * x[2 * i + 1]
        return out

    x = state["tok_embeddings.weight"][tokens]  # (B, T, D)
    for l in range(args.n_layers):
        p = lambda n: state[f"layers.{l}.{n}.weight"]
        h = rmsnorm(x, p("attention_norm"))
        q = h @ p("attention.wq").T
        k = h @ p("attention.wk").T
        v = h @ p("attention.wv").T
        heads = []
        for head in range(H):
            kv = head // (H // K)               # the KV head this query head shares
            qh = q[..., head * E:(head + 1) * E]
            kh = k[..., kv * E:(kv + 1) * E]
            vh = v[..., kv * E:(kv + 1) * E]
            qr = torch.stack([torch.stack([rotate(qh[b, t], t) for t in range(T)]) for b in range(B)])
            kr = torch.stack([torch.stack([rotate(kh[b, t], t) for t in range(T)]) for b in range(B)])
            scores = qr @ kr.transpose(1, 2) / math.sqrt(E)
            scores = scores + torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
            heads.append(torch.softmax(scores, -1) @ vh)
        x = x + torch.cat(heads, -1) @ p("attention.wo").T
        h = rmsnorm(x, p("ffn_norm"))
        gate = h @ p("feed_forward.w1").T
        x = x + ((gate * torch.sigmoid(gate)) * (h @ p("feed_forward.w3").T)) @ p("feed_forward.w2").T
    return rmsnorm(x, state["norm.weight"]) @ state["output.weight"].T


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_parity_with_plain_equations(n_kv_heads):
    args = small_args(n_kv_heads=n_kv_heads)
    model = build(args)
    tokens = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = reference_forward(model.state_dict(), args, tokens)
    for backend in ("math", "sdpa"):
        model.set_attention_backend(backend)
        with torch.no_grad():
            out = model(tokens)
        assert out.dtype == torch.float32 and out.shape == (2, 9, args.vocab_size)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiling", [False, True])
def test_rope_is_meta_interleaved_layout(compiling, monkeypatch):
    # Meta computes the rotation as a complex product of consecutive pairs. apply_rope computes
    # it so eagerly, with its own backward, and as a 2x2 rotation in real numbers under
    # torch.compile: both are checked, values and gradient, against Meta's product written here
    # from the angles.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    E, T = 8, 5
    x = torch.randn(1, T, 2, E, requires_grad=True)
    cos, sin = M.rope_tables(E, T)
    freqs = torch.polar(torch.ones(T, E // 2), torch.outer(torch.arange(T).float(),
                        1.0 / 10000 ** (torch.arange(0, E, 2).float() / E)))
    xc = torch.view_as_complex(x.detach().reshape(1, T, 2, E // 2, 2))
    expected = torch.view_as_real(xc * freqs[None, :, None, :]).flatten(-2)
    out = M.apply_rope(x, cos, sin)
    torch.testing.assert_close(out, expected)
    # The gradient of a rotation is the rotation by the opposite angle. It arrives here with its
    # last dimension strided, as the math attention's gradient of k does on CUDA.
    g = torch.randn(1, 2, E, T).permute(0, 3, 1, 2)                     # (1, T, 2, E)
    assert g.stride(-1) != 1
    out.backward(g)
    gc = torch.view_as_complex(g.contiguous().reshape(1, T, 2, E // 2, 2))
    torch.testing.assert_close(x.grad, torch.view_as_real(gc * freqs.conj()[None, :, None, :])
                               .flatten(-2))
    assert M.apply_rope(x.detach().bfloat16(), cos, sin).dtype == torch.bfloat16


def test_rotary_tables_stay_fp32_when_the_model_is_cast():
    # As Meta keeps freqs_cis: a bf16 cos would be off by up to 2^-9 (~2e-3), at every position.
    args = small_args(max_seq_len=64)
    cos, sin = M.rope_tables(args.head_dim, 64, args.rope_theta)
    model = M.Transformer(args).to(torch.bfloat16)
    assert model.output.weight.dtype == torch.bfloat16
    assert model.rope_cos.dtype == model.rope_sin.dtype == torch.float32
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)
    with torch.device("meta"):                           # built without memory, then made real
        lazy = M.Transformer(args)
    lazy = lazy.to(torch.bfloat16).to_empty(device="cpu")
    assert torch.equal(lazy.rope_cos, cos) and torch.equal(lazy.rope_sin, sin)


def test_backends_agree_with_cache_offset():
    # Queries at positions 3..6 over keys 0..6: the bottom-right causal mask of a cached prefill.
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 4, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    math_out = M.attend(q, k, v, "math")
    torch.testing.assert_close(M.attend(q, k, v, "sdpa"), math_out, rtol=1e-5, atol=1e-5)
    # query 0 (position 3) must ignore keys 4..6: changing them leaves its output unchanged
    k2, v2 = k.clone(), v.clone()
    k2[:, 4:], v2[:, 4:] = 0.0, 1e3
    torch.testing.assert_close(M.attend(q, k2, v2, "math")[:, 0], math_out[:, 0])


def test_the_math_backend_stays_fp32_under_bf16_autocast():
    """The reference path computes in fp32 even where the model runs under bf16 autocast:
    scores rounded to bf16's 8 bits would differ from the fp64 equation by about 1e-2."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 16, 2, 32), torch.randn(1, 16, 2, 32), torch.randn(1, 16, 2, 32)
    scores = (q.double().transpose(1, 2) @ k.double().permute(0, 2, 3, 1)) / math.sqrt(32)
    scores = scores.masked_fill(~torch.ones(16, 16, dtype=torch.bool).tril(), float("-inf"))
    exact = (scores.softmax(-1) @ v.double().transpose(1, 2)).transpose(1, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = M.attend(q, k, v, "math")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


def test_auto_backend_on_cpu_is_sdpa():
    assert M.resolve_backend("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="xformers"):
        M.resolve_backend("xformers", torch.device("cpu"))
    with pytest.raises(ValueError, match="choose one of"):
        M.resolve_backend("flash9", torch.device("cpu"))


class ForwardOnly(torch.autograd.Function):
    """A stand-in attention kernel with a forward and no backward, as an xformers build without
    backward kernels for a GPU has."""

    @staticmethod
    def forward(ctx, q, k, v):
        return q.clone()

    @staticmethod
    def backward(ctx, dy):
        raise NotImplementedError("no backward kernel for this GPU")


@pytest.mark.parametrize("trains", [False, True])
def test_xformers_probe_refuses_a_build_without_backward(monkeypatch, trains):
    """The probe runs a backward too: a build whose forward works and backward fails is
    refused (auto then picks sdpa); one whose both work is taken. On CPU: a stand-in module
    as xformers.ops, the probe's CUDA call made on the CPU."""
    kernel = (lambda q, k, v: q.clone()) if trains else ForwardOnly.apply
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = lambda q, k, v, attn_bias=None: kernel(q, k, v)
    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    probe = M.xformers_trains
    monkeypatch.setattr(M, "xformers_trains", lambda xops, device: probe(xops, "cpu"))
    x = torch.zeros(1, 8, 1, 64, dtype=torch.bfloat16)
    assert torch.equal(ops.memory_efficient_attention(x, x, x), x)    # the forward works
    assert M.xformers_ops.__wrapped__() is (ops if trains else None)   # uncached: this module


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_kv_cache_decoding_equals_full_forward(backend):
    args = small_args()
    model = build(args)
    model.set_attention_backend(backend)
    tokens = torch.randint(0, args.vocab_size, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(max_batch_size=4, max_seq_len=16)
        pieces = [model(tokens[:, :5], start_pos=0)]          # a prefill of 5 tokens
        pieces += [model(tokens[:, 5:8], start_pos=5)]        # a chunk of 3 (S > T > 1)
        pieces += [model(tokens[:, t:t + 1], start_pos=t) for t in range(8, 12)]  # one by one
        model.clear_cache()
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["math", "sdpa"])         # of the int-position forward
def test_static_shape_decoding_equals_forward(backend):
    # A 0-d tensor start_pos (the path a CUDA graph replays: index_copy_ into the cache, the
    # whole cache masked) gives the int path's logits, for a prefill chunk and for one token.
    args = small_args()
    model = build(args)
    model.set_attention_backend(backend)
    tokens = torch.randint(0, args.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.setup_cache(max_batch_size=2, max_seq_len=16)
        expected = [model(tokens[:, :4], 0), model(tokens[:, 4:5], 4)]
        for layer in model.layers:      # positions not yet written must stay out of sight
            layer.attention.cache_k[:, 5:], layer.attention.cache_v[:, 5:] = 1e3, -1e3
        got = [model(tokens[:, :4], torch.tensor(0)), model(tokens[:, 4:5], torch.tensor(4))]
        assert torch.equal(model.layers[0].attention.cache_k[:, 5:], torch.full_like(
            model.layers[0].attention.cache_k[:, 5:], 1e3))      # and stay unwritten
        model.clear_cache()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_fused_projections_give_the_same_logits_and_keep_meta_names():
    # fuse_projections stacks wq|wk|wv and w1|w3 into one matrix each for inference. The logits
    # of a prefill and of cached decoding equal the unfused model's, the state dict keeps its
    # names and values, gradients still reach the named weights, and .to() undoes the fusion.
    args = small_args()
    model, plain = build(args), build(args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse_projections()
    attn = model.layers[0].attention
    assert attn.wqkv.shape == (args.dim + 2 * args.n_kv_heads * args.head_dim, args.dim)
    assert attn.wk.weight.untyped_storage().data_ptr() == attn.wqkv.untyped_storage().data_ptr()
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    tokens = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for m in (model, plain):
            m.setup_cache(max_batch_size=2, max_seq_len=16)
        got = [model(tokens[:, :6], 0)] + [model(tokens[:, t:t + 1], t) for t in range(6, 9)]
        want = [plain(tokens[:, :6], 0)] + [plain(tokens[:, t:t + 1], t) for t in range(6, 9)]
        for m in (model, plain):
            m.clear_cache()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    with torch.no_grad():                 # the fused matrices are what the fused forward reads
        attn.wqkv.zero_()
        assert not torch.allclose(model(tokens), plain(tokens))
        model.load_state_dict(before)     # in place, through the views: fused again
        torch.testing.assert_close(model(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
    model(tokens).sum().backward()        # with autograd: the named weights' own products
    assert attn.wq.weight.grad is not None and model.layers[1].feed_forward.w3.weight.grad is not None
    model.double()
    assert attn.wqkv is None and model.layers[0].feed_forward.w13 is None
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), plain.double()(tokens))


# --- the hand-written SwiGLU backward ----------------------------------------------------------

def saved_bytes(fn, params):
    """Bytes of activations autograd keeps for backward (parameters excluded)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def test_manual_swiglu_backward_equals_autograd_and_saves_less():
    args = small_args(dim=64, multiple_of=64)
    torch.manual_seed(0)
    ffn = M.FeedForward(args)
    x = torch.randn(3, 10, args.dim)
    grads, sizes = {}, {}
    for manual in (False, True):
        ffn.manual_backward = manual
        ffn.zero_grad()
        xi = x.clone().requires_grad_()
        out, sizes[manual] = saved_bytes(lambda: ffn(xi), list(ffn.parameters()))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[manual] = [xi.grad] + [p.grad.clone() for p in ffn.parameters()]
    for g_auto, g_manual in zip(grads[False], grads[True]):
        torch.testing.assert_close(g_manual, g_auto, rtol=1e-5, atol=1e-6)
    n, D, Fh = 3 * 10, args.dim, args.ffn_hidden
    assert sizes[True] == 4 * n * (D + 2 * Fh)        # x (shared by w1 and w3), a, b
    assert sizes[False] == 4 * n * (D + 4 * Fh)       # x, a, silu(a), b, silu(a) * b


def test_manual_swiglu_backward_under_cpu_bf16_autocast():
    # The CPU stand-in for CUDA's autocast: the backward may run outside the forward's autocast,
    # with bf16 gradients meeting fp32 weights. Measured against the fp32 gradients, autograd's
    # and the hand-written backward both err by about 0.5% (bf16 rounding, 2^-8 per op).
    args = small_args(dim=64, multiple_of=64)
    torch.manual_seed(0)
    ffn = M.FeedForward(args)
    x = torch.randn(3, 10, args.dim)
    grads = {}
    for name, manual, amp in (("fp32", False, False), ("autograd", False, True),
                              ("manual", True, True)):
        ffn.manual_backward = manual
        ffn.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = ffn(x)
        assert out.dtype == (torch.bfloat16 if amp else torch.float32)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[name] = [p.grad.clone() for p in ffn.parameters()]
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    for exact, auto, manual in zip(grads["fp32"], grads["autograd"], grads["manual"]):
        assert manual.dtype == torch.float32                    # cast back to the weight's dtype
        assert rel(manual, exact) < 2 ** -6 and rel(auto, exact) < 2 ** -6
        assert rel(manual, auto) < 2 ** -6


def test_manual_backward_in_the_whole_model():
    # The flag parallel.apply_recompute sets for "selective", here set on every layer by hand.
    args = small_args()
    model = build(args).train()
    tokens = torch.randint(0, args.vocab_size, (2, 8))
    grads = []
    for manual in (False, True):
        for layer in model.layers:
            layer.feed_forward.manual_backward = manual
        model.zero_grad()
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- Meta's checkpoint format ------------------------------------------------------------------

def test_meta_key_names_and_strict_load(tmp_path):
    args = small_args()
    model = build(args, seed=0)
    keys = set(model.state_dict())
    assert {"tok_embeddings.weight", "norm.weight", "output.weight",
            "layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
            "layers.0.attention.wv.weight", "layers.0.attention.wo.weight",
            "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w2.weight",
            "layers.0.feed_forward.w3.weight", "layers.0.attention_norm.weight",
            "layers.1.ffn_norm.weight"} <= keys
    assert len(keys) == 3 + 9 * args.n_layers
    # A file as Meta writes it: plain tensors under these names plus the stray rope.freqs.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["rope.freqs"] = torch.zeros(args.head_dim // 2)
    torch.save(state, tmp_path / "consolidated.00.pth")
    other = build(args, seed=1)
    other.load_state_dict(C.meta_weights(torch.load(tmp_path / "consolidated.00.pth",
                                                    weights_only=True)))
    tokens = torch.randint(0, args.vocab_size, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(other(tokens), model(tokens))


def test_shard_split_follows_meta_and_round_trips():
    args = small_args(vocab_size=98)
    state = build(args).state_dict()
    shards = C.split_state_dict(state, 2)
    assert shards[0]["layers.0.attention.wq.weight"].shape == (args.dim // 2, args.dim)
    assert shards[0]["layers.0.attention.wo.weight"].shape == (args.dim, args.dim // 2)
    assert shards[0]["layers.0.feed_forward.w2.weight"].shape == (args.dim, args.ffn_hidden // 2)
    assert shards[0]["tok_embeddings.weight"].shape == (args.vocab_size, args.dim // 2)
    assert shards[1]["norm.weight"].shape == (args.dim,)
    merged = C.merge_state_dicts(shards)
    assert merged.keys() == state.keys()
    for k in state:
        assert torch.equal(merged[k], state[k])


def test_params_json_round_trip():
    args = small_args(ffn_dim_multiplier=1.3)
    import json
    again = M.ModelArgs.from_dict(json.loads(args.to_json()))
    assert again == args
    meta = {"dim": 64, "multiple_of": 16, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-6,
            "vocab_size": -1}
    assert M.ModelArgs.from_dict(meta, vocab_size=97).vocab_size == 97


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,message", [
    (dict(dim=100, n_heads=8), "dim=100 must be divisible by n_heads=8"),
    (dict(n_heads=4, n_kv_heads=3), "n_heads=4 must be divisible by n_kv_heads=3"),
    (dict(n_layers=0), "n_layers=0 must be a positive"),
    (dict(dim=-64), "dim=-64 must be a positive"),
    (dict(vocab_size=-1), "tokenizer's n_words"),
    (dict(dim=12, n_heads=4), "must be even"),
])
def test_bad_model_args_say_what_to_change(kw, message):
    with pytest.raises(ValueError, match=message):
        small_args(**kw)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="choose one of tiny"):
        M.preset("3b")


def test_positions_beyond_max_seq_len_refused():
    model = build(small_args(max_seq_len=8))
    with pytest.raises(ValueError, match="exceed max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
