"""
gpu_check.py -- the whole project measured on one CUDA GPU, by one command, into one report.

A green CPU suite does not prove the CUDA paths, and a GPU is not always at hand. This script is
what to run the moment one is: it checks, times and writes down everything that only a GPU can
show, in one go, in well under eight minutes on one H100.

    bash .ci/gpu out/gpu                                  # on a CUDA machine (see .ci/gpu)
    python tests/gpu_check.py --out out/gpu               # the same, xformers already installed
    python tests/gpu_check.py --dry-run --out /tmp/gpu    # CPU, tiny shapes: CI runs this

It writes OUT/report.md (the tables, as they are measured, so a run cut short keeps what it
measured) and OUT/results.json. Sections, in order:
  1. The CUDA tests       tests/test_gpu.py under pytest (skipped in the dry run: no CUDA)
  2. Training step        the `1b` preset at sequence 2048 in bf16: tokens/s and MFU for sdpa
                          and xformers, eager and torch.compile, recompute none and selective,
                          and bench_step.py's plain loop at the same shapes; the first step's
                          time (compilation included)
  3. Memory               the same step, eager, recompute none, selective and full: planner.py's
                          predicted bytes per GPU against torch.cuda's, term by term
  4. Decoding             batch 1 on a 7b-shaped model of random bf16 weights: tokens/s against
                          the weight-read bound (weight bytes / measured copy bandwidth), with
                          model.forward (cuDNN's attention on, then off, as generate.py runs),
                          the static step, replayed from a CUDA graph, compiled, and with the
                          projections fused; a prefill's time; the profile of one step
  5. Kill and resume      train.py on the device: saves, is killed with SIGKILL, resumes; its
                          losses against an uninterrupted run, and two uninterrupted runs
                          against each other (the device's own run-to-run noise); on CUDA both
                          compiled (the default) and with --no-compile
  6. Decoding experiments candidates for the fastest decoder, timed beside it while the check's
                          --budget lasts, and profiled when one wins

MFU = tokens/s * (6N + 12 L D T) FLOP/token / peak FLOP/s (model.flops_per_token; the peak is
the data sheet's dense bf16 figure, train.peak_flops).

Each section catches its own failure and reports it, so one broken path does not hide the rest;
the exit code is 1 if any check failed.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from distributed import ROOT, losses, python, start, wait_for_step   # beside this file
sys.path.insert(0, ROOT)

import bench_step                # noqa: E402  (beside this file, after the path: it imports the
import checkpoint as C           # noqa: E402   repository's own files, as these do)
import data                      # noqa: E402
import generate as G             # noqa: E402
import model as M                # noqa: E402
import planner                   # noqa: E402
import train as T                # noqa: E402
from bench_cpu import memory_bandwidth   # noqa: E402


class Report:
    """Markdown lines appended to OUT/report.md as they come, and printed; results.json at
    each save."""

    def __init__(self, out: str):
        os.makedirs(out, exist_ok=True)
        self.md, self.json_path = os.path.join(out, "report.md"), os.path.join(out, "results.json")
        self.results, self.failed = {}, []
        open(self.md, "w").close()

    def __call__(self, text: str = ""):
        print(text, flush=True)
        with open(self.md, "a") as fh:
            fh.write(text + "\n")

    def save(self, key: str, value):
        self.results[key] = value
        with open(self.json_path, "w") as fh:
            json.dump(dict(self.results, failed=self.failed), fh, indent=2)

    def fail(self, check: str, why: str):
        self.failed.append(check)
        self(f"\n**FAILED: {check}**: {why}")
        self.save("failed", self.failed)


# ---------------------------------------------------------------------------------------------
# 1. The CUDA tests
# ---------------------------------------------------------------------------------------------

def cuda_tests(report: Report, dry: bool):
    report("\n## 1. tests/test_gpu.py\n")
    proc = python("-m", "pytest", "-q", "-rs", "tests/test_gpu.py")
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    report("```\n" + "\n".join(tail) + "\n```")
    report.save("cuda_tests", dict(returncode=proc.returncode, summary=tail[-1] if tail else ""))
    if proc.returncode != 0:
        report.fail("tests/test_gpu.py", f"pytest exit code {proc.returncode}")


# ---------------------------------------------------------------------------------------------
# 2. Training step
# ---------------------------------------------------------------------------------------------

def training_step(report: Report, device, dry: bool, budget_s: float):
    preset, seq, batch = ("tiny", 64, 2) if dry else ("1b", 2048, 4)
    args = M.preset(preset)
    flops = M.flops_per_token(args, seq)
    peak, source = T.peak_flops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    report(f"\n## 2. Training step: `{preset}`, batch {batch} x sequence {seq}, "
           f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}\n")
    report(f"MFU = tokens/s x {flops:,} FLOP/token (6N + 12*L*D*T) / {peak / 1e12:.0f} TFLOP/s "
           f"[{source}]. Each row: 3 warm-up steps (compilation included), then the mean of "
           f"{2 if dry else 10}; AdamW step included. First step: its seconds, compilation "
           "included.\n")
    report("| step | attention | compile | recompute | tokens/s | MFU | first step s |")
    report("|---|---|---|---|---:|---:|---:|")
    backends = ["sdpa"] + (["xformers"] if device.type == "cuda" and M.xformers_ops() else [])
    rows = [("ours", b, False, r) for r in ("none", "selective") for b in backends]
    rows.append(("plain", "math", False, "none"))
    rows += [("ours", b, True, r) for r in ("none", "selective") for b in backends]
    if dry:
        rows = rows[:4]                             # one compiled row keeps that path checked
    began, results = time.perf_counter(), []
    for kind, backend, compiled, recompute in rows:
        label = f"| {kind} | {backend} | {'on' if compiled else 'off'} | {recompute} |"
        if time.perf_counter() - began > budget_s:
            report(f"{label} skipped: past this section's {budget_s:.0f} s | | |")
            continue
        cfg = T.TrainConfig(preset=preset, seq_len=seq, batch_size=batch, attention=backend,
                            recompute=recompute, compile=compiled)
        try:
            r = bench_step.bench(cfg, device, steps=2 if dry else 10, warmup=3,
                        variants=(kind,))[kind]
        except torch.cuda.OutOfMemoryError:
            report(f"{label} out of memory | | |")
            torch.cuda.empty_cache()
            continue
        except Exception as e:                      # report it, go on with the other rows
            report(f"{label} error: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | |")
            report.failed.append(f"training step {kind} {backend} compile={compiled} {recompute}")
            continue
        report(f"{label} {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
               f"{r['first_step_s']:.1f} |")
        results.append(dict(step=kind, attention=backend, compile=compiled, recompute=recompute,
                            **r))
    report.save("training_step", dict(preset=preset, seq_len=seq, batch_size=batch,
                                      flops_per_token=flops, peak_flops=peak, rows=results))
    plain = [r for r in results if r["step"] == "plain"]
    ours = [r for r in results if r["step"] == "ours"]
    if plain and ours:
        best = max(ours, key=lambda r: r["tokens_per_s"])
        report(f"\nBest of ours / plain = {best['tokens_per_s'] / plain[0]['tokens_per_s']:.2f}x "
               f"({best['attention']}, compile {'on' if best['compile'] else 'off'}, recompute "
               f"{best['recompute']}); best MFU {100 * best['mfu']:.1f}%.")


# ---------------------------------------------------------------------------------------------
# 3. Memory: planner.py's prediction against torch.cuda's count
# ---------------------------------------------------------------------------------------------

def memory(report: Report, device, dry: bool):
    preset, seq, batch = ("tiny", 64, 2) if dry else ("1b", 2048, 4)
    cuda = device.type == "cuda"
    args = M.preset(preset)
    n, n_emb = M.count_parameters(args), args.vocab_size * args.dim
    GiB = 2 ** 30
    report(f"\n## 3. Memory: `{preset}`, micro-batch {batch} x sequence {seq}, "
           f"{'bf16 autocast' if cuda else 'fp32'}, eager, AdamW\n")
    report("planner.plan (1 GPU) predicts the peak as every term at once: the state (fp32 "
           "weights and AdamW's m and v, 12 bytes per parameter), autocast's bf16 copies of the "
           "weights (2), the fp32 gradients (4), and the activations of every layer and of the "
           "head. Measured with torch.cuda.memory_allocated before a step (state), after its "
           "last forward and after its last backward (the gradients: that minus the state), and "
           "max_memory_allocated (peak), each less what was allocated before the model was "
           "built. The copies cover every matrix but the embedding. With "
           "one micro-batch no gradient exists until the backward, which frees activations as "
           "it makes gradients; with two, the first one's gradients are there during the "
           "second's forward. GiB.\n")
    report("| recompute | micro-batches | state pred. | meas. | copies + activations pred. | "
           "meas. | gradients pred. | meas. | peak pred. | meas. | meas. / pred. |")
    report("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for recompute in ("none", "selective", "full"):
        for m in (1, 2):
            p = planner.plan(args, 1, "h200-141gb", seq_len=seq,
                             global_batch_tokens=m * batch * seq, micro_batch=batch,
                             recompute=recompute, sp=False, precision="bf16" if cuda else "fp32")
            predicted = dict(state=12 * n, grads=4 * n, peak=p["memory"]["per_gpu"],
                             acts=(2 * (n - n_emb) if cuda else 0)
                             + p["memory"]["stages"][0]["memory"]["activations"])
            cfg = T.TrainConfig(preset=preset, seq_len=seq, batch_size=batch, micro_batches=m,
                                attention="sdpa", recompute=recompute, compile=False)
            r = bench_step.bench(cfg, device, steps=2, warmup=2, variants=("ours",))["ours"]
            measured = {}
            if cuda:
                state, grads = r["state_bytes"], r["after_backward_bytes"] - r["state_bytes"]
                measured = dict(state=state, grads=grads, peak=r["peak_bytes"],
                                acts=r["forward_end_bytes"] - state - (grads if m > 1 else 0))
            cells = [f"{predicted[k] / GiB:.2f} | " + (f"{measured[k] / GiB:.2f}" if cuda else
                     "n/a (CPU)") for k in ("state", "acts", "grads", "peak")]
            ratio = f"{measured['peak'] / predicted['peak']:.3f}" if cuda else "n/a"
            report(f"| {recompute} | {m} | {' | '.join(cells)} | {ratio} |")
            rows.append(dict(recompute=recompute, micro_batches=m, predicted=predicted,
                             measured=measured))
    report.save("memory", dict(preset=preset, seq_len=seq, batch_size=batch, rows=rows))


# ---------------------------------------------------------------------------------------------
# 4. Decoding
# ---------------------------------------------------------------------------------------------

def decoding(report: Report, device, dry: bool):
    preset = "tiny" if dry else "7b"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = M.preset(preset)
    with torch.device("meta"):                      # no 27 GB of fp32 first: straight to bf16
        model = M.Transformer(args)
    model = model.to(dtype).to_empty(device=device)
    torch.manual_seed(0)
    model.reset_parameters()                        # random weights: speed does not need real ones
    model.eval().requires_grad_(False)
    bandwidth, weights = memory_bandwidth(device), G.weight_bytes(model)
    bound = bandwidth / weights
    report(f"\n## 4. Decoding at batch 1: `{preset}`-shaped model, random {str(dtype)[6:]} "
           "weights, greedy\n")
    report(f"Weight-read bound = copy bandwidth / weight bytes = {bandwidth / 1e9:,.0f} GB/s / "
           f"{weights / 1e9:.2f} GB = {bound:,.1f} tokens/s (the embedding table excluded: a "
           "step reads one row of it). generate.py leaves cuDNN's attention out "
           "(model.plan_free_attention); the first rows show why. Fused: wq|wk|wv and w1|w3 as "
           "one matrix each (model.fuse_projections, as generate.load_model does). First call: "
           "the seconds of an 8-token call, compilation and graph capture included.\n")
    report("| decoder | tokens/s | % of bound | first call s |")
    report("|---|---:|---:|---:|")
    prompt, new = [list(range(1, 9))], 16 if dry else 256
    modes = [("model.forward", dict()), ("static step", dict(static=True))]
    if device.type == "cuda":
        modes.insert(0, ("model.forward, cuDNN attention on", dict()))
        modes.append(("static step in a CUDA graph", dict(static=True, cuda_graph=True)))
    compiled = "compiled static step" + (" in a CUDA graph" if device.type == "cuda" else "")
    best = dict(static=True, cuda_graph=device.type == "cuda", compile=True)
    modes.append((compiled, best))
    if device.type == "cuda":
        modes.append(("static step in a CUDA graph, fused", dict(static=True, cuda_graph=True)))
    modes.append((compiled + ", fused", best))
    rows, prefill_ms, outputs = [], {}, {}
    G.generate_tokens(model, [list(range(1, 49))], 1)          # first-call costs, not timed
    for name, options in modes:
        cudnn = "cuDNN" in name
        if not cudnn:
            M.plan_free_attention()                 # as generate.py does, from here on
        stats, key = {}, "with cuDNN" if cudnn else "without cuDNN"
        if key not in prefill_ms:   # a 64-token prompt at a length not seen before, each way
            G.generate_tokens(model, [list(range(1, 65 + len(prefill_ms)))], 1, stats=stats)
            prefill_ms[key] = 1000 * stats["prefill_s"]
        if name.endswith("fused") and model.layers[0].attention.wqkv is None:
            model.fuse_projections()
        _sync(device)
        t = time.perf_counter()
        G.generate_tokens(model, prompt, 8, temperature=0, **options)        # warm-up
        _sync(device)
        first = time.perf_counter() - t
        outputs[name] = G.generate_tokens(model, prompt, new, temperature=0, stats=stats,
                                          **options)[0]
        rate = stats["decode_steps"] / stats["decode_s"]
        report(f"| {name} | {rate:,.1f} | {100 * rate / bound:.0f}% | {first:.1f} |")
        rows.append(dict(decoder=name, tokens_per_s=rate, fraction_of_bound=rate / bound,
                         first_call_s=first))
    agree = {name: sum(a == b for a, b in zip(out, outputs["model.forward"]))
             for name, out in outputs.items()}
    report("\nPrefill of a 64- or 65-token prompt at a new length: " +
           ", ".join(f"{v:,.0f} ms {k}" for k, v in prefill_ms.items()) +
           f". Greedy tokens equal to model.forward's (of {new}): " +
           ", ".join(f"{k} {v}" for k, v in agree.items()) + ". In bf16 with random weights "
           "the top two logits are often closer than the rounding, so equal decoders part "
           "after a few tokens; tests/test_gpu.py compares their logits step by step.")
    report.save("decoding", dict(preset=preset, bandwidth=bandwidth, weight_bytes=weights,
                                 bound_tokens_per_s=bound, rows=rows, agree=agree,
                                 prefill_ms=prefill_ms))
    decoding_profile(report, model, device, compiled + ", fused")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def decoding_profile(report: Report, model, device, name: str, steps: int = 20,
                     key: str = "decoding_profile"):
    """torch.profiler over `steps` decoding steps of the fastest decoder: its kernels, their
    time per step, and that sum against the step's wall-clock time (the rest is launch gaps,
    the sampling and the host's wait)."""
    cuda = device.type == "cuda"
    model.setup_cache(1, 12 + steps)              # positions 8 .. 11 warm up, then the timed
    step = G.static_decoder(model, 1, cuda_graph=cuda, compile=True)
    tok = torch.ones(1, 1, dtype=torch.long, device=device)
    for pos in range(8, 12):
        step(tok, pos)
    _sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    activities += [torch.profiler.ProfilerActivity.CUDA] if cuda else []
    with torch.profiler.profile(activities=activities) as prof:
        t = time.perf_counter()
        for pos in range(12, 12 + steps):
            step(tok, pos).argmax(-1).item()          # what a greedy step waits for
        _sync(device)
        wall = (time.perf_counter() - t) / steps
    model.clear_cache()

    def own_us(e):                    # the event's own time: on the device for a kernel
        return e.self_device_time_total if cuda else e.self_cpu_time_total
    # On CUDA the kernels, copies and fills (device events; an operator's device time is its
    # kernels' again); on CPU the operators' own time.
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind and own_us(e) > 0]
    events.sort(key=own_us, reverse=True)
    total = sum(own_us(e) for e in events) / steps
    report(f"\nProfile of {steps} steps of the {name} (torch.profiler; per step): "
           f"{'kernels' if cuda else 'operators'} {total:,.0f} us of a {1e6 * wall:,.0f} us step "
           f"({100 * total / (1e6 * wall):.0f}%); {sum(e.count for e in events) / steps:.0f} "
           f"{'kernel launches' if cuda else 'operator calls'}. The 25 longest:\n")
    report(f"| {'kernel' if cuda else 'operator'} | calls per step | us per step | share |")
    report("|---|---:|---:|---:|")
    for e in events[:25]:
        us = own_us(e) / steps
        name_cell = e.key.replace("|", "/")[:90]
        report(f"| `{name_cell}` | {e.count / steps:.0f} | {us:,.1f} | {100 * us / total:.1f}% |")
    report.save(key, dict(decoder=name, steps=steps, wall_us=1e6 * wall,
                                         kernel_us=total, kernels=[
                                             dict(name=e.key, calls=e.count / steps,
                                                  us=own_us(e) / steps) for e in events[:40]]))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# 5. Kill and resume
# ---------------------------------------------------------------------------------------------

def kill_and_resume(report: Report, device, dry: bool, work: str):
    steps, save, kill_after = (40, 10, 12) if dry else (200, 50, 55)
    data_dir = data.prepare_demo(os.path.join(work, "data"), vocab_size=512, scale=0.05,
                                 quiet=True)

    def argv(out, *extra):
        return ["train.py", "--data", data_dir, "--out", out, "--preset", "tiny",
                "--seq-len", "32" if dry else "128", "--batch-size", "4" if dry else "8",
                "--steps", str(steps), "--warmup", "10", "--save-every", str(save),
                "--eval-every", "1000", "--eval-windows", "8", "--samples", "0",
                "--log-every", "1000", "--device", device.type, *extra]

    def run(out, *extra):
        proc = python(*argv(out, *extra))
        if proc.returncode != 0:
            raise RuntimeError(f"train.py exit {proc.returncode}: {proc.stderr.strip()[-300:]}")

    cuda = device.type == "cuda"
    report(f"\n## 5. train.py on {device.type}: save every {save} steps, SIGKILL after step "
           f"{kill_after}, resume to step {steps}\n")
    report("Each way: two uninterrupted runs and one killed and resumed; the losses of steps "
           f"{save + 1}-{steps} compared. " + ("train.py compiles by default on CUDA; "
           "torch.compile's kernels need not add in the same order from run to run." if cuda
           else "") + "\n")
    report("| train.py | killed at | resumed vs uninterrupted | uninterrupted vs uninterrupted "
           "| first step the two uninterrupted runs differ |")
    report("|---|---:|---:|---:|---:|")
    ways = [("default (compiled)" if cuda else "default", ())]
    ways += [("--no-compile", ("--no-compile",))] if cuda else []
    after = list(range(save + 1, steps + 1))
    passes = []
    for way, extra in ways:
        a, a2, b = (os.path.join(work, f"{n}{len(passes)}") for n in ("straight", "again", "killed"))
        run(a, *extra)
        run(a2, *extra)
        proc = start(*argv(b, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_step(b, kill_after, proc, timeout=300, poll=0.005)    # a GPU step is quick
        finally:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = max(losses(b), default=0)
        if proc.returncode != -signal.SIGKILL:
            report.fail(f"kill and resume, {way}", f"the run was not killed (exit "
                        f"{proc.returncode}, last step {killed_at}): it ran too fast or failed")
            continue
        latest = C.latest(b)
        run(b, *extra, "--resume")
        straight, again, resumed = losses(a), losses(a2), losses(b)
        diff_resume = max(abs(resumed[s] - straight[s]) for s in after)
        diff_noise = max(abs(again[s] - straight[s]) for s in after)
        first = next((s for s in sorted(straight) if again.get(s) != straight[s]), None)
        report(f"| {way} | {killed_at} | {diff_resume:.3g} | {diff_noise:.3g} | "
               f"{first or 'none'} |")
        passes.append(dict(way=way, killed_at=killed_at, latest=latest, steps=steps,
                           max_diff_resumed=diff_resume, max_diff_noise=diff_noise,
                           first_noisy_step=first))
        report.save("kill_and_resume", dict(passes[0], passes=passes))
        if sorted(resumed) != list(range(1, steps + 1)):
            report.fail(f"kill and resume, {way}", f"metrics hold steps {sorted(resumed)[:3]}..., "
                                                   f"not 1..{steps} once each")
        elif diff_resume > (2 * diff_noise if diff_noise else 0.0):
            # NOTE: where two uninterrupted runs already part (compiled kernels may add in
            # another order), the resumed run is one more such run: a wrong restore shows as a
            # jump far beyond that spread, so the bar is twice it, and exactly 0 without it.
            report.fail(f"kill and resume, {way}", "the resumed losses differ from an "
                        "uninterrupted run by more than twice what two uninterrupted runs differ")


# ---------------------------------------------------------------------------------------------
# 6. Decoding experiments: candidates for the default, measured beside it
# ---------------------------------------------------------------------------------------------

def product_and_sum(x, weight):
    """model.project with one row written as a product and a sum on every device under
    torch.compile (model.py does so on CPU only): inductor then writes the matrix-vector product
    as its own reduction, into which it can fuse the norm before it and the additions after."""
    if torch.compiler.is_compiling() and x.numel() == x.shape[-1]:
        return (weight * x.unsqueeze(-2)).sum(-1)
    return torch.nn.functional.linear(x, weight)


def decoding_experiments(report: Report, device, dry: bool, deadline: float):
    import torch._dynamo
    import torch._inductor.config as inductor
    preset = "tiny" if dry else "7b"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = M.Transformer(M.preset(preset))
    model = model.to(dtype).to_empty(device=device)
    torch.manual_seed(0)
    model.reset_parameters()
    model.eval().requires_grad_(False)
    model.fuse_projections()
    M.plan_free_attention()
    bound = memory_bandwidth(device) / G.weight_bytes(model)
    report(f"\n## 6. Decoding experiments: `{preset}`, batch 1, the compiled static step"
           f"{' in a CUDA graph' if device.type == 'cuda' else ''}, fused\n")
    report(f"Weight-read bound {bound:,.1f} tokens/s. GEMV as product and sum: model.project "
           "written as an elementwise product and a sum for one row on every device (model.py "
           "does so on CPU only). Coordinate descent: inductor's coordinate_descent_tuning.\n")
    report("| variant | tokens/s | % of bound | first call s |")
    report("|---|---:|---:|---:|")
    variants = [("as generate.py --compile runs", M.project, False),
                ("GEMV as product and sum", product_and_sum, False),
                ("GEMV as product and sum, coordinate descent", product_and_sum, True)]
    rows, project = [], M.project
    prompt, new = [list(range(1, 9))], 16 if dry else 256
    try:
        for name, fn, descent in variants:
            if time.perf_counter() > deadline:
                report(f"| {name} | skipped: past the check's time budget | | |")
                continue
            torch._dynamo.reset()                   # compile again with this variant
            M.project, inductor.coordinate_descent_tuning = fn, descent
            options = dict(static=True, cuda_graph=device.type == "cuda", compile=True)
            _sync(device)
            t = time.perf_counter()
            G.generate_tokens(model, prompt, 8, temperature=0, **options)
            _sync(device)
            first, stats = time.perf_counter() - t, {}
            G.generate_tokens(model, prompt, new, temperature=0, stats=stats, **options)
            rate = stats["decode_steps"] / stats["decode_s"]
            report(f"| {name} | {rate:,.1f} | {100 * rate / bound:.0f}% | {first:.1f} |")
            rows.append(dict(variant=name, tokens_per_s=rate, fraction_of_bound=rate / bound,
                             first_call_s=first))
        report.save("decoding_experiments", rows)
        best = max(rows, key=lambda r: r["tokens_per_s"], default=None)
        if rows and best is not rows[0] and time.perf_counter() < deadline:
            torch._dynamo.reset()
            M.project = dict((v[0], v[1]) for v in variants)[best["variant"]]
            inductor.coordinate_descent_tuning = "coordinate" in best["variant"]
            decoding_profile(report, model, device, "decoder with " + best["variant"],
                             key="decoding_experiment_profile")
    finally:
        M.project, inductor.coordinate_descent_tuning = project, False
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def main(argv=None) -> Report:
    p = argparse.ArgumentParser(description="Check and time the CUDA paths; write a report.")
    p.add_argument("--out", default="out/gpu_check", help="folder for report.md, results.json")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (what CI runs)")
    p.add_argument("--train-budget", type=float, default=240.0,
                   help="seconds for section 2; the rows after it are skipped")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds for the whole check: section 6's rows after it are skipped")
    a = p.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        sys.exit("error: no CUDA device visible; run with --dry-run to check the script on CPU")
    device = torch.device("cpu" if a.dry_run else "cuda")
    report = Report(a.out)
    xf = M.xformers_ops()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    report(f"# GPU check: {name}\n")
    xf_version = getattr(sys.modules.get("xformers"), "__version__", "?")
    report(f"torch {torch.__version__}, CUDA {torch.version.cuda}, xformers "
           f"{xf_version if xf else 'not available'}, python "
           f"{sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M')}")
    report.save("device", dict(name=name, torch=torch.__version__, cuda=torch.version.cuda,
                               xformers=bool(xf)))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        sections = [("tests/test_gpu.py", lambda: cuda_tests(report, a.dry_run)),
                    ("training step", lambda: training_step(report, device, a.dry_run,
                                                            a.train_budget)),
                    ("memory", lambda: memory(report, device, a.dry_run)),
                    ("decoding", lambda: decoding(report, device, a.dry_run)),
                    ("kill and resume", lambda: kill_and_resume(report, device, a.dry_run, work)),
                    ("decoding experiments", lambda: decoding_experiments(
                        report, device, a.dry_run, t0 + a.budget))]
        for title, section in sections:
            t = time.perf_counter()
            try:
                section()
            except Exception as e:
                traceback.print_exc()
                report.fail(title, f"{type(e).__name__}: {e}")
            report(f"\n({title}: {time.perf_counter() - t:.0f} s)")
    report(f"\nTotal {time.perf_counter() - t0:.0f} s; "
           + (f"FAILED: {', '.join(report.failed)}" if report.failed else "every check passed"))
    report.save("total_s", time.perf_counter() - t0)
    return report


if __name__ == "__main__":
    sys.exit(1 if main().failed else 0)
