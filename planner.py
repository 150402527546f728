"""
planner.py -- will a layout fit, and how fast will it train? Memory, communication, pipeline
bubble and time per step of a tp x pp x dp layout at cluster scale, predicted from formulas.

parallel.py runs tensor, sequence, data and pipeline parallelism and counts what they cost
(activation bytes per layer, collectives per step, the schedules' in-flight micro-batches). This
file scales those counts to a cluster no test can reach, under one stated set of assumptions, and
checks itself against two published runs: LLaMA-65B at about 380 tokens/s/GPU on 2048 A100-80GB,
21 days for 1.4T tokens [LLaMA §2.4], and Megatron's 1T-parameter model at 163 TFLOP/s per A100,
52% of peak [PTD-P §5.1]. It imports parallel.py and model.py; nothing imports it.

    python planner.py --preset 65b --gpus 2048 --gpu a100-80gb --tp 8 --pp 4 --seq-len 2048 \
        --global-batch-tokens 4M --recompute selective --train-tokens 1.4T     # one layout
    python planner.py --preset 65b --gpus 2048 --search                      # rank the layouts
    python planner.py --preset 13b --serve --gpu a100-40gb                   # inference memory
    add --json for a machine-readable answer

Reading order
  1. Hardware and assumptions   GPUS, ASSUMPTIONS, PRECISIONS: every number the model takes
  2. Memory                     parameters and activations per GPU, and inference (weights + KV)
  3. Time                       plan(): one layout, in full
  4. Search                     every layout that fits, fastest first
  5. Printing and the CLI

The model of a step, stated once. A micro-batch costs a pipeline stage
    max(compute, tp collectives) + pipeline sends
with compute at compute_efficiency x the data-sheet peak (recomputation included: full adds a
forward of the layers, selective the attention core's), tp collectives overlapped with it as
LLaMA does [LLaMA §2.4] (so they cost only when they exceed it: tp across nodes), sends and
all-reduces at link_efficiency x the link's bandwidth, ring algorithms (parallel.wire_bytes). The
slowest stage (the last: it also runs the output layer) sets the pace; a step is
    (m + (pp - 1) / v) micro-batches + the dp all-reduce of fp32 gradients after the flush
the bubble (pp-1)/(v m) of PTD-P §2.2. Memory per GPU: weights, gradients and optimizer state of
its stage (Megatron's mixed precision: 2 + 4 + 12 bytes per parameter), plus the activations its
schedule holds at the worst moment (parallel.in_flight over the schedule itself, each chunk
weighed by parallel.activation_bytes_per_layer at 2 bytes per element).

What this leaves out: ZeRO/FSDP sharding of optimizer state, overlap of the dp all-reduce with
backward (PTD-P does it after the flush, as parallel.py does), the optimizer step's time,
network topology and congestion, stragglers and failures, the causal kernel doing half the
attention FLOPs (counted whole, the MFU convention). Each of these moves a real run by a few
percent; the two published runs land within 8% (tests/test_pipeline.py).

Papers: PTD-P (arXiv 2104.04473), Korthikanti et al. (2205.05198), LLaMA (2302.13971), PaLM
(2204.02311) appendix B for MFU.
"""

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

from model import PRESETS, ModelArgs, count_parameters, flops_per_token, preset
from parallel import (PIPELINE_SCHEDULES, RECOMPUTE_MODES, activation_bytes_per_layer,
                      check_config, check_pipeline, comm_per_step, default_schedule, in_flight,
                      wire_bytes)


# ---------------------------------------------------------------------------------------------
# 1. Hardware and assumptions
# ---------------------------------------------------------------------------------------------

@dataclass
class GPU:
    peak: float          # dense bf16 FLOP/s, from the data sheet
    memory: float        # bytes
    nvlink: float        # bytes/s per GPU, one direction, inside a node of 8
    network: float       # bytes/s per GPU, one direction, between nodes (one NIC per GPU)


GPUS = {
    "a100-40gb": GPU(312e12, 40 * 2**30, 300e9, 25e9),      # NVLink 3; HDR InfiniBand 200 Gb/s
    "a100-80gb": GPU(312e12, 80 * 2**30, 300e9, 25e9),
    "h100-80gb": GPU(989e12, 80 * 2**30, 450e9, 50e9),      # NVLink 4; NDR InfiniBand 400 Gb/s
}
# The assumptions, one set for every prediction; `plan` prints them.
ASSUMPTIONS = dict(
    compute_efficiency=0.60,   # of peak, for every FLOP: big matmuls do better, the rest worse
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


# The published runs the assumptions must reproduce (`--check`; tests/test_pipeline.py):
# (model, layout as plan() keywords, {figure: published value}). Both with our sp, which splits
# the pipeline's messages over tp as Megatron's scatter/gather does [PTD-P §4.1].
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
# 2. Memory
# ---------------------------------------------------------------------------------------------

def stage_parameters(args: ModelArgs, tp: int, pp: int, rank: int = 0) -> int:
    """Parameters one GPU holds: its stage's layers, split over tp (norms whole), the embedding
    on the first stage, the final norm and output on the last."""
    D, V, E = args.dim, args.vocab_size, args.head_dim
    split = 2 * D * args.n_heads * E + 2 * D * args.n_kv_heads * E + 3 * D * args.ffn_hidden
    n = args.n_layers // pp * (split // tp + 2 * D)
    return n + (V * D // tp if rank == 0 else 0) + (D + V * D // tp if rank == pp - 1 else 0)


def stage_activation_bytes(args: ModelArgs, micro_batch: int, seq_len: int, tp: int = 1,
                           pp: int = 1, virtual_stages: int = 1, micro_batches: int = 1,
                           schedule: Optional[str] = None, sp: bool = False,
                           recompute: str = "none", bytes_per_el: int = 4, rank: int = 0) -> float:
    """The most activation bytes a pipeline rank holds at once over one step's schedule.

    A chunk's forward keeps its layers' activation_bytes_per_layer, plus its output (B, T, D),
    held for the backward call (Megatron frees its data once sent), or, on the last chunk,
    the head: the final norm (as a layer's), the output layer's input and the loss's softmax
    (B, T, V/tp) in fp32. Token ids and masks (integers) are not counted.
    """
    b, t, N, D = bytes_per_el, tp if sp else 1, micro_batch * seq_len, args.dim
    n = args.n_layers // (pp * virtual_stages)
    layers = n * activation_bytes_per_layer(args, micro_batch, seq_len, tp, sp, recompute, b)
    head = N * (((4 + b) * D + 4) / t + b * D / t + 4 * args.vocab_size / tp)
    sizes = [layers + (head if k * pp + rank == pp * virtual_stages - 1 else N * D * b / t)
             for k in range(virtual_stages)]
    schedule = schedule or default_schedule(virtual_stages)
    return in_flight(schedule, pp, micro_batches, virtual_stages, rank, sizes)


def serve_memory(args: ModelArgs, batch: int, context: int, tp: int = 1,
                 bytes_per_el: int = 2) -> dict:
    """Inference memory per GPU: the weights and the KV cache (B, S, K, E) of every layer, for
    k and v, split over tp. No gradients, no optimizer state, no saved activations."""
    weights = count_parameters(args) * bytes_per_el / tp
    kv = 2 * args.n_layers * batch * context * args.n_kv_heads * args.head_dim * bytes_per_el / tp
    return dict(weights=weights, kv_cache=kv, total=weights + kv)


# ---------------------------------------------------------------------------------------------
# 3. Time
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
    (m + (pp-1)/v) micro-batch times [PTD-P §2.2] plus the dp all-reduce of fp32 gradients after
    the flush. Recomputation costs FLOPs: full one more forward of the layers, selective the
    attention core's forward again. MFU counts model FLOPs only (6N + 12 L D T per token).
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
    matmul = 2 * D * args.head_dim * (args.n_heads + args.n_kv_heads) + 3 * D * args.ffn_hidden
    layer_fwd = N * (2 * matmul + 4 * seq_len * D) / tp                 # FLOPs, one GPU
    extra = {"none": 0, "selective": N * 4 * seq_len * D / tp, "full": layer_fwd}[recompute]
    speed = hw.peak * a["compute_efficiency"]
    output_layer = 3 * 2 * N * args.vocab_size * D / tp                 # forward and backward
    compute = (L // pp * (3 * layer_fwd + extra) + output_layer) / speed  # the last stage
    tp_within_node = tp <= a["gpus_per_node"]
    tp_link = (hw.nvlink if tp_within_node else hw.network) * a["link_efficiency"]
    net = hw.network * a["link_efficiency"]
    stage_args = replace(args, n_layers=max(1, L // pp))
    tp_comm = {key: wire_bytes(key.split()[1], tp, payload) for key, (_, payload) in
               comm_per_step(stage_args, micro_batch, seq_len, tp, 1, sp, recompute,
                             bytes_per_el=el).items()} if tp > 1 else {}
    tp_time = sum(tp_comm.values()) / tp_link
    p2p = 2 * v * N * D * el / (tp if sp else 1) if pp > 1 else 0        # sent per micro-batch
    micro_time = max(compute, tp_time) + p2p / net
    bubble = (pp - 1) / (v * m)
    dp_bytes = wire_bytes("all_reduce", dp, busiest["parameters"] * g_b)
    step = (m + (pp - 1) / v) * micro_time + dp_bytes / net

    tokens_per_s = sequences * seq_len / step / gpus
    mfu = tokens_per_s * flops_per_token(args, seq_len) / hw.peak
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
        comm_bytes_per_step=dict(tp={k: c * m for k, c in tp_comm.items()},
                                 pp_send=p2p * m, dp_all_reduce=dp_bytes),
        time=dict(compute_per_micro_batch=compute, tp_per_micro_batch=tp_time,
                  pp_per_micro_batch=p2p / net, dp_all_reduce=dp_bytes / net, bubble=bubble,
                  step=step),
        tokens_per_s_per_gpu=tokens_per_s, mfu=mfu,
        megatron_tflops_per_gpu=megatron / step / gpus / 1e12,
        assumptions=dict(ASSUMPTIONS, **asdict(hw)),
    )
    if train_tokens:
        out["days"] = train_tokens / (tokens_per_s * gpus) / 86400
        out["train_tokens"] = train_tokens
    return out


# ---------------------------------------------------------------------------------------------
# 4. Search
# ---------------------------------------------------------------------------------------------

def search(args: ModelArgs, gpus: int, top: int = 10, **fixed) -> list:
    """Every layout that fits (tp within a node, pp, v, micro-batch, recompute), fastest first."""
    plans = []
    for tp in (1, 2, 4, 8):
        for pp in [d for d in range(1, args.n_layers + 1) if args.n_layers % d == 0]:
            for v, b, rc in [(v, b, rc) for v in (1, 2, 4) for b in (1, 2, 4, 8)
                             for rc in RECOMPUTE_MODES]:
                try:
                    p = plan(args, gpus, tp=tp, pp=pp, virtual_stages=v, micro_batch=b,
                             recompute=rc, sp=tp > 1, **fixed)
                except ValueError:
                    continue                               # not a valid split of this model
                if p["memory"]["fits"]:
                    plans.append(p)
    return sorted(plans, key=lambda p: -p["tokens_per_s_per_gpu"])[:top]


# ---------------------------------------------------------------------------------------------
# 5. Printing and the CLI
# ---------------------------------------------------------------------------------------------

def format_plan(p: dict) -> str:
    """The plan as the text `python planner.py` prints."""
    model, lay, mem, t, a = p["model"], p["layout"], p["memory"], p["time"], p["assumptions"]
    GiB, m, c = 2**30, lay["micro_batches"], p["comm_bytes_per_step"]
    lines = [
        f"model   {model['parameters'] / 1e9:.1f}B parameters: {model['n_layers']} layers, dim "
        f"{model['dim']}, {model['n_heads']} heads, vocab {model['vocab_size']}",
        f"layout  {lay['gpus']} x {lay['gpu']} = tp {lay['tp']} x pp {lay['pp']} x dp "
        f"{lay['dp']}; sp {'on' if lay['sp'] else 'off'}; {lay['schedule']}, v "
        f"{lay['virtual_stages']}; recompute {lay['recompute']}; {lay['precision']}",
        f"batch   {lay['global_batch_sequences']} x {lay['seq_len']} = "
        f"{lay['global_batch_sequences'] * lay['seq_len']:,} tokens per step; {m} micro-batches "
        f"of {lay['micro_batch']} per pipeline", "",
        "memory per GPU, GiB  weights  gradients  optimizer  activations  in flight   total"]
    for s in mem["stages"]:
        lines.append(f"  pp rank {s['rank']:<10}" + "".join(
            f"{s['memory'][k] / GiB:{w}.1f}" for k, w in (("weights", 9), ("gradients", 11),
                                                           ("optimizer", 11), ("activations", 13)))
            + f"{s['in_flight']:11d}{s['total'] / GiB:8.1f}")
    lines += [f"  {'fits' if mem['fits'] else 'DOES NOT FIT'}: {mem['per_gpu'] / GiB:.1f} of "
              f"{mem['usable'] / GiB:.1f} usable GiB", "",
              "communication per step and GPU, bytes on the wire (ring algorithms)"]
    lines += [f"  {key:<18}{nbytes / 1e9:9.2f} GB  {lay['tp_link']}, overlapped with compute"
              for key, nbytes in c["tp"].items()]
    lines += [f"  {'pp send/recv':<18}{c['pp_send'] / 1e9:9.2f} GB  network, exposed",
              f"  {'dp all_reduce':<18}{c['dp_all_reduce'] / 1e9:9.2f} GB  network, exposed, "
              "after the pipeline flush", "",
              f"time    a micro-batch on the slowest stage: compute "
              f"{t['compute_per_micro_batch'] * 1e3:.1f} ms (tp {t['tp_per_micro_batch'] * 1e3:.1f}"
              f" ms under it), pp sends {t['pp_per_micro_batch'] * 1e3:.1f} ms",
              f"        bubble (pp-1)/(v m) = {100 * t['bubble']:.1f}%; dp all-reduce "
              f"{t['dp_all_reduce']:.2f} s; step {t['step']:.2f} s",
              f"speed   {p['tokens_per_s_per_gpu']:.0f} tokens/s/GPU; MFU {100 * p['mfu']:.1f}% = "
              "tokens/s x (6N + 12 L D T) / peak",
              f"        {p['megatron_tflops_per_gpu']:.0f} TFLOP/s/GPU by PTD-P's count, "
              "96 B s l h^2 (1 + s/6h + V/16lh) per step (a full recompute included)"]
    if "days" in p:
        lines.append(f"        {p['train_tokens'] / 1e12:.2f}T tokens in {p['days']:.1f} days")
    lines += ["", f"assumptions: compute at {a['compute_efficiency']:.0%} of {a['peak'] / 1e12:.0f}"
              f" TFLOP/s; links at {a['link_efficiency']:.0%} of NVLink {a['nvlink'] / 1e9:.0f} "
              f"GB/s and network {a['network'] / 1e9:.0f} GB/s",
              f"  (per GPU and direction); tp within a node of {a['gpus_per_node']}; "
              f"{a['usable_memory']:.0%} of memory usable"]
    return "\n".join(lines)


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
    p = argparse.ArgumentParser(description="Predict memory per "
                                "GPU, communication, bubble and speed of a 3D layout; or search "
                                "the layouts (--search); or inference memory (--serve).")
    p.add_argument("--preset", default="7b", choices=PRESETS)
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size"):
        p.add_argument("--" + name.replace("_", "-"), type=int, help="override the preset")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu", default="a100-80gb", choices=GPUS)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--virtual-stages", type=int, default=1)
    p.add_argument("--schedule", choices=PIPELINE_SCHEDULES, help="default: 1f1b, or interleaved "
                   "with --virtual-stages > 1")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--recompute", default="selective", choices=RECOMPUTE_MODES)
    p.add_argument("--sp", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--precision", default="bf16", choices=PRECISIONS)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--global-batch-tokens", default="4M", help="4M = 4 x 2^20 = 2048 x 2048")
    p.add_argument("--train-tokens", default="1T", help="for the days to train, e.g. 1.4T")
    p.add_argument("--search", action="store_true", help="rank every layout that fits")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--serve", action="store_true", help="inference: weights + KV cache")
    p.add_argument("--batch", type=int, default=1, help="--serve: sequences decoded at once")
    p.add_argument("--context", type=int, default=2048, help="--serve: positions cached")
    p.add_argument("--check", action="store_true", help="the published runs, predicted")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    overrides = {k: getattr(a, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads",
                                            "vocab_size") if getattr(a, k) is not None}
    try:
        for name in ("gpus", "tp", "pp", "virtual_stages", "micro_batch", "seq_len", "top",
                     "batch", "context", *overrides):
            if getattr(a, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(a, name)} must be 1 or "
                                 "more")
        args = preset(a.preset, **overrides, max_seq_len=max(a.seq_len, a.context))
        hw = GPUS[a.gpu]
        if a.check:
            for name, (model, layout, figures) in PUBLISHED.items():
                q = plan(ModelArgs(**model), **layout)
                print(name + ": " + "; ".join(f"{k} {q[k]:.1f}, published {want} "
                                               f"({100 * (q[k] / want - 1):+.0f}%)"
                                               for k, want in figures.items()))
            return
        if a.serve:
            rows = {tp: serve_memory(args, a.batch, a.context, tp) for tp in (1, 2, 4, 8)}
            if a.json:
                return print(json.dumps(rows, indent=2))
            print(f"serving {count_parameters(args) / 1e9:.1f}B parameters in bf16, batch "
                  f"{a.batch} x context {a.context}, per {a.gpu} GPU (GiB):")
            for tp, r in rows.items():
                fits = "fits" if r["total"] <= hw.memory * ASSUMPTIONS["usable_memory"] else "-"
                print(f"  tp {tp}: weights {r['weights'] / 2**30:7.1f} + KV cache "
                      f"{r['kv_cache'] / 2**30:6.1f} = {r['total'] / 2**30:7.1f}  {fits}")
            return rows
        common = dict(gpu=a.gpu, seq_len=a.seq_len, precision=a.precision,
                      global_batch_tokens=int(_count(a.global_batch_tokens, True,
                                                     "--global-batch-tokens")),
                      train_tokens=_count(a.train_tokens, flag="--train-tokens"))
        if a.search:
            plans = search(args, a.gpus, a.top, **common)
            if a.json:
                return print(json.dumps(plans, indent=2))
            print(f"{'tp':>3} {'pp':>3} {'v':>2} {'dp':>5} {'mb':>3} {'m':>5} {'recompute':>9} "
                  f"{'GiB':>6} {'bubble':>7} {'tok/s/GPU':>9} {'MFU':>6} {'days':>6}")
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
