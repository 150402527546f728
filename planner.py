"""
planner.py -- every prediction this project makes, from formulas: what parallel.py's
configurations cost per layer and per step, and whether a tp x pp x dp layout fits and how fast
it trains at a cluster scale no test can reach.

It predicts two kinds of thing:
  - accounting, exact for this code: the activation bytes a layer keeps for backward and the
    collectives of one optimizer step. tests/test_parallel.py and tests/test_pipeline.py measure
    both on gloo workers (saved_tensors_hooks, a patched torch.distributed) and hold them equal.
  - a plan: memory per GPU, communication, bubble and time of a layout, under one stated set of
    assumptions, checked against two published runs: LLaMA-65B at about 380 tokens/s/GPU on 2048
    A100-80GB, 21 days for 1.4T tokens [LLaMA §2.4], and Megatron's 1T-parameter model at 163
    TFLOP/s per A100, 52% of peak [PTD-P §5.1].
It imports model.py (parameter and FLOP counts, the GPUs' data sheet) and parallel.py (the
schedules, the gradient buckets, the checks); neither imports it.

    python planner.py --accounting                          # tiny and 7b, per layer and step
    python planner.py --preset 65b --gpus 2048 --gpu a100-80gb --tp 8 --pp 4 --seq-len 2048 \\
        --global-batch-tokens 4M --recompute selective --train-tokens 1.4T     # one layout
    python planner.py --preset 65b --gpus 2048 --search     # rank the layouts
    python planner.py --preset 13b --serve --gpu a100-40gb  # inference memory
    python planner.py --check                               # the published runs
    add --json for a machine-readable answer

Reading map
  1. Assumptions   ASSUMPTIONS, PRECISIONS, PUBLISHED: every number it takes (GPUS: model.py)
  2. Accounting    activation bytes per layer; collectives and bytes on the wire
  3. Memory        parameters and activations per GPU, a step's lower bound (train.py's
                   check), and inference (weights + KV)
  4. Time          plan(): one layout, in full
  5. Search        every layout that fits, fastest first
  (below the banner: the printed plan, the tables, the command line)

The model of a step, stated once. A micro-batch costs a pipeline stage
    max(compute, tp collectives) + pipeline sends
with compute at compute_efficiency x the data-sheet peak (recomputation included), tp
collectives overlapped with it as LLaMA does [LLaMA §2.4], sends and all-reduces at
link_efficiency x the link's bandwidth, ring algorithms (wire_bytes). The slowest stage sets
the pace; a step is (m + (pp - 1) / v) micro-batches plus the all-reduces after the flush
(dp's, and tp's once-a-step few bytes): the bubble (pp-1)/(v m) of PTD-P §2.2. parallel.py
overlaps only the column linears' backward collectives, so plan() also gives the step as this
code runs it: compute + the other tp collectives (tp_overlapped_bytes). Memory per GPU:
weights, gradients and optimizer state of its stage (2 + 4 + 12 bytes per parameter), plus the
activations its schedule holds at the worst moment (parallel.in_flight over the schedule).

What this leaves out: ZeRO/FSDP sharding of optimizer state, overlap of the dp all-reduce with
backward (counted after the flush, where PTD-P sends it; parallel.py's buckets start during a
rank's last backward where that micro-batch's forward came just before it, at pp = 1 and on
1F1B's last rank, so a pp = 1 step is a little shorter than planned; at pp > 1 the first rank,
which ends the step, sends them all after its flush), the optimizer step's time, network
topology and congestion, stragglers and failures, the causal kernel doing half the attention
FLOPs (counted whole, the MFU convention). Each moves a real run by a few percent; the two
published runs land within 8% (tests/test_planner.py).

Papers: PTD-P (arXiv 2104.04473), Korthikanti et al. (2205.05198), LLaMA (2302.13971), PaLM
(2204.02311) appendix B for MFU.
"""

import argparse
import itertools
import json
import math
from dataclasses import asdict, replace
from typing import Optional

import torch

import cli
from checkpoint import shard_dim
from model import (GPUS, PRESETS, SDPA_GROUPS, ModelArgs, Transformer, count_parameters,
                   flops_per_token, preset)
from parallel import (PIPELINE_SCHEDULES, RECOMPUTE_MODES, check_config, check_pipeline,
                      default_schedule, in_flight, make_buckets, schedule_order)


# ---------------------------------------------------------------------------------------------
# 1. Assumptions
# ---------------------------------------------------------------------------------------------

# The assumptions, one set for every prediction; `plan` prints them.
ASSUMPTIONS = dict(
    compute_efficiency=0.60,   # of peak, for every FLOP; calibrated on the Megatron-1T run
    link_efficiency=0.80,      # of a link's bandwidth, for every collective and send
    gpus_per_node=8,           # tp within a node (NVLink); pp and dp between nodes (network)
    usable_memory=0.90,        # of a GPU's memory; the rest: CUDA context, fragmentation
)
# NOTE: this code's bf16 is fp32 weights under autocast, which keeps bf16 copies of them through
# forward and backward: 4 + 2 bytes of weights and 8 of AdamW state where Megatron counts 2 and
# 4 + 8 (its fp32 master copy in the optimizer): the same 18 bytes per parameter in all.
PRECISIONS = {  # bytes per parameter (weights, gradients, optimizer) and per activation element
    "bf16": (2, 4, 12, 2),     # Megatron's mixed precision: fp32 gradients, master weights, m, v
    "fp32": (4, 4, 8, 4),      # this code on CPU: fp32 everything, AdamW's m and v
}


# The published runs the assumptions must reproduce (`--check`; tests/test_planner.py):
# (model, layout as plan() keywords, {figure: published value}). Both with our sp, which splits
# the pipeline's messages over tp as Megatron's scatter/gather does [PTD-P §4.1]. How much they
# prove: compute_efficiency = 0.60 is the value that reproduces Megatron-1T's 163 TFLOP/s, so
# that check is a fit; LLaMA-65B is the one the assumptions were not fitted to. LLaMA publishes
# no layout (§2.4 names model and sequence parallelism only): tp 8 x pp 4 is our assumption, tp
# filling a node of 8 and pp 4 the shallowest pipeline that then fits (pp 2 needs 73.8 of 72
# usable GiB). parallel.py, which overlaps the backward's column collectives and leaves the
# forward's (and g_sp's backward all-gather) exposed: 323 tokens/s/GPU for 65B where all of tp
# overlapped gives 353 (306 with none overlapped).
PUBLISHED = {
    "LLaMA-65B on 2048 A100-80GB [LLaMA §2.4]": (
        PRESETS["65b"], dict(gpus=2048, tp=8, pp=4, recompute="selective", train_tokens=1.4e12),
        dict(tokens_per_s_per_gpu=380, days=21)),
    "Megatron 1T on 3072 A100 [PTD-P Table 1]": (
        dict(dim=25600, n_layers=128, n_heads=160, vocab_size=51200),
        dict(gpus=3072, tp=8, pp=64, virtual_stages=2, recompute="full",
             global_batch_tokens=3072 * 2048),
        dict(megatron_tflops_per_gpu=163)),
}


# ---------------------------------------------------------------------------------------------
# 2. Accounting
# ---------------------------------------------------------------------------------------------
# Two predictions exact for this code, from the configuration alone: the bytes a layer keeps for
# backward, and the collectives of a step. tests/test_parallel.py measures both on gloo workers
# (saved_tensors_hooks, a patched torch.distributed) and holds them equal.

def activation_bytes_per_layer(args: ModelArgs, batch: int, seq_len: int, tp: int = 1,
                               sp: bool = False, recompute: str = "none",
                               bytes_per_el: int = 4, tp_overlap: bool = True,
                               grouped_kv: bool = SDPA_GROUPS) -> float:
    """Bytes that autograd keeps, per transformer layer, between forward and backward.

    Derived for this code, the way Korthikanti Table 2 derives a GPT layer, for activations of b
    bytes per element: b = 4 in fp32, b = 2 under bf16 autocast, where model.activation_dtype
    keeps the residual stream and every activation in bf16 (Megatron's choice); what stays fp32
    is written as 4 below. Autocast's bf16 copies of the weights are not activations (per layer,
    not per token): they are counted with the weights (PRECISIONS). Per token, t = tp:

      RMSNorm        its input in fp32 (4D), the normalized x (bD), 1/rms in fp32 (4)   (4+b)D + 4
      attention      the wq/wk/wv input y (bD); SDPA's q and its output, also wo's input
                     (2bD), k and v (2bKE: at K heads, read by SDPA for their query heads), and
                     the log-sum-exp (4 per head). RoPE keeps nothing: cos and sin are constants.
                     grouped_kv=False (xformers, the math backend, CUDA in fp32, torch < 2.5):
                     k and v are repeated to H heads before the kernel, and KE below reads D.
                     Its default is this machine's torch, not the planned run's backend.
      SwiGLU         y (bD); a = w1 y, b = w3 y, silu(a), silu(a) * b (4bF)

      none                 (8 + 6b) D + 2b K E + 4b F + 4H + 8
      tp                   (8 + 4b) D + 8  +  (2b D + 2b K E + 4b F + 4H) / t
      tp + sp              [(8 + 6b) D + 2b K E + 4b F + 4H + 8] / t      (everything split)
      tp + sp + selective  [(8 + 6b) D + 2b K E + 2b F + 8] / t
      full                 b D / t with sp, b D without                   (the block's input)

    What each mode keeps and recomputes: parallel.apply_recompute's table. In bf16 (b = 2) with
    K = H (7B) the none row is 24D + 8F + 4H + 8: with F = 8D/3, about 45 D bytes per token,
    where Korthikanti's GPT layer keeps 34 D + 5 a s (no attention matrix here: it is fused).
    tp_overlap=False (the plain tp backward: f_sp, then plain products) keeps the gathered input
    instead of the shard under sp: + 2 b D (1 - 1/t).
    """
    D, F_, H, K, E, b, t = (args.dim, args.ffn_hidden, args.n_heads, args.n_kv_heads,
                            args.head_dim, bytes_per_el, tp)
    seq_div = t if sp else 1                                     # residual stream: split under sp
    norm = (4 + b) * D + 4
    y = b * D / t if sp and tp_overlap else b * D                # a sub-layer's column input
    if recompute == "full":
        per_token = b * D / seq_div
    elif recompute == "selective":
        per_token = 2 * norm / seq_div + 2 * y + (2 * b * D + 2 * b * K * E + 2 * b * F_) / t
    else:
        kv = K * E if grouped_kv else D                          # k and v, each, as SDPA keeps them
        per_token = 2 * norm / seq_div + 2 * y + (2 * b * D + 2 * b * kv + 4 * H + 4 * b * F_) / t
    return per_token * batch * seq_len


def local_parameter_numels(args: ModelArgs, tp: int) -> list:
    """Elements of each of one tp rank's parameters, in model.parameters() order (GradSync's
    buckets follow it): read off a Transformer built on the meta device, which allocates nothing;
    a split tensor holds 1/tp of its elements along whichever dimension parallelize splits it."""
    with torch.device("meta"):
        model = Transformer(args)
    return [p.numel() // (tp if shard_dim(name) is not None else 1)
            for name, p in model.named_parameters()]


def wire_bytes(op: str, n: int, payload: float) -> float:
    """Bytes one rank sends with a ring algorithm: 2 (n-1)/n for all-reduce, (n-1)/n otherwise.

    payload: the all-reduced tensor, or the full (gathered / pre-scatter) tensor.
    """
    return (2 if op == "all_reduce" else 1) * (n - 1) / n * payload


def comm_per_step(args: ModelArgs, batch: int, seq_len: int, tp: int = 1, dp: int = 1,
                  sp: bool = False, recompute: str = "none", micro_batches: int = 1,
                  bucket_mb: float = 25.0, overlap: bool = True, bytes_per_el: int = 4,
                  tp_overlap: bool = True, grad_bytes: int = 4) -> dict:
    """Collectives one rank launches per optimizer step: {"tp all_gather": (calls, payload)...}.

    batch is this rank's micro-batch. A step = micro_batches forward+backward passes,
    GradSync.finish and clip_grad_norm. A = batch * seq_len * D * b, the payload of one
    activation (b = bytes_per_el: 2 under bf16 autocast); gradients are fp32 whatever b
    (grad_bytes); per pass:

      tp, no sp   all-reduce: embedding (fwd) + 2 per layer fwd (g) + 2 per layer bwd (f)
                  + output (bwd f) = 2 + 4L; full recompute runs g again in bwd: + 2L
      tp + sp     all-gather: 2L + 1 fwd (f_sp) + 2L + 1 bwd (g_sp, embedding included)
                  + with tp_overlap, one regather of the kept shard per region in bwd
                  (attention, FFN, output: 2L + 1; parallel.ColumnParallelLinears)
                  reduce-scatter: 2L + 1 fwd (g_sp) + 2L + 1 bwd (f_sp); full: + 2L of each
      loss        3 all-reduces of N fp32 numbers (max, sum of exp, target logit)
      per step    sp: one all-reduce of the 2L+1 norm weight gradients; clipping: one scalar
      dp          one all-reduce per bucket (bucketed) or per parameter (naive) of all local
                  gradients: P/tp elements (norms whole), once per step whatever micro_batches

    The bytes on the wire follow from `wire_bytes`: the same A crosses the wire for one
    all-reduce as for one all-gather plus one reduce-scatter, which is why sp is free [Korthikanti
    §4.2.2]: it turns 4 all-reduces per layer into 4 all-gathers and 4 reduce-scatters.
    """
    L, A, N = args.n_layers, batch * seq_len * args.dim * bytes_per_el, batch * seq_len
    m, full = micro_batches, int(recompute == "full")
    out = {}

    def add(key, calls, payload):
        c, p = out.get(key, (0, 0))
        out[key] = (c + calls, p + calls * payload)

    if tp > 1:
        if not sp:
            add("tp all_reduce", m * (2 + 4 * L + 2 * L * full), A)
        else:
            regathers = (2 * L + 1) if tp_overlap else 0
            add("tp all_gather", m * (4 * L + 2 + 2 * L * full + regathers), A)
            add("tp reduce_scatter", m * (4 * L + 2 + 2 * L * full), A)
            add("tp all_reduce", 1, (2 * L + 1) * args.dim * grad_bytes)
        add("tp all_reduce", 3 * m, N * 4)
        add("tp all_reduce", 1, 4)
    if dp > 1:
        numels = local_parameter_numels(args, tp)
        calls = (len(make_buckets(numels[::-1], bucket_mb * 2**20, grad_bytes)) if overlap
                 else len(numels))
        add("dp all_reduce", calls, sum(numels) * grad_bytes / calls)
    return out


def tp_overlapped_bytes(args: ModelArgs, batch: int, seq_len: int, tp: int, sp: bool,
                        bytes_per_el: int = 4) -> float:
    """Of one pass's tp bytes on the wire (comm_per_step), those that parallel.py sends while
    it computes: in the backward of each region's column linears (attention, FFN, output: 2L +
    1), the reduction of the input gradient, an all-reduce, or under sp a reduce-scatter and
    the all-gather of the kept shard (ColumnParallelLinears). The rest is exposed: the
    forward's collectives, g_sp's backward all-gather, the loss's, a full recompute's forward."""
    A = batch * seq_len * args.dim * bytes_per_el
    region = (wire_bytes("reduce_scatter", tp, A) + wire_bytes("all_gather", tp, A) if sp
              else wire_bytes("all_reduce", tp, A))
    return (2 * args.n_layers + 1) * region


# ---------------------------------------------------------------------------------------------
# 3. Memory
# ---------------------------------------------------------------------------------------------

def per_block(count, args: ModelArgs, *more) -> tuple:
    """A whole-model count of model.py (count_parameters, flops_per_token) split in two: what one
    transformer block adds, and the rest (embedding, final norm, output). Both counts are linear
    in the depth, count(L) = L x block + rest, so two depths give both."""
    one, two = (count(replace(args, n_layers=n), *more) for n in (1, 2))
    return two - one, 2 * one - two


def stage_parameters(args: ModelArgs, tp: int, pp: int, rank: int = 0) -> int:
    """Parameters one GPU holds: its stage's blocks, their matrices split over tp and their two
    norms (D each) whole; the embedding (V x D, split) on the first stage, the final norm and the
    output (V x D, split) on the last."""
    D, VD = args.dim, args.vocab_size * args.dim
    block, _ = per_block(count_parameters, args)
    n = args.n_layers // pp * ((block - 2 * D) // tp + 2 * D)
    return n + (VD // tp if rank == 0 else 0) + (D + VD // tp if rank == pp - 1 else 0)


def chunk_activation_bytes(args: ModelArgs, micro_batch: int, seq_len: int, tp: int = 1,
                           pp: int = 1, virtual_stages: int = 1, sp: bool = False,
                           recompute: str = "none", bytes_per_el: int = 4, rank: int = 0) -> list:
    """The activation bytes one micro-batch's forward keeps, for each chunk of a pipeline rank.

    A chunk's forward keeps its layers' activation_bytes_per_layer, plus its output (B, T, D),
    held for the backward call (Megatron frees its data once sent), or, on the last chunk,
    the head: the final norm (as a layer's), the output layer's input, and what the loss keeps
    in fp32: exp(z - max) written over the logits (B, T, V/tp) and its sum (B, T). A chunk that
    receives its input (every chunk but the model's first) keeps it too, held by pipeline_step
    for the backward: counted in its first layer's bytes where autograd saves it as it is (fp32,
    whose RMSNorm saves x, and full recomputation, which saves the block's input), but under bf16
    autocast RMSNorm saves its fp32 copy, and the received bf16 input, (B, T/tp, D) under sp,
    comes on top.
    Token ids and masks (integers) are not counted.
    """
    b, t, N, D = bytes_per_el, tp if sp else 1, micro_batch * seq_len, args.dim
    n = args.n_layers // (pp * virtual_stages)
    layers = n * activation_bytes_per_layer(args, micro_batch, seq_len, tp, sp, recompute, b)
    head = N * (((4 + b) * D + 4) / t + b * D / t + 4 * args.vocab_size / tp + 4)
    received = N * D * b / t if b < 4 and recompute != "full" else 0     # the input, bf16 only
    chunks = [k * pp + rank for k in range(virtual_stages)]              # in the model's order
    return [layers + (head if c == pp * virtual_stages - 1 else N * D * b / t)
            + (received if c > 0 else 0) for c in chunks]


def stage_activation_bytes(args: ModelArgs, micro_batch: int, seq_len: int, tp: int = 1,
                           pp: int = 1, virtual_stages: int = 1, micro_batches: int = 1,
                           schedule: Optional[str] = None, sp: bool = False,
                           recompute: str = "none", bytes_per_el: int = 4, rank: int = 0) -> float:
    """The most activation bytes a pipeline rank holds at once over one step's schedule: its
    chunks' chunk_activation_bytes, counted over parallel.in_flight."""
    sizes = chunk_activation_bytes(args, micro_batch, seq_len, tp, pp, virtual_stages, sp,
                                   recompute, bytes_per_el, rank)
    schedule = schedule or default_schedule(virtual_stages)
    return in_flight(schedule, pp, micro_batches, virtual_stages, rank, sizes)


def stage_step_bytes(args: ModelArgs, micro_batch: int, seq_len: int, tp: int = 1, pp: int = 1,
                     virtual_stages: int = 1, micro_batches: int = 1,
                     schedule: Optional[str] = None, sp: bool = False, recompute: str = "none",
                     precision: str = "fp32", rank: int = 0, copies: bool = True) -> tuple:
    """(state, activations) at the worst moment of a pipeline rank's step: the fewest bytes the
    step can need, a lower bound (train.py's check_memory), where plan() adds every term.

    A replay of the rank's schedule (parallel.schedule_order), for what each moment holds: the
    fp32 weights and AdamW's m and v throughout; the fp32 gradients once each of its chunks has
    run a backward (zero_grad(set_to_none=True) frees them between steps; a backward makes them
    as it frees the activations); under bf16 autocast, a chunk's bf16 copies of its blocks'
    matrices while a micro-batch of it is held, by its graph (once, though each forward casts
    its own; copies=False: none kept, as under full recomputation, whose blocks run their
    forward without autograd); the activations held.
    So with one micro-batch the worst is the larger of the copies and activations at the
    backward's start and the gradients at its end; with two, all of them after the second
    forward; a 1F1B rank holds min(m, pp - rank) micro-batches, and has gradients as it holds
    them all only when m is larger.
    """
    v, (w_b, g_b, o_b, el) = virtual_stages, PRECISIONS[precision]
    cast = 2 if precision == "bf16" else 0        # of w_b, autocast's copy (PRECISIONS' NOTE)
    params = stage_parameters(args, tp, pp, rank)
    kept = (w_b + o_b - cast) * params                          # fp32 weights, AdamW's m and v
    block, _ = per_block(count_parameters, args)
    n = args.n_layers // (pp * v)
    copy = (cast if copies else 0) * n * ((block - 2 * args.dim) // tp)    # a chunk's matrices
    sizes = chunk_activation_bytes(args, micro_batch, seq_len, tp, pp, v, sp, recompute, el,
                                   rank)
    held, backward_done, worst = [0] * v, set(), (kept, 0.0)
    for op, _, k in schedule_order(schedule or default_schedule(v), pp, micro_batches, v, rank):
        held[k] += 1 if op == "F" else -1
        if op == "B":
            backward_done.add(k)
        state = (kept + (g_b * params if len(backward_done) == v else 0)
                 + copy * sum(1 for h in held if h))
        worst = max(worst, (state, sum(h * size for h, size in zip(held, sizes))), key=sum)
    return worst


def serve_memory(args: ModelArgs, batch: int, context: int, tp: int = 1,
                 bytes_per_el: int = 2) -> dict:
    """Inference memory per GPU: the weights and the KV cache (B, S, K, E) of every layer, for
    k and v, split over tp. No gradients, no optimizer state, no saved activations."""
    weights = count_parameters(args) * bytes_per_el / tp
    kv = 2 * args.n_layers * batch * context * args.n_kv_heads * args.head_dim * bytes_per_el / tp
    return dict(weights=weights, kv_cache=kv, total=weights + kv)


# ---------------------------------------------------------------------------------------------
# 4. Time
# ---------------------------------------------------------------------------------------------

def plan(args: ModelArgs, gpus: int, gpu: str = "a100-80gb", seq_len: int = 2048,
         global_batch_tokens: int = 4 * 2**20, tp: int = 1, pp: int = 1, virtual_stages: int = 1,
         micro_batch: int = 1, recompute: str = "selective", sp: bool = True,
         schedule: Optional[str] = None, precision: str = "bf16",
         train_tokens: Optional[float] = None) -> dict:
    """Memory per GPU, communication, bubble and time of one layout; a dict (see format_plan).

    Time per micro-batch on a stage is max(compute, tp collectives) + pipeline sends: compute
    at compute_efficiency x peak, tp collectives overlapped with it [LLaMA §2.4], sends and
    all-reduces at link_efficiency x bandwidth. The slowest stage sets the pace; a step is
    (m + (pp-1)/v) micro-batch times [PTD-P §2.2] plus, after the flush, the all-reduces sent
    once a step: dp's of fp32 gradients, and tp's of sp's norm-weight gradients and the clipping
    scalar. "this_code" is the same step as parallel.py runs it: compute + the tp collectives
    it leaves exposed (all but tp_overlapped_bytes), + what of the overlapped ones outlasts the
    products they travel under (the column linears' weight gradients, and under sp their input
    gradients).
    Recomputation costs FLOPs: full one more forward of the layers, selective the attention
    core's forward again. MFU counts model FLOPs only (model.flops_per_token).
    """
    v, hw, a = virtual_stages, GPUS[gpu], ASSUMPTIONS
    if gpus % (tp * pp):
        raise ValueError(f"tp={tp} x pp={pp} = {tp * pp} does not divide {gpus} GPUs; choose "
                         "tp and pp whose product divides the GPU count")
    dp, sequences = gpus // (tp * pp), global_batch_tokens // seq_len
    m = sequences // (dp * micro_batch)
    if m < 1 or sequences % (dp * micro_batch):
        raise ValueError(f"a global batch of {sequences} sequences does not split into dp={dp} x "
                         f"micro-batch {micro_batch}; change --global-batch-tokens or the layout")
    check_config(args, tp, sp and tp > 1, seq_len)
    schedule = schedule or default_schedule(v)
    check_pipeline(args.n_layers, pp, v, m, schedule)
    w_b, g_b, o_b, el = PRECISIONS[precision]
    sp = sp and tp > 1

    stages = []                                  # the first and the last: the two busiest
    for rank in sorted({0, pp - 1}):
        n = stage_parameters(args, tp, pp, rank)
        acts = stage_activation_bytes(args, micro_batch, seq_len, tp, pp, v, m, schedule, sp,
                                      recompute, el, rank)
        memory = dict(weights=n * w_b, gradients=n * g_b, optimizer=n * o_b, activations=acts)
        stages.append(dict(rank=rank, parameters=n, in_flight=in_flight(schedule, pp, m, v, rank),
                           memory=memory, total=sum(memory.values())))
    busiest = max(stages, key=lambda s: s["total"])

    N, D, L = micro_batch * seq_len, args.dim, args.n_layers
    block, head = per_block(flops_per_token, args, seq_len)    # per token, forward + backward
    # recomputation runs a forward again: of the attention core (q k^T and p v) or of the block
    extra = {"none": 0, "selective": 4 * seq_len * D, "full": block / 3}[recompute]
    compute = N * (L // pp * (block + extra) + head) / tp / (hw.peak * a["compute_efficiency"])
    tp_within_node = tp <= a["gpus_per_node"]
    tp_link = (hw.nvlink if tp_within_node else hw.network) * a["link_efficiency"]
    net = hw.network * a["link_efficiency"]
    stage_args = replace(args, n_layers=max(1, L // pp))

    def tp_wire(passes):                   # a step's tp bytes on the wire, by collective
        return {key: wire_bytes(key.split()[1], tp, payload) for key, (_, payload) in
                comm_per_step(stage_args, micro_batch, seq_len, tp, 1, sp, recompute, passes,
                              bytes_per_el=el).items()} if tp > 1 else {}

    # NOTE: a step sends some tp bytes once whatever m (sp's norm-weight gradients, the clipping
    # scalar): comm_per_step is once + passes x pass, so two step lengths give a pass's bytes.
    tp_comm = tp_wire(m)
    tp_pass = sum(tp_wire(2).values()) - sum(tp_wire(1).values())
    tp_once = sum(tp_comm.values()) - m * tp_pass
    tp_time = tp_pass / tp_link
    hidden = tp_overlapped_bytes(stage_args, micro_batch, seq_len, tp, sp, el) if tp > 1 else 0
    columns = L // pp * ((args.n_heads + 2 * args.n_kv_heads) * args.head_dim
                         + 2 * args.ffn_hidden) + args.vocab_size      # column weights' rows
    under = (2 if sp else 1) * 2 * N * D * columns / tp / (hw.peak * a["compute_efficiency"])
    exposed = tp_time - hidden / tp_link + max(0.0, hidden / tp_link - under)
    p2p = 2 * v * N * D * el / (tp if sp else 1) if pp > 1 else 0        # sent per micro-batch
    bubble = (pp - 1) / (v * m)
    dp_bytes = wire_bytes("all_reduce", dp, busiest["parameters"] * g_b)
    after_flush = tp_once / tp_link + dp_bytes / net        # the all-reduces sent once a step

    def pace(micro_time):                  # a step's seconds, tokens/s/GPU, MFU and days
        step = (m + (pp - 1) / v) * (micro_time + p2p / net) + after_flush
        tokens_per_s = sequences * seq_len / step / gpus
        out = dict(step=step, tokens_per_s_per_gpu=tokens_per_s,
                   mfu=tokens_per_s * flops_per_token(args, seq_len) / hw.peak)
        if train_tokens:
            out["days"] = train_tokens / (tokens_per_s * gpus) / 86400
        return out

    speed, this_code = pace(max(compute, tp_time)), pace(compute + exposed)
    step = speed.pop("step")
    h, V = D, args.vocab_size                  # PTD-P's formula: counts a full recompute
    megatron = 96 * sequences * seq_len * L * h * h * (1 + seq_len / (6 * h) + V / (16 * L * h))
    out = dict(
        model=dict(parameters=count_parameters(args), **asdict(args)),
        layout=dict(gpus=gpus, gpu=gpu, tp=tp, pp=pp, dp=dp, virtual_stages=v, sp=sp,
                    schedule=schedule, micro_batch=micro_batch, micro_batches=m,
                    recompute=recompute, precision=precision, seq_len=seq_len,
                    global_batch_sequences=sequences,
                    tp_link="NVLink" if tp_within_node else "network"),
        memory=dict(stages=stages, busiest_rank=busiest["rank"], per_gpu=busiest["total"],
                    usable=hw.memory * a["usable_memory"],
                    fits=busiest["total"] <= hw.memory * a["usable_memory"]),
        comm_bytes_per_step=dict(tp=tp_comm, tp_overlapped=hidden * m, pp_send=p2p * m,
                                 dp_all_reduce=dp_bytes),
        time=dict(compute_per_micro_batch=compute, tp_per_micro_batch=tp_time,
                  tp_exposed_per_micro_batch=exposed, tp_once_per_step=tp_once / tp_link,
                  pp_per_micro_batch=p2p / net,
                  dp_all_reduce=dp_bytes / net, bubble=bubble, step=step),
        **speed, this_code=this_code,
        megatron_tflops_per_gpu=megatron / step / gpus / 1e12,
        assumptions=dict(ASSUMPTIONS, **asdict(hw)),
    )
    if train_tokens:
        out["train_tokens"] = train_tokens
    return out


# ---------------------------------------------------------------------------------------------
# 5. Search
# ---------------------------------------------------------------------------------------------

def search(args: ModelArgs, gpus: int, top: int = 10, **fixed) -> list:
    """Every layout that fits (tp within a node, pp, v, micro-batch, recompute), fastest first.

    fixed: plan()'s other keywords, the same for every layout; sp (on by default) applies where
    tp > 1, and a schedule keeps the layouts it can run (interleaved: v > 1; the others: v = 1).
    """
    plans = []
    depths = [d for d in range(1, args.n_layers + 1) if args.n_layers % d == 0]   # pp: divisors
    for tp, pp, v, b, rc in itertools.product((1, 2, 4, 8), depths, (1, 2, 4), (1, 2, 4, 8),
                                              RECOMPUTE_MODES):
        try:
            p = plan(args, gpus, tp=tp, pp=pp, virtual_stages=v, micro_batch=b, recompute=rc,
                     **fixed)
        except ValueError:
            continue                                       # not a valid split of this model
        if p["memory"]["fits"]:
            plans.append(p)
    return sorted(plans, key=lambda p: -p["tokens_per_s_per_gpu"])[:top]


# =============================================================================================
# Below: presenting the predictions -- the plan as text, the accounting tables, the command line.
# =============================================================================================

def format_plan(p: dict) -> str:
    """The plan as the text `python planner.py` prints."""
    model, lay, mem, t, a = p["model"], p["layout"], p["memory"], p["time"], p["assumptions"]
    GiB, c, x = 2**30, p["comm_bytes_per_step"], p["this_code"]
    lines = [
        f"model   {model['parameters'] / 1e9:.1f}B parameters: {model['n_layers']} layers, dim "
        f"{model['dim']}, {model['n_heads']} heads, vocab {model['vocab_size']}",
        f"layout  {lay['gpus']} x {lay['gpu']} = tp {lay['tp']} x pp {lay['pp']} x dp "
        f"{lay['dp']}; sp {'on' if lay['sp'] else 'off'}; {lay['schedule']}, v "
        f"{lay['virtual_stages']}; recompute {lay['recompute']}; {lay['precision']}",
        f"batch   {lay['global_batch_sequences']} x {lay['seq_len']} = "
        f"{lay['global_batch_sequences'] * lay['seq_len']:,} tokens per step; "
        f"{lay['micro_batches']} micro-batches of {lay['micro_batch']} per pipeline", "",
        "memory per GPU, GiB  weights  gradients  optimizer  activations  in flight   total"]
    for s in mem["stages"]:
        cells = "".join(f"{v / GiB:{w}.1f}" for v, w in zip(s["memory"].values(), (9, 11, 11, 13)))
        lines.append(f"  pp rank {s['rank']:<10}{cells}{s['in_flight']:11d}{s['total'] / GiB:8.1f}")
    lines += [f"  {'fits' if mem['fits'] else 'DOES NOT FIT'}: {mem['per_gpu'] / GiB:.1f} of "
              f"{mem['usable'] / GiB:.1f} usable GiB", "",
              "communication per step and GPU, bytes on the wire (ring algorithms)"]
    lines += [f"  {key:<18}{nbytes / 1e9:9.2f} GB  {lay['tp_link']}"
              for key, nbytes in c["tp"].items()]
    if c["tp"]:
        tp_exposed = sum(c["tp"].values()) - c["tp_overlapped"]
        lines.append(f"  {'tp, as parallel.py':<18}{tp_exposed / 1e9:9.2f} GB  exposed; "
                     f"{c['tp_overlapped'] / 1e9:.2f} GB overlapped by the column backward")
    lines += [f"  {'pp send/recv':<18}{c['pp_send'] / 1e9:9.2f} GB  network, exposed",
              f"  {'dp all_reduce':<18}{c['dp_all_reduce'] / 1e9:9.2f} GB  network, exposed, "
              "after the pipeline flush", "",
              f"time    a micro-batch on the slowest stage: compute "
              f"{t['compute_per_micro_batch'] * 1e3:.1f} ms, tp {t['tp_per_micro_batch'] * 1e3:.1f}"
              f" ms ({t['tp_exposed_per_micro_batch'] * 1e3:.1f} exposed by parallel.py), pp "
              f"sends {t['pp_per_micro_batch'] * 1e3:.1f} ms",
              f"        bubble (pp-1)/(v m) = {100 * t['bubble']:.1f}%; dp all-reduce "
              f"{t['dp_all_reduce']:.2f} s; step {t['step']:.2f} s",
              f"speed   {p['tokens_per_s_per_gpu']:.0f} tokens/s/GPU; MFU {100 * p['mfu']:.1f}% = "
              "tokens/s x (6N + 12 L D T) / peak, tp overlapped (LLaMA §2.4)",
              f"        {x['tokens_per_s_per_gpu']:.0f} tokens/s/GPU; MFU {100 * x['mfu']:.1f}% "
              f"as parallel.py runs it, the tp bytes it leaves exposed added (step "
              f"{x['step']:.2f} s)",
              f"        {p['megatron_tflops_per_gpu']:.0f} TFLOP/s/GPU by PTD-P's count, "
              "96 B s l h^2 (1 + s/6h + V/16lh) per step (a full recompute included)"]
    if "days" in p:
        lines.append(f"        {p['train_tokens'] / 1e12:.2f}T tokens in {p['days']:.1f} days "
                     f"({x['days']:.1f} as parallel.py runs it)")
    lines += ["", f"assumptions: compute at {a['compute_efficiency']:.0%} of {a['peak'] / 1e12:.0f}"
              f" TFLOP/s (calibrated on the Megatron-1T run); links at {a['link_efficiency']:.0%}"
              f" of NVLink {a['nvlink'] / 1e9:.0f} GB/s and network {a['network'] / 1e9:.0f} GB/s",
              f"  (per GPU and direction); tp within a node of {a['gpus_per_node']}; "
              f"{a['usable_memory']:.0%} of memory usable"]
    return "\n".join(lines)


def accounting() -> dict:
    """`--accounting`: activation bytes per layer and collectives per step, for the `tiny` preset
    and for 7b (predictions; tests/accounting_table.py prints them beside measurements).
    {preset: micro_batch, seq_len, tp, dp, activation_bytes_per_layer {mode: {fp32, bf16}},
    collectives_per_step {mode: {collective: calls, payload_bytes, sent_bytes}}}, in fp32."""
    tables = {}
    for name, batch, seq_len, tp in (("tiny", 8, 256, 2), ("7b", 1, 2048, 8)):
        args, dp = preset(name), 2
        layers = {}
        for label, kw in (("none", dict(tp=1)), ("tp", dict(tp=tp)),
                          ("tp+sp", dict(tp=tp, sp=True)),
                          ("tp+sp+selective", dict(tp=tp, sp=True, recompute="selective")),
                          ("tp+sp+full", dict(tp=tp, sp=True, recompute="full"))):
            layers[label] = {precision: activation_bytes_per_layer(
                args, batch, seq_len, bytes_per_el=PRECISIONS[precision][3], **kw)
                for precision in ("fp32", "bf16")}
        collectives = {}
        for label, kw in (("tp", dict(tp=tp)), ("tp+sp", dict(tp=tp, sp=True))):
            collectives[label] = {}
            for key, (calls, payload) in comm_per_step(args, batch, seq_len, dp=dp, **kw).items():
                group, op = key.split()
                sent = wire_bytes(op, tp if group == "tp" else dp, payload)
                collectives[label][key] = dict(calls=calls, payload_bytes=payload,
                                               sent_bytes=sent)
        tables[name] = dict(micro_batch=batch, seq_len=seq_len, tp=tp, dp=dp,
                            activation_bytes_per_layer=layers, collectives_per_step=collectives)
    return tables


def format_accounting(tables: dict) -> str:
    """The accounting as the tables `python planner.py --accounting` prints, in MiB."""
    lines, MiB = [], 2**20
    for name, t in tables.items():
        lines += ["", f"{name}: micro-batch {t['micro_batch']}, seq {t['seq_len']}, tp {t['tp']}; "
                  "activation MiB per layer (fp32 | bf16)"]
        lines += [f"  {label:<18} {b['fp32'] / MiB:10.2f} | {b['bf16'] / MiB:10.2f}"
                  for label, b in t["activation_bytes_per_layer"].items()]
        lines.append(f"  bytes on the wire per step and rank (fp32, dp {t['dp']}):")
        lines += [f"  {label:<6} {key:<18} {c['calls']:5d} calls  {c['payload_bytes'] / MiB:10.2f}"
                  f" MiB payload  {c['sent_bytes'] / MiB:10.2f} MiB sent"
                  for label, table in t["collectives_per_step"].items()
                  for key, c in table.items()]
    return "\n".join(lines)


def check_published() -> dict:
    """`--check`: each published run's figures, predicted by plan() at its layout:
    {run: {figure: predicted, published}}."""
    runs = {}
    for name, (model, layout, figures) in PUBLISHED.items():
        q = plan(ModelArgs(**model), **layout)
        runs[name] = {k: dict(predicted=q[k], published=want) for k, want in figures.items()}
    return runs


def _count(text: str, binary: bool = False, flag: str = "count") -> float:
    """'4M' -> 4 * 2**20 when binary (a batch: LLaMA's 4M is 2048 x 2048), else 4e6; '1.4T'."""
    scale = {"K": 1, "M": 2, "G": 3, "B": 3, "T": 4}.get(text[-1:].upper(), 0)
    try:
        value = float(text[:-1] if scale else text) * (2**10 if binary else 1e3) ** scale
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"{flag} {text!r} must be a positive count such as 4M or 1.4T")
    return value


def main(argv=None):
    p = cli.OneLineParser(prog="planner.py", description="Predict memory per GPU, communication, "
                          "bubble and speed of a 3D layout; or search the layouts (--search); or "
                          "inference memory (--serve).",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="7b", choices=PRESETS, help="the model")
    model_flags = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")   # ModelArgs fields
    for name in model_flags:
        p.add_argument("--" + name.replace("_", "-"), type=int, help="override the preset")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in all")
    p.add_argument("--gpu", default="a100-80gb", choices=GPUS, help="their data sheet")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--virtual-stages", type=int, default=1, help="chunks per pipeline rank")
    p.add_argument("--schedule", choices=PIPELINE_SCHEDULES, help="unset: 1f1b, or interleaved "
                   "with --virtual-stages > 1")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--recompute", default="selective", choices=RECOMPUTE_MODES,
                   help="activation recomputation")
    p.add_argument("--sp", action=argparse.BooleanOptionalAction, default=True,
                   help="sequence parallelism (with --tp > 1)")
    p.add_argument("--precision", default="bf16", choices=PRECISIONS, help="bytes per value")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--global-batch-tokens", default="4M", help="4M = 4 x 2^20 = 2048 x 2048")
    p.add_argument("--train-tokens", default="1T", help="for the days to train, e.g. 1.4T")
    p.add_argument("--search", action="store_true", help="rank every layout that fits")
    p.add_argument("--top", type=int, default=10, help="--search: layouts printed")
    p.add_argument("--serve", action="store_true", help="inference: weights + KV cache")
    p.add_argument("--batch", type=int, default=1, help="--serve: sequences decoded at once")
    p.add_argument("--context", type=int, default=2048, help="--serve: positions cached")
    p.add_argument("--check", action="store_true", help="the published runs, predicted")
    p.add_argument("--accounting", action="store_true", help="activation bytes per layer and "
                   "collectives per step, tiny and 7b")
    p.add_argument("--json", action="store_true", help="a machine-readable answer")
    a = p.parse_args(argv)
    overrides = {k: getattr(a, k) for k in model_flags if getattr(a, k) is not None}
    try:
        cli.check((name, getattr(a, name), getattr(a, name) >= 1, "1 or more") for name in (
            "gpus", "tp", "pp", "virtual_stages", "micro_batch", "seq_len", "top", "batch",
            "context", *overrides))
        args = preset(a.preset, **overrides, max_seq_len=max(a.seq_len, a.context))
        if a.accounting:
            tables = accounting()
            print(json.dumps(tables, indent=2) if a.json else format_accounting(tables))
            return tables
        if a.check:
            runs = check_published()
            lines = [name + ": " + "; ".join(
                f"{k} {f['predicted']:.1f}, published {f['published']} "
                f"({100 * (f['predicted'] / f['published'] - 1):+.0f}%)"
                for k, f in figures.items())
                for name, figures in runs.items()]
            print(json.dumps(runs, indent=2) if a.json else "\n".join(lines))
            return runs
        if a.serve:
            rows = {}
            served = PRECISIONS[a.precision][3]     # bytes per weight and per cached value
            for tp in (1, 2, 4, 8):         # generate.py --tp refuses the splits check_config does
                try:
                    check_config(args, tp)
                    rows[tp] = serve_memory(args, a.batch, a.context, tp, served)
                except ValueError as e:
                    rows[tp] = dict(refused=str(e))
            if a.json:
                return print(json.dumps(rows, indent=2))
            print(f"serving {count_parameters(args) / 1e9:.1f}B parameters in {a.precision}, "
                  f"batch {a.batch} x context {a.context}, per {a.gpu} GPU (GiB):")
            usable = GPUS[a.gpu].memory * ASSUMPTIONS["usable_memory"]
            for tp, r in rows.items():
                if "refused" in r:
                    print(f"  tp {tp}: -  {r['refused']}")
                    continue
                fits = "fits" if r["total"] <= usable else "-"
                print(f"  tp {tp}: weights {r['weights'] / 2**30:7.1f} + KV cache "
                      f"{r['kv_cache'] / 2**30:6.1f} = {r['total'] / 2**30:7.1f}  {fits}")
            return rows
        common = dict(gpu=a.gpu, seq_len=a.seq_len, precision=a.precision,
                      global_batch_tokens=int(_count(a.global_batch_tokens, True,
                                                     "--global-batch-tokens")),
                      train_tokens=_count(a.train_tokens, flag="--train-tokens"))
        if a.search:
            plans = search(args, a.gpus, a.top, sp=a.sp, schedule=a.schedule, **common)
            if a.json:
                return print(json.dumps(plans, indent=2))
            if not plans:                 # an answer (exit 0), as a plan that does not fit
                usable = GPUS[a.gpu].memory * ASSUMPTIONS["usable_memory"]
                print(f"no layout fits: {count_parameters(args) / 1e9:.1f}B parameters on "
                      f"{a.gpus} x {a.gpu} ({usable / 2**30:.1f} usable GiB each); use more "
                      "--gpus, a --gpu with more memory, or a shorter --seq-len")
                return plans
            print(" tp  pp  v    dp  mb     m recompute    GiB  bubble tok/s/GPU    MFU   days")
            for q in plans:
                lay = q["layout"]
                print(f"{lay['tp']:>3} {lay['pp']:>3} {lay['virtual_stages']:>2} {lay['dp']:>5} "
                      f"{lay['micro_batch']:>3} {lay['micro_batches']:>5} {lay['recompute']:>9} "
                      f"{q['memory']['per_gpu'] / 2**30:6.1f} {100 * q['time']['bubble']:6.1f}% "
                      f"{q['tokens_per_s_per_gpu']:9.0f} {100 * q['mfu']:5.1f}% {q['days']:6.1f}")
            return plans
        result = plan(args, a.gpus, tp=a.tp, pp=a.pp, virtual_stages=a.virtual_stages,
                      micro_batch=a.micro_batch, recompute=a.recompute, sp=a.sp,
                      schedule=a.schedule, **common)
        print(json.dumps(result, indent=2) if a.json else format_plan(result))
        return result
    except ValueError as e:
        p.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
