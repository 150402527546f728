"""
bench_step.py -- our training step against a plain loop of the same model, as a ratio, with MFU.

    PYTHONPATH=. python tests/bench_step.py --preset 1b --seq-len 2048 --batch-size 4 --device cuda
    PYTHONPATH=. python tests/bench_step.py --preset tiny --seq-len 256 --batch-size 8    # CPU

The flags are train.py's (TrainConfig): --attention, --recompute, --compile, --dtype, ...
tests/gpu_check.py times each variant with this function.
"""

import argparse
import dataclasses
import sys
import time

import torch
import torch.nn.functional as F

import model as M
import parallel as P
from cli import OneLineParser, add_fields
from train import (TrainConfig, autocast, make_optimizer, peak_tokens_per_s, synchronize,
                   uses_compile)


def bench(cfg: TrainConfig, device: torch.device, steps: int = 10, warmup: int = 3,
          variants=("plain", "ours")) -> dict:
    """tokens/s and MFU of our training step next to a plain loop, on random tokens.

    plain: the same Transformer with the `math` attention (the equation, materializing T x T
    scores), autograd's SwiGLU, F.cross_entropy, unfused AdamW. ours: the configured backend,
    --recompute (selective: the hand-written SwiGLU backward), parallel.loss_fn, fused AdamW,
    and torch.compile with --compile. Single process; precision as --dtype (auto: bf16 autocast
    on CUDA, fp32 on CPU). `variants` picks which of the two run. A step accumulates
    --micro-batches of --batch-size sequences. Each result also holds the first step's seconds
    (compilation included) and, on CUDA, the bytes allocated before a step (weights and AdamW
    state), at the end of its last forward, after its last backward, and at the peak.
    """
    args = M.preset(cfg.preset)
    args = dataclasses.replace(args, max_seq_len=max(args.max_seq_len, cfg.seq_len))
    dtype, amp = autocast(cfg, device)
    peak_tps, formula = peak_tokens_per_s(args, cfg.seq_len, device, dtype)
    gen = torch.Generator().manual_seed(cfg.seed)
    m = cfg.micro_batches
    tokens = torch.randint(0, args.vocab_size, (m, cfg.batch_size, cfg.seq_len + 1), generator=gen)
    tokens = tokens.to(device)
    results = {}
    for name in variants:
        torch.manual_seed(cfg.seed)
        # On CUDA every byte figure is counted from here: what earlier work left is not ours.
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        with torch.device(device):           # PERF: initialized where it runs (1b: seconds on CPU)
            model = M.Transformer(args)
        if name == "plain":
            model.set_attention_backend("math")
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), foreach=False)
            fwd = model
        else:
            model.set_attention_backend(cfg.attention)
            P.apply_recompute(model, cfg.recompute)
            opt = make_optimizer(model, cfg)
            fwd = torch.compile(model) if uses_compile(cfg, device) else model
        times, cuda, memory, first_step_s = [], device.type == "cuda", {}, None
        for i in range(warmup + steps):
            synchronize(device)
            if cuda and i == warmup:
                torch.cuda.reset_peak_memory_stats(device)
                memory["state_bytes"] = torch.cuda.memory_allocated(device) - base
            t = time.perf_counter()
            for k, batch in enumerate(tokens):                            # (B, T + 1) each
                with amp:        # NOTE: no name keeps the logits: they go when backward is done
                    if name == "plain":
                        loss = F.cross_entropy(fwd(batch[:, :-1]).flatten(0, 1),
                                               batch[:, 1:].flatten()) / m
                    else:
                        loss = P.loss_fn(fwd(batch[:, :-1]), batch[:, 1:], P.Grid()) / m
                if cuda and i == warmup and k == m - 1:
                    memory["forward_end_bytes"] = torch.cuda.memory_allocated(device) - base
                loss.backward()
            if cuda and i == warmup:
                memory["after_backward_bytes"] = torch.cuda.memory_allocated(device) - base
            opt.step()
            opt.zero_grad(set_to_none=True)
            synchronize(device)
            elapsed = time.perf_counter() - t
            first_step_s = first_step_s or elapsed
            if i >= warmup:
                times.append(elapsed)
        if cuda:
            memory["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        tps = m * cfg.batch_size * cfg.seq_len / (sum(times) / len(times))
        results[name] = dict(tokens_per_s=tps, mfu=tps / peak_tps, first_step_s=first_step_s,
                             **memory)
        print(f"{name:>6}: {tps:12,.0f} tokens/s  MFU {100 * results[name]['mfu']:5.1f}%")
        del model, opt, fwd, loss
        if device.type == "cuda":
            torch.cuda.empty_cache()             # the next variant starts from an empty device
    if len(results) == 2:
        results["ratio"] = results["ours"]["tokens_per_s"] / results["plain"]["tokens_per_s"]
        print(f"ours / plain = {results['ratio']:.2f}x   [{cfg.preset}, batch {cfg.batch_size} "
              f"x seq {cfg.seq_len}, {'bf16' if dtype == torch.bfloat16 else 'fp32'}, {device}]")
    print(formula)
    return results


def main(argv=None):
    p = OneLineParser(prog="tests/bench_step.py", description=__doc__.split("\n\n")[0],
                      argument_default=argparse.SUPPRESS)
    add_fields(p, TrainConfig)
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible; use --device cpu")
    device = torch.device("cuda" if cfg.device == "cuda" or (
        cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    return bench(cfg, device)


if __name__ == "__main__":
    main()
