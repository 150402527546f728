"""
model.py -- the LLaMA transformer, on one device, in plain PyTorch.

This file is the single-device reference for the whole project: the architecture of the LLaMA
paper [LLaMA §2.2], with the parameter names of Meta's release so that a Meta
`consolidated.00.pth` loads into it unchanged. It knows nothing of processes or device counts:
parallel.py splits these very modules across devices, train.py trains them, generate.py samples
from them. It imports no other file of the project and never `torch.distributed`.

    python model.py                 # prints the presets: parameters and FLOPs per token

Reading order
  1. ModelArgs and PRESETS     the architecture as a dataclass; Table 2 of the paper
  2. RMSNorm and Linear        activation_dtype (bf16 under autocast); pre-normalization in fp32;
                               the one Linear every projection uses
  3. Rotary embeddings         Meta's interleaved pairs, complex products; 2x2 rotations compiled
  4. Attention                 grouped KV heads, a KV cache, three kernels (xformers/sdpa/math)
  5. FeedForward               SwiGLU, with an optional hand-written backward [LLaMA §2.4]
  6. TransformerBlock, Transformer   embed, rotations, the blocks, head (the steps a pipeline
                               stage runs on its own parts)
  7. Counting                  exact parameters, model FLOPs per token, and the GPUs' data-sheet
                               peaks: MFU's numerator and denominator
  (Meta's file layout -- which weight is split along which dimension -- is checkpoint.py's.)
  ---------------------------------------------------------------------------- (the banner)
  8. Checks and backends       ModelArgs refused in one line (a params.json from anywhere); which
                               attention kernel runs, xformers probed once; main

One block, pre-normalized (no biases anywhere, no dropout):

    h   = x + wo( attention( rope(wq(norm(x))), rope(wk(norm(x))), wv(norm(x)) ) )
    out = h + w2( silu(w1(norm(h))) * w3(norm(h)) )

Shape legend: B batch, T sequence (this call), S positions in the KV cache, D model width,
H query heads, K key/value heads, E head dim (D / H), F FFN hidden, V vocab.

What this file leaves out: dropout (LLaMA uses none), biases, tied embeddings (LLaMA unties them),
and anything parallel. The initialization is ours: Meta did not publish theirs (see Transformer).

Papers: LLaMA (arXiv 2302.13971), RoFormer (2104.09864), GLU variants (2002.05202),
RMSNorm (1910.07467), GQA (2305.13245), Megatron-LM (1909.08053) for the initialization.
"""

import functools
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------
# 1. ModelArgs and PRESETS
# ---------------------------------------------------------------------------------------------

@dataclass
class ModelArgs:
    """The architecture. Field names are Meta's, so `params.json` of a release reads directly."""
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None      # None: as many as n_heads (LLaMA-1 has no GQA)
    vocab_size: int = 32000               # Meta writes -1, "take it from the tokenizer"
    multiple_of: int = 256                # FFN hidden width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None  # Llama-2 70B scales the FFN; LLaMA-1 does not
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048

    def __post_init__(self):
        self.n_kv_heads = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        check_args(self)                      # below the banner: one line per impossible value

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        # PAPER: SwiGLU uses 2/3 of 4d so that its three matrices cost what two 4d ones would
        # [LLaMA §2.2]; Meta then rounds up to a multiple of 256: 11008 for dim 4096.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, params: dict, **overrides) -> "ModelArgs":
        """Read a `params.json` (ours or Meta's); unknown keys are ignored, overrides win."""
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in params.items() if k in known}, **overrides})


# PAPER: Table 2 of LLaMA; all share vocab 32000, head dim 128 and context 2048. `tiny` trains on
# a laptop CPU in minutes and admits tensor parallelism 1, 2 and 4 (heads and KV heads divisible
# by 4); `1b` is a GPU benchmark size with the same head dim as the paper's models.
PRESETS = {
    "tiny": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=4096, multiple_of=32,
                 max_seq_len=256),
    "1b":  dict(dim=2048, n_layers=18, n_heads=16),
    "7b":  dict(dim=4096, n_layers=32, n_heads=32),
    "13b": dict(dim=5120, n_layers=40, n_heads=40),
    "33b": dict(dim=6656, n_layers=60, n_heads=52),
    "65b": dict(dim=8192, n_layers=80, n_heads=64),
}


def preset(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelArgs(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------
# 2. RMSNorm and Linear
# ---------------------------------------------------------------------------------------------

def activation_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype activations are kept in: autocast's (bf16) where it is on, else `dtype`.

    NOTE: this is Megatron's choice under mixed precision: the residual stream, the norms'
    outputs and every tensor sent between ranks are bf16, and fp32 lives in the weights and the
    optimizer. Without it, fp32 weights under autocast make the residual stream fp32 (the
    embedding's output, then fp32 + bf16 at each residual add), 4 bytes a value instead of 2.
    """
    on = torch.is_autocast_enabled(device.type)
    return torch.get_autocast_dtype(device.type) if on else dtype


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean and the bias [RMSNorm]."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # NOTE: the mean of squares is taken in fp32 even under bf16 autocast (bf16 keeps 8
        # mantissa bits, too few for a sum over 4096 features), then cast back, as Meta does;
        # the gain too, so that a bf16 stream stays bf16 with fp32 weights.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight.type_as(x)


class Linear(nn.Linear):
    """y = x W^T, no bias (LLaMA has none): every projection of the model is one of these.

    PERF: decoding at batch 1 multiplies one vector by each weight, so a step is bound by reading
    the weights. Under torch.compile on CPU that product is written as an elementwise product and
    a sum over `in`, which inductor fuses into one vectorized pass over the weight spread over
    every core; MKL's matrix-vector product, which F.linear calls, runs on one. On a shared
    2-core machine, tests/bench_cpu.py decode (a 134M-parameter model, 438 MB of weights read a
    token) ran compiled at 49-51 tokens/s, eager at 41-43 tokens/s, against a bound of 59-60
    tokens/s (a copy's 26 GB/s). Eager, the product would be materialized, and for several rows
    it would be a matmul without a matmul kernel: F.linear stays the path.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return project(x, self.weight)


def project(x, weight):
    """x (.., in) times weight (out, in) transposed -> (.., out): Linear's product (PERF above)."""
    if torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == x.shape[-1]:
        return (weight * x.unsqueeze(-2)).sum(-1)                   # (.., out): one row
    return F.linear(x, weight)


def fuse(*linears) -> torch.Tensor:
    """The linears' weights stacked by rows into one matrix, each weight becoming a view of its
    rows: one product then reads them all, and the parameters keep their names and values."""
    fused = torch.cat([m.weight.detach() for m in linears])
    for m, rows in zip(linears, fused.split([m.weight.shape[0] for m in linears])):
        m.weight.data = rows
    return fused


# ---------------------------------------------------------------------------------------------
# 3. Rotary embeddings
# ---------------------------------------------------------------------------------------------

def rope_tables(head_dim: int, max_seq_len: int, theta: float = 10000.0):
    """cos and sin of angle m * theta^(-2i/E) for position m and pair i: two (max_seq_len, E/2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (E/2,)
    angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)               # (S, E/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each consecutive pair (x0, x1), (x2, x3), ... of the head dim by its angle.

    This is Meta's layout: the pair (x[2i], x[2i+1]) is the complex number x[2i] + j x[2i+1],
    multiplied by e^{j m theta_i} = cos + j sin. Written out as a 2x2 rotation:

        [x'_2i  ]   [cos  -sin] [x_2i  ]
        [x'_2i+1] = [sin   cos] [x_2i+1]

    Hugging Face pairs feature i with feature i + E/2 instead ("rotate half"); the two agree only
    after permuting the rows of wq and wk, which is why Meta checkpoints load here unpermuted.
    x: (B, T, heads, E); cos, sin: (T, E/2).
    """
    if torch.compiler.is_compiling():
        # NOTE: inductor writes no code for complex numbers (it warns and runs them as eager
        # kernels); the 2x2 rotation in real numbers fuses into one pass with its neighbours.
        x_even, x_odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)   # (B, T, heads, E/2) each
        cos, sin = cos[:, None, :], sin[:, None, :]          # (T, 1, E/2): broadcast over heads
        out = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
        return out.flatten(-2).type_as(x)                    # (B, T, heads, E)
    # PERF: eager, the complex product is one kernel each way, where the 2x2 rotation above runs
    # about ten over strided halves: at the shapes of tests/bench_cpu.py train, the forward and
    # backward of a layer's q and k take 0.6 ms, not 3.8 (13 ms of a step of about 390).
    return ComplexRotation.apply(x, cos, sin)


def rotate_complex(x, cos, sin):
    """x (B, T, heads, E) times cos + j sin (T, E/2), its pairs read as complex numbers.

    NOTE: view_as_complex needs the pairs side by side in memory. A gradient can arrive with
    another layout (on CUDA, the math attention's gradient of k is a transposed matmul result),
    so a tensor whose last dimension is strided is copied first; the usual case copies nothing.
    """
    xc = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))  # (B, T, heads, E/2)
    out = torch.view_as_real(xc * torch.complex(cos, sin)[:, None, :])     # (B, T, heads, E/2, 2)
    return out.flatten(-2).type_as(x)                                      # (B, T, heads, E)


class ComplexRotation(torch.autograd.Function):
    """rotate_complex, whose backward rotates the gradient by the opposite angle.

    NOTE: autograd's own backward of the product would keep the complex table, a new tensor at
    each call; this one keeps cos and sin, views of the model's buffers, so that RoPE keeps no
    activation (planner.activation_bytes_per_layer counts none).
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate_complex(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate_complex(grad, cos, -sin), None, None


# ---------------------------------------------------------------------------------------------
# 4. Attention
# ---------------------------------------------------------------------------------------------

def repeat_kv(x, n_rep: int):
    """(B, S, K, E) -> (B, S, K * n_rep, E): each KV head serves n_rep consecutive query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=2)


def attend(q, k, v, backend: str, visible=None):
    """Causal attention of T new queries over S >= T keys, the last T of which are the queries'.

    q: (B, T, H, E); k, v: (B, S, K, E) -> (B, T, H, E). Query t sits at position S - T + t and
    sees keys 0 .. S - T + t ("bottom-right" causal mask), which covers training (S = T) and
    decoding with a KV cache (S = start_pos + T) with one rule. `visible`, a (T, S) boolean mask
    (True: the query sees the key), replaces that rule where the keys are a whole preallocated
    cache, some of it not yet written (the static decoding path of Attention.forward).
    """
    T, S, E, n_rep = q.shape[1], k.shape[1], q.shape[-1], q.shape[2] // k.shape[2]
    if backend == "xformers":
        # PAPER: the memory-efficient kernel neither stores the T x S weights nor computes the
        # masked scores [LLaMA §2.4]. It takes (B, T, H, E) as it is.
        xops, k, v = xformers_ops(), repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        bias = xops.fmha.attn_bias.LowerTriangularFromBottomRightMask() if T > 1 else None
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    q = q.transpose(1, 2)                                                       # (B, H, T, E)
    causal_sdpa = backend == "sdpa" and visible is None and T in (1, S)
    # NOTE: grouped heads need torch 2.5 (SDPA_GROUPS); on CUDA in fp32 the fused kernels that
    # take them may not exist, and SDPA would fall back to its T x S math kernel: there the
    # simpler copy stays.
    if causal_sdpa and SDPA_GROUPS and (q.device.type == "cpu" or q.dtype != torch.float32):
        # PERF: SDPA reads each key/value head for its n_rep query heads (enable_gqa) where
        # repeat_kv, the simpler version below, copies it n_rep times first (and sums the copies'
        # gradients back): ~2.5% of the CPU training step of tests/bench_cpu.py.
        k, v, grouped = k.transpose(1, 2), v.transpose(1, 2), dict(enable_gqa=True)  # (B, K, S, E)
    else:                                                                       # (B, H, S, E)
        k, v, grouped = repeat_kv(k, n_rep).transpose(1, 2), repeat_kv(v, n_rep).transpose(1, 2), {}
    if causal_sdpa:
        # NOTE: SDPA's is_causal aligns the mask top-left, right only when S == T; a cached
        # prefill (S > T > 1) needs the explicit bottom-right mask below. One query sees all.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, **grouped)
        return out.transpose(1, 2)                                              # (B, T, H, E)
    if visible is None:
        visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    else:  # "math": the equation itself, softmax(q k^T / sqrt(E) + mask) v, in fp32
        with torch.autocast(q.device.type, enabled=False):   # bf16 autocast would round q k^T
            scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(E)   # (B, H, T, S)
            scores = scores.masked_fill(~visible, float("-inf"))
            out = (scores.softmax(dim=-1) @ v.float()).type_as(q)               # (B, H, T, E)
    return out.transpose(1, 2)                                                  # (B, T, H, E)


class Attention(nn.Module):
    """Multi-head self-attention with grouped key/value heads and an optional KV cache."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = Linear(args.dim, args.n_heads * self.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * self.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * self.head_dim)
        self.wo = Linear(args.n_heads * self.head_dim, args.dim)
        self.backend = "auto"
        self.cache_k = self.cache_v = None     # (B_max, S_max, K, E) each: Transformer.setup_cache
        self.wqkv = None                       # ((H + 2K) E, D): Transformer.fuse_projections

    def forward(self, x, cos, sin, start_pos=0):
        """x (B, T, D) at positions start_pos.. (an int, or a 0-d tensor: see Transformer)."""
        if self.wqkv is None or torch.is_grad_enabled():
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:                                           # the same three products, as one
            rows = [m.weight.shape[0] for m in (self.wq, self.wk, self.wv)]
            q, k, v = project(x, self.wqkv).split(rows, dim=-1)
        # NOTE: shapes are read off the projections, not the args, so that parallel.py can hand
        # this module a slice of the heads (H/tp, K/tp) without changing this code.
        B, T = q.shape[:2]
        q = q.view(B, T, -1, self.head_dim)                           # (B, T, H, E)
        k, v = k.view(B, T, -1, self.head_dim), v.view(B, T, -1, self.head_dim)  # (B, T, K, E)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache_k is None:                                      # training: S = T
            out = self.core(q, k, v)                                  # (B, T, H, E)
        elif not torch.is_tensor(start_pos):
            # Decoding: write the new keys and values at their positions, attend over all so far.
            end = start_pos + T
            self.cache_k[:B, start_pos:end], self.cache_v[:B, start_pos:end] = k, v
            out = self.core(q, self.cache_k[:B, :end], self.cache_v[:B, :end])  # S = end keys
        else:
            # The same with static shapes, which a CUDA graph can replay: the write is an
            # index_copy_ at tensor positions, and attention spans the whole cache, masked beyond
            # each query's position (by SDPA whatever the backend: xformers takes no such mask).
            pos = start_pos + torch.arange(T, device=x.device)       # (T,)
            self.cache_k[:B].index_copy_(1, pos, k)
            self.cache_v[:B].index_copy_(1, pos, v)
            visible = torch.arange(self.cache_k.shape[1], device=x.device) <= pos[:, None]  # (T, S)
            out = attend(q, self.cache_k[:B], self.cache_v[:B], "sdpa", visible)
        return self.wo(out.flatten(2))                                # (B, T, D)

    def core(self, q, k, v):
        """The part with no weights: softmax(q k^T / sqrt(E)) v. parallel.py recomputes it."""
        return attend(q, k, v, resolve_backend(self.backend, q.device))


# ---------------------------------------------------------------------------------------------
# 5. FeedForward (SwiGLU)
# ---------------------------------------------------------------------------------------------

class SwiGLUFunction(torch.autograd.Function):
    """w2(silu(a) * b) for a = w1 x, b = w3 x, with a hand-written backward [LLaMA §2.4].

    Autograd keeps four tensors of width F for this expression: a, silu(a), b, and the product
    h = silu(a) * b (the input of w2). The backward below keeps only a and b -- the outputs of
    the two expensive matmuls -- and recomputes silu(a) and h, which are cheap elementwise ops:
    2 F values per token instead of 4 F (the w1 and w3 linears keep their input x either way).
    With s = sigmoid(a) and silu(a) = a s, the chain rule gives

        dh = dy w2          dw2 = dy^T h
        db = dh * silu(a)   da  = dh * b * s (1 + a (1 - s))
    """

    @staticmethod
    def forward(ctx, a, b, w2):
        # Under autocast the linear below runs in bf16 like any other (a and b already are).
        ctx.save_for_backward(a, b, w2)
        return F.linear(F.silu(a) * b, w2)                          # (B, T, D)

    @staticmethod
    def backward(ctx, dy):
        # NOTE: the backward may run outside the forward's autocast (it does on CPU), so the
        # dtypes are explicit: everything in dy's dtype, as autograd does for an autocast
        # forward (bf16 matmuls), each gradient cast back to its input's dtype.
        a, b, w2_saved = ctx.saved_tensors
        w2 = w2_saved.to(dy.dtype)
        s = torch.sigmoid(a)
        silu_a = a * s                                              # recomputed, not stored
        h = (silu_a * b).to(dy.dtype)                               # recomputed, not stored
        dh = dy @ w2                                                # (B, T, F)
        db = dh * silu_a
        da = dh * b * s * (1 + a * (1 - s))
        dw2 = dy.flatten(0, -2).t() @ h.flatten(0, -2)              # (D, F)
        return da.to(a.dtype), db.to(b.dtype), dw2.to(w2_saved.dtype)


class FeedForward(nn.Module):
    """SwiGLU [GLU variants]: w1 is the gate, w3 the up projection, w2 the down projection."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.ffn_hidden)
        self.w2 = Linear(args.ffn_hidden, args.dim)
        self.w3 = Linear(args.dim, args.ffn_hidden)
        self.manual_backward = False   # True: SwiGLUFunction; parallel.apply_recompute sets it
        self.w13 = None                # (2F, D): Transformer.fuse_projections

    def forward(self, x):
        if self.w13 is not None and not torch.is_grad_enabled():     # w1 and w3 as one product
            a, b = project(x, self.w13).chunk(2, dim=-1)
            return self.w2(F.silu(a) * b)
        if self.manual_backward and torch.is_grad_enabled():
            return SwiGLUFunction.apply(self.w1(x), self.w3(x), self.w2.weight)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))             # (B, T, D)


# ---------------------------------------------------------------------------------------------
# 6. TransformerBlock and Transformer
# ---------------------------------------------------------------------------------------------

class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, cos, sin, start_pos: int = 0):
        # PAPER: pre-normalization: each sub-layer sees a normalized input, the residual stream
        # itself is never normalized until the final norm [LLaMA §2.2, after GPT-3].
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """tokens (B, T) -> fp32 logits (B, T, V). `state_dict()` keys are exactly Meta's.

    Initialization (Meta did not publish theirs; we use Megatron-LM's, which is also GPT-2's):
    every matrix ~ N(0, 0.02^2), except the two projections that write into the residual stream,
    `wo` and `w2`, whose std is divided by sqrt(2 * n_layers) so that the variance of the residual
    stream stays about constant with depth (each block adds two terms to it). Norm weights are 1.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        self.reset_rotary()                   # the buffers rope_cos, rope_sin: (S_max, E/2)
        self.reset_parameters()

    def _apply(self, fn, *args, **kwargs):
        """.to(), .cuda(), .to_empty() and friends, with the rotary tables kept in fp32.

        NOTE: `model.to(torch.bfloat16)` would round cos and sin to 8 bits of mantissa (errors
        of ~2e-3); Meta keeps freqs_cis in fp32. The tables are derived, so they are rebuilt in
        fp32 on the device the buffers moved to (which also gives real values after to_empty).
        """
        super()._apply(fn, *args, **kwargs)
        self.reset_rotary(self.rope_cos.device)
        for layer in self.layers:            # the weights moved: fused copies would be stale
            layer.attention.wqkv = layer.feed_forward.w13 = None
        return self

    def reset_rotary(self, device=None):
        """Compute the rotary tables, in fp32, on `device` (default: the current one)."""
        # The tables are derived, not learned: non-persistent buffers, so they stay out of the
        # state_dict (Meta's files sometimes carry a stray `rope.freqs`, which
        # checkpoint.meta_weights drops).
        cos, sin = rope_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)    # (S_max, E/2)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def reset_parameters(self, std: float = 0.02):
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.args.n_layers))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def set_attention_backend(self, name: str):
        """'auto' (xformers on CUDA if it loads, else sdpa), 'xformers', 'sdpa' or 'math'."""
        check_backend(name)
        for layer in self.layers:
            layer.attention.backend = name

    @torch.no_grad()
    def fuse_projections(self):
        """For inference: wq|wk|wv and w1|w3 become one matrix each (model.fuse), so that a
        layer runs two products where it ran five. The parameters become views of those
        matrices: state_dict() keeps Meta's names and values, and no memory is added. The fused
        products run only without autograd (the gradients belong to the named parameters); a
        later .to() undoes the fusion.

        PERF: decoding reads every weight once per token, and on a GPU one large product streams
        memory better than several small ones: 208 tokens/s against 186 for a 7b model compiled
        in a CUDA graph on an H200 (tests/gpu_check.py; generate.load_model fuses on CUDA only).
        """
        for layer in self.layers:
            attn, ffn = layer.attention, layer.feed_forward
            attn.wqkv, ffn.w13 = fuse(attn.wq, attn.wk, attn.wv), fuse(ffn.w1, ffn.w3)

    def setup_cache(self, max_batch_size: int, max_seq_len: Optional[int] = None, dtype=None):
        """Preallocate the KV cache for generation; forward() then writes to it at start_pos."""
        max_seq_len = max_seq_len or self.args.max_seq_len
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"cache of {max_seq_len} positions exceeds max_seq_len="
                             f"{self.args.max_seq_len}; raise ModelArgs.max_seq_len")
        for layer in self.layers:
            attn, w = layer.attention, layer.attention.wk.weight    # w: (K E, D), K/tp under tp
            shape = (max_batch_size, max_seq_len, w.shape[0] // attn.head_dim, attn.head_dim)
            kw = dict(device=w.device, dtype=dtype or w.dtype)
            attn.cache_k, attn.cache_v = torch.zeros(shape, **kw), torch.zeros(shape, **kw)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None

    def forward(self, tokens, start_pos=0):
        """tokens (B, T) at positions start_pos .. start_pos + T - 1 -> fp32 logits (B, T, V).

        start_pos is an int, or a 0-d long tensor for decoding with static shapes: then no shape
        depends on the position (each layer writes its cache with index_copy_ and attends over
        all of it under a mask), so that one CUDA graph replays every step (generate.py).
        """
        h = self.embed(tokens)                                        # (B, T, D)
        cos, sin = self.rotations(start_pos, tokens.shape[1])         # (T, E/2)
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos)
        return self.head(h)                                           # (B, T, V)

    # The three steps around the layers, apart so that parallel.PipelineStage, which keeps only
    # some of the parts on each rank, runs these same lines on the parts it has.

    def embed(self, tokens):
        """tokens (B, T) -> the residual stream (B, T, D), bf16 under autocast."""
        h = self.tok_embeddings(tokens)
        return h.to(activation_dtype(h.device, h.dtype))

    def rotations(self, start_pos, T: int):
        """Rotary table rows for positions start_pos .. start_pos + T - 1: cos, sin (T, E/2)."""
        if torch.is_tensor(start_pos):      # the rows gathered on the device: no host read
            rows = start_pos + torch.arange(T, device=start_pos.device)  # (T,)
        elif start_pos + T > self.args.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + T - 1} exceed max_seq_len="
                             f"{self.args.max_seq_len}")
        else:
            rows = slice(start_pos, start_pos + T)                    # a view: nothing copied
        return self.rope_cos[rows], self.rope_sin[rows]

    def head(self, h):
        """The residual stream (B, T, D) -> fp32 logits (B, T, V): final norm, output layer."""
        return self.output(self.norm(h)).float()


# ---------------------------------------------------------------------------------------------
# 7. Counting: parameters, FLOPs, and the peak they are measured against
# ---------------------------------------------------------------------------------------------

def count_parameters(args: ModelArgs, embedding: bool = True) -> int:
    """Exact parameter count from the architecture alone (no tensors are built).

        per layer = D*(H*E) + 2*D*(K*E) + (H*E)*D     wq, wk, wv, wo
                  + 3*D*F                             w1, w2, w3
                  + 2*D                               attention_norm, ffn_norm
        total     = V*D (tok_embeddings) + L * per layer + D (norm) + V*D (output)

    7b: 6,738,415,616 [LLaMA Table 2 rounds it to 6.7B]. embedding=False leaves out the input
    embedding table, a lookup that does no matmul.
    """
    D, L, V, E, F_ = args.dim, args.n_layers, args.vocab_size, args.head_dim, args.ffn_hidden
    H, K = args.n_heads, args.n_kv_heads
    per_layer = D * H * E + 2 * D * K * E + H * E * D + 3 * D * F_ + 2 * D
    return (V * D if embedding else 0) + L * per_layer + D + V * D


def flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """Model FLOPs to train on one token: 6 N + 12 L D T [PaLM appendix B].

    N = count_parameters(embedding=False): each weight does one multiply-add (2 FLOPs) per token
    forward and two backward (input and weight gradients), hence 6 N. The attention scores and
    their use, q k^T and p v, add 2 * 2 * T * D per layer forward, times 3 with the backward:
    12 L D T, counted as if unmasked (the standard convention; a causal kernel does half).
    Recomputation is not counted: MFU measures useful work only.
    """
    return 6 * count_parameters(args, embedding=False) + 12 * args.n_layers * args.dim * seq_len


@dataclass
class GPU:
    peak: float          # dense bf16 FLOP/s, from the data sheet
    memory: float        # bytes
    nvlink: float        # bytes/s per GPU, one direction, inside a node of 8
    network: float       # bytes/s per GPU, one direction, between nodes (one NIC per GPU)


# The one table of GPUs in the project: MFU's denominator here (data_sheet_peak, which train.py
# reads), and planner.py's hardware for its predictions of memory and time.
GPUS = {
    "a100-40gb": GPU(312e12, 40 * 2**30, 300e9, 25e9),      # NVLink 3; HDR InfiniBand 200 Gb/s
    "a100-80gb": GPU(312e12, 80 * 2**30, 300e9, 25e9),
    "h100-80gb": GPU(989e12, 80 * 2**30, 450e9, 50e9),      # NVLink 4; NDR InfiniBand 400 Gb/s
    "h200-141gb": GPU(989e12, 141 * 2**30, 450e9, 50e9),    # an H100 with more, faster memory
}


# Cards of a family that run slower than its SXM module: NVIDIA's data sheets, dense bf16 (half
# the figure "with sparsity"). An A100's PCIe card has its SXM peak.
SLOWER_CARDS = {"h100 pcie": 756e12, "h100 nvl": 835e12, "h200 nvl": 835e12}


def data_sheet_peak(device_name: str) -> Optional[tuple]:
    """(family, dense bf16 FLOP/s) for a name as torch.cuda.get_device_name gives it ("NVIDIA
    A100-SXM4-80GB" -> ("A100", 312e12), "NVIDIA H100 PCIe" -> ("H100 PCIE", 756e12)), from
    SLOWER_CARDS or GPUS; None for a GPU in neither."""
    for card, peak in SLOWER_CARDS.items():
        if card in device_name.lower():
            return card.upper(), peak
    for key, gpu in GPUS.items():
        family = key.split("-")[0]
        if family in device_name.lower():
            return family.upper(), gpu.peak
    return None


# =============================================================================================
# Below: what running the model for real needs and its reader does not -- ModelArgs refused in
# one line each, which attention kernel runs (xformers probed once), and main.
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# 8. Checks and backends
# ---------------------------------------------------------------------------------------------

def check_args(a: ModelArgs) -> None:
    """Every field a number of its kind (a params.json may hold "4096" or true), then the rules
    an architecture must obey, each refused with what to change."""
    for f in fields(a):
        value, whole = getattr(a, f.name), f.type in (int, Optional[int])
        fits = isinstance(value, int if whole else (int, float)) and not isinstance(value, bool)
        if not (fits and math.isfinite(value) or value is None and f.name == "ffn_dim_multiplier"):
            raise ValueError(f"ModelArgs.{f.name}={value!r} must be "
                             f"{'an integer' if whole else 'a finite number'}")
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len"):
        if getattr(a, name) <= 0:
            raise ValueError(f"ModelArgs.{name}={getattr(a, name)} must be a positive integer")
    for ok, message in (         # in order: the divisions below need the positive counts above
            (a.vocab_size > 0, f"ModelArgs.vocab_size={a.vocab_size} must be positive; Meta's "
                               "params.json says -1: replace it by the tokenizer's n_words"),
            (a.dim % a.n_heads == 0, f"dim={a.dim} must be divisible by n_heads={a.n_heads}; "
                                     f"choose n_heads among the divisors of {a.dim}"),
            (a.n_heads % a.n_kv_heads == 0, f"n_heads={a.n_heads} must be divisible by n_kv_heads="
             f"{a.n_kv_heads}: each KV head serves a whole group of query heads"),
            (a.head_dim % 2 == 0, f"head dim dim/n_heads={a.head_dim} must be even: rotary "
                                  "embeddings rotate pairs of features"),
            (a.norm_eps > 0 and a.rope_theta > 0, "norm_eps and rope_theta must be positive")):
        if not ok:
            raise ValueError(message)


ATTENTION_BACKENDS = ("auto", "xformers", "sdpa", "math")
SDPA_GROUPS = torch.__version__ >= "2.5"    # enable_gqa; TorchVersion compares as versions


@functools.cache
def xformers_ops():
    """xformers.ops, or None when the package is absent or has no usable kernel here.

    NOTE: the package can import while its CUDA extension does not load (a wheel built for
    another torch or CUDA), or while it has a forward kernel and no backward for this GPU; its
    kernels then refuse a call, the backward's in the middle of training. With a GPU present,
    one tiny training call decides, once per process (xformers_trains), so that `auto` falls
    back to sdpa instead of failing mid-run.
    """
    try:
        import xformers.ops as xops
    except Exception:  # ImportError, or a build whose extension fails to load
        return None
    return xops if not torch.cuda.is_available() or xformers_trains(xops, "cuda") else None


def xformers_trains(xops, device) -> bool:
    """Whether xops' memory-efficient attention runs forward and backward, in bf16, on device."""
    try:
        x = torch.zeros(1, 8, 1, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        xops.memory_efficient_attention(x, x, x).sum().backward()
        return x.grad is not None
    except Exception:  # a kernel missing for this GPU, dtype or pass
        return False


def check_backend(name: str):
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of "
                         f"{', '.join(ATTENTION_BACKENDS)}")


def resolve_backend(name: str, device: torch.device) -> str:
    """`auto` picks xformers on CUDA when it loads, else torch's fused SDPA."""
    check_backend(name)
    if name == "auto":
        return "xformers" if device.type == "cuda" and xformers_ops() else "sdpa"
    if name == "xformers" and (device.type != "cuda" or not xformers_ops()):
        raise ValueError("attention backend 'xformers' needs CUDA and the xformers package; "
                         "use 'sdpa' or 'math' on this machine")
    return name


def plan_free_attention():
    """Leave cuDNN's SDPA kernel out of "sdpa" for the rest of the process (decoding, eval).

    PERF: cuDNN builds an execution plan for every new shape, about 2 ms per layer on an H200,
    which pays only where shapes repeat, as in training. Decoding and evaluation change shape
    with every step, prompt or batch. At 7b shapes in bf16 on an H200 (tests/gpu_check.py, the
    README's table): eager decoding went from 11 to 39 tokens/s, and a 64-token prefill from
    118 ms to 68 ms. A step replayed from a CUDA graph, whose one shape cuDNN plans once, runs
    at 140 tokens/s without it (186 compiled); an earlier run that measured both found it slower
    without cuDNN, 127 against 134 tokens/s (183 against 201 compiled), which loses the 50 ms a
    prefill saves after some 100-130 tokens. Keeping the default is the simpler version. A no-op
    on CPU.
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


def main():
    print(f"{'preset':>6} {'params':>15} {'non-embed':>15} {'GFLOP/token@seq':>16}")
    for name in PRESETS:
        a = preset(name)
        print(f"{name:>6} {count_parameters(a):>15,} {count_parameters(a, embedding=False):>15,} "
              f"{flops_per_token(a, a.max_seq_len) / 1e9:>16.2f}")


if __name__ == "__main__":
    main()
