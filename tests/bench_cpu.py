"""
bench_cpu.py -- the two CPU speed figures, each against its baseline measured in the same run.

    PYTHONPATH=. python tests/bench_cpu.py             # both
    PYTHONPATH=. python tests/bench_cpu.py decode      # or one of them
    PYTHONPATH=. python tests/bench_cpu.py train
    PYTHONPATH=. python tests/bench_cpu.py profile     # where our train step's time goes

1. decode   Batch-1 decoding of an 85M-parameter model (dim 768, 12 layers, 12 heads: 85M weights
            in the blocks, plus the 32000-row output layer) with random fp32 weights, greedy,
            against the weight-read bound: tokens/s <= memory bandwidth (a measured copy) /
            bytes of weights read per token (all but the input embedding, of which a step reads
            one row). Rows: model.forward with the KV cache, the static step (the same forward
            with its position as a tensor, what a CUDA graph replays), and the compiled static
            step (`generate.py --compile`, where model.Linear reads each weight in a fused
            product and sum); then the eager and compiled rows again with wq|wk|wv and w1|w3
            fused (model.fuse_projections, as generate.load_model does).
2. train    One training step (forward, loss, backward, clipping, AdamW) of our Transformer
            against transformers' LlamaForCausalLM at the same shapes: dim 256, 4 layers,
            8 heads (4 KV heads), FFN 704, vocab 4096, batch 8 x sequence 256, fp32. Each
            computes its loss as its training loop does (ours: parallel.loss_fn; theirs:
            F.cross_entropy, which LlamaForCausalLM's loss calls), and both use the same fused
            AdamW. Each variant runs in its own process (VARIANTS): ours as train.py runs it on
            CPU, with train.keep_freed_memory(); theirs with malloc's defaults; the two crossed
            rows (ours with the default malloc, theirs with freed memory kept) give the step
            alone under the same allocator; then both under torch.compile (train.py --compile),
            which fuses each norm, rotation and SwiGLU product. The variants alternate, round
            after round, so that a busy neighbour slows all alike; ratios are of median step
            times. Page faults per step are the process's minor faults (getrusage).
            transformers is imported only if it is installed.

3. profile  Our step of (2), 5 steps under torch.profiler after 3 warm-up ones: the operators
            by their own CPU time (matmuls, SDPA, the loss, elementwise).

MFU = tokens/s x model.flops_per_token / the fastest of a few timed fp32 matmuls (train.py's
CPU peak). Timings on a shared machine vary: read ratios, not absolute figures, and rerun.
"""

import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import generate as G
import model as M
import parallel as P
import train as T


def memory_bandwidth(device, nbytes=None, reps: int = 5) -> float:
    """Bytes per second of a large tensor copy (each byte read once and written once)."""
    device = torch.device(device)
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 256 << 20)  # far beyond the caches
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)                                      # warm-up: page faults, allocator
    best = float("inf")
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def decode(rounds: int = 3, new_tokens: int = 96):
    torch.manual_seed(0)
    args = M.ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32000, max_seq_len=512)
    model = M.Transformer(args).eval().requires_grad_(False)
    bandwidth, weights = memory_bandwidth("cpu"), G.weight_bytes(model)
    bound = bandwidth / weights
    print(f"decode: dim 768, 12 layers, {M.count_parameters(args) / 1e6:.0f}M parameters, "
          f"batch 1, fp32, {torch.get_num_threads()} threads")
    print(f"  weight-read bound = {bandwidth / 1e9:.1f} GB/s / {weights / 1e6:.0f} MB = "
          f"{bound:.1f} tokens/s")
    prompt = [list(range(1, 9))]
    for name, options in (("model.forward", {}), ("static step", dict(static=True)),
                          ("compiled static step", dict(static=True, compile=True)),
                          ("model.forward, fused", {}),
                          ("compiled step, fused", dict(static=True, compile=True))):
        if name.endswith("fused") and model.layers[0].attention.wqkv is None:
            model.fuse_projections()                   # as generate.load_model does
        G.generate_tokens(model, prompt, new_tokens, temperature=0, **options)   # warm-up
        rates = []
        for _ in range(rounds):
            stats = {}
            G.generate_tokens(model, prompt, new_tokens, temperature=0, stats=stats, **options)
            rates.append(stats["decode_steps"] / stats["decode_s"])
        rate = statistics.median(rates)
        print(f"  {name:<22} {rate:6.1f} tokens/s  {100 * rate / bound:5.1f}% of the bound")


# The training step's shapes: dim 256, 4 layers, batch B x sequence T_.
ARGS = M.ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=4096, multiple_of=32,
                   max_seq_len=256)
B, T_ = 8, 256


# name -> (library, compiled, freed memory kept), each in its own process, so that one's
# allocations do not shape another's heap (see 2. in the docstring).
VARIANTS = {
    "ours": ("ours", False, True),
    "transformers": ("transformers", False, False),
    "ours, default malloc": ("ours", False, False),
    "transformers, memory kept": ("transformers", False, True),
    "ours, compiled": ("ours", True, True),                        # train.py --compile
    "transformers, compiled": ("transformers", True, False),
}


def _train_worker(library: str, compiled: bool, keep: bool, conn):
    """One variant of `train`: build, warm up, then time `n` steps each time the parent asks."""
    if keep:
        T.keep_freed_memory()
    from transformers import LlamaConfig, LlamaForCausalLM
    args, cfg = ARGS, T.TrainConfig()
    torch.manual_seed(0)
    if library == "ours":
        model = M.Transformer(args)
        opt = T.make_optimizer(model, cfg)
    else:
        model = LlamaForCausalLM(LlamaConfig(
            hidden_size=args.dim, intermediate_size=args.ffn_hidden,
            num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
            num_key_value_heads=args.n_kv_heads, vocab_size=args.vocab_size,
            max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
            rope_theta=args.rope_theta, tie_word_embeddings=False, attn_implementation="sdpa"))
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                weight_decay=cfg.weight_decay, fused=True)
    fwd = torch.compile(model) if compiled else model
    tokens = torch.randint(0, args.vocab_size, (B, T_ + 1), generator=torch.Generator().manual_seed(0))

    def step():
        if library == "ours":                                       # as train.py does
            P.loss_fn(fwd(tokens[:, :-1]), tokens[:, 1:], P.Grid()).backward()
            P.clip_grad_norm(model, cfg.clip, P.Grid())
        else:                                                # as LlamaForCausalLM's loss does
            logits = fwd(tokens[:, :-1]).logits.float()
            F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):                      # warm-up: allocator, first-call costs, compilation
        step()
    conn.send("ready")
    while n := conn.recv():
        faults, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        for _ in range(n):
            step()
        conn.send(((time.perf_counter() - t) / n,
                   (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n))


def train(rounds: int = 7, steps: int = 3):
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("train: transformers is not installed (pip install transformers); skipped")
        return
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    workers = {}
    for name, spec in VARIANTS.items():     # started one at a time: compiling is not timed
        conn, child = ctx.Pipe()
        process = ctx.Process(target=_train_worker, args=(*spec, child), daemon=True)
        process.start()
        conn.recv()                         # "ready"; EOFError if the worker failed (its
        workers[name] = process, conn       # traceback is above)
    times, faults = {name: [] for name in workers}, {name: [] for name in workers}
    for _ in range(rounds):                 # alternating, so that a busy neighbour slows all alike
        for name, (_, conn) in workers.items():
            conn.send(steps)
            t, f = conn.recv()
            times[name].append(t)
            faults[name].append(f)
    for process, conn in workers.values():
        conn.send(0)
        process.join()
    peak, source = T.peak_flops(torch.device("cpu"), torch.float32)
    flops = M.flops_per_token(ARGS, T_)
    print(f"train: dim 256, 4 layers, batch {B} x sequence {T_}, fp32, "
          f"{torch.get_num_threads()} threads, each variant in its own process; MFU against "
          f"{peak / 1e9:.0f} GFLOP/s [{source}]")
    median = {name: statistics.median(ts) for name, ts in times.items()}
    for name, t in median.items():
        tps = B * T_ / t
        print(f"  {name:<26} {1000 * t:7.1f} ms/step  {tps:8,.0f} tokens/s  "
              f"MFU {100 * tps * flops / peak:5.1f}%  {statistics.median(faults[name]):7,.0f} "
              f"page faults/step")

    def ratio(theirs, ours):
        return f"{median[theirs] / median[ours]:.2f}x"
    print(f"  ours / transformers (tokens/s), each as its training loop runs it: "
          f"{ratio('transformers', 'ours')} eager, "
          f"{ratio('transformers, compiled', 'ours, compiled')} compiled")
    print(f"  the step alone, under the same allocator: "
          f"{ratio('transformers', 'ours, default malloc')} with the default "
          f"malloc, {ratio('transformers, memory kept', 'ours')} with freed memory kept")
    return median["transformers"] / median["ours"]


def profile(warmup: int = 3, steps: int = 5):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    T.keep_freed_memory()                                          # as train.py runs it
    torch.manual_seed(0)
    model, cfg = M.Transformer(ARGS), T.TrainConfig()
    opt = T.make_optimizer(model, cfg)
    tokens = torch.randint(0, ARGS.vocab_size, (B, T_ + 1), generator=torch.Generator().manual_seed(0))

    def step():
        P.loss_fn(model(tokens[:, :-1]), tokens[:, 1:], P.Grid()).backward()
        P.clip_grad_norm(model, cfg.clip, P.Grid())
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(f"profile: our training step at the shapes of `train`, {steps} steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    which, benches = sys.argv[1:] or ["decode", "train"], dict(decode=decode, train=train,
                                                                   profile=profile)
    if not set(which) <= set(benches):                 # --help, or a name mistyped
        print(__doc__)
        sys.exit(0 if set(which) & {"-h", "--help"} else
                 f"usage: PYTHONPATH=. python tests/bench_cpu.py [{' | '.join(benches)}]...")
    for name in which:
        benches[name]()
