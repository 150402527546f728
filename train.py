"""
train.py -- the LLaMA training recipe, from token windows to a checkpoint, on one CPU or many GPUs.

This is the story a reader follows end to end: data.py serves a Table-1-weighted mixture of token
windows, model.py's Transformer predicts the next token, AdamW with warmup and cosine decay
[LLaMA §2.3] updates the weights, and the run is saved so it can resume exactly after a crash.
parallel.py is used when torchrun starts several processes; with one process every parallel step
is the identity. What a run leaves in --out, and how a checkpoint is written so that a kill
leaves at worst a `.tmp-` folder that nothing reads, is checkpoint.py's.

    python train.py                                   # the demo: tiny model, built-in corpus, CPU
    python train.py --preset tiny --steps 200 --out out/run1
    python train.py --out out/run1 --resume           # continue exactly where run1 stopped
    torchrun --nproc_per_node=4 train.py --tp 2 --sp  # tensor and sequence parallel x2, dp x2
    torchrun --nproc_per_node=4 train.py --pp 2 --virtual-stages 2 --micro-batches 4  # pipeline

Reading map
  1. TrainConfig          every option once; the command line is derived from it
  2. The recipe           the learning-rate schedule; AdamW with its decay groups; bf16 autocast
  3. The training loop    train(): build, then accumulate, synchronize, clip, step, log, validate,
                          save; forward_backward, validation_loss
  ---------------------------------------------------------------------------- (the banner)
  4. Checks               the flags alone, then together and against the world (memory too), in
                          one line each
  5. Opening a run        new, resumed or restarted: its lock, saved options, data (the data it
                          was trained on) and model
  6. Checkpoints          saved and loaded across ranks (the files themselves: checkpoint.py)
  7. Measuring            MFU's peak, the CPU allocator, free memory, the loss curve, samples,
                          signals (a step dropped between micro-batches)
  8. main                 errors in one line, exit codes, the process group

`--resume` restores the run's own options (a flag that would change what it computes is refused),
starts from the newest complete checkpoint that every rank can read, and one run at a time holds
OUT (OUT/train.lock). Under pipeline parallelism the first stage gathers every stage's layers
before it writes, so the model files are the same whatever --pp.

Shape legend: B sequences per micro-batch per rank, T sequence length, V vocabulary.

What this file leaves out: resuming at a different tensor-, pipeline- or data-parallel layout with
the optimizer state (use --init-from: weights only, any layout), --compile under pipeline
parallelism, samples at the end under tensor or pipeline parallelism, mixed precision other
than bf16 autocast (no fp16 loss scaling), and a stop inside a pipeline's step (under --pp a
signal is honoured between steps; without it, between micro-batches too).

Papers: LLaMA (arXiv 2302.13971) for the recipe; Megatron-LM (2104.04473, PTD-P) for the grid.
"""

import argparse
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import resource
import signal
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

import checkpoint as C           # everything on disk: checkpoints, the run lock, metrics
import cli
import data
import generate
import model as M
import parallel as P
import planner
from tokenizer import Tokenizer


# ---------------------------------------------------------------------------------------------
# 1. Every option of a run
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainConfig:
    """Every option of a run; the comment beside each is its --help. `--batch-size` is sequences
    per micro-batch *per data-parallel rank*, and `--micro-batches` how many make one optimizer
    step: the global batch is batch_size * micro_batches * dp sequences of seq_len tokens. One
    process accumulates the micro-batches' gradients; a pipeline runs them through its stages in
    the order of its schedule."""
    preset: str = "tiny"            # a name from model.PRESETS; vocab_size comes from the tokenizer
    steps: int = 400                # optimizer steps (the demo: about three minutes on 2 CPU cores)
    batch_size: int = 16            # sequences per micro-batch per rank
    seq_len: int = 128              # tokens per training window (T)
    lr: float = 3e-3                # peak; LLaMA 7B used 3e-4 at 4M tokens per batch [Table 2]
    warmup: int = 40                # linear warmup steps (LLaMA: 2000)
    min_lr_ratio: float = 0.1       # cosine decays to this fraction of the peak [LLaMA §2.3]
    weight_decay: float = 0.1       # AdamW's, on matrices only
    beta1: float = 0.9              # AdamW's decay of the gradient's running mean
    beta2: float = 0.95             # AdamW's decay of the squared gradient's running mean
    clip: float = 1.0               # global gradient norm
    seed: int = 0                   # the initialization and the data order
    out: str = "out/demo"           # the run's folder: checkpoints, metrics.jsonl, loss.png
    resume: bool = False            # continue from OUT/checkpoints/latest
    init_from: str = ""             # weights to start from (ours, Meta's, HF); a fresh optimizer
    data: str = "data/demo"         # from `python data.py prepare`; the default is built if missing
    mix: str = ""                   # source weights "name=w,..."; empty: the dataset's defaults
    eval_every: int = 100           # steps between validations
    eval_windows: int = 64          # held-out windows for validation loss
    save_every: int = 200           # steps between checkpoints
    keep: int = 2                   # complete checkpoints kept
    log_every: int = 10             # steps between progress lines
    samples: int = 3                # continuations printed at the end
    tp: int = 1                     # tensor-parallel degree (torchrun: world = tp * pp * dp)
    pp: int = 1                     # pipeline-parallel degree: stages of consecutive layers
    virtual_stages: int = 1         # chunks per pipeline rank (> 1: the interleaved schedule)
    micro_batches: int = 1          # per optimizer step (gradient accumulation, or the pipeline's)
    pp_schedule: str = "auto"       # auto | afab | 1f1b | interleaved (auto: by --virtual-stages)
    sp: bool = False                # sequence parallelism (needs tp > 1)
    recompute: str = "none"         # none | selective | full
    bucket_mb: float = 25.0         # data-parallel gradient bucket size, MB
    overlap: bool = True            # overlap data-parallel all-reduce with the backward pass
    attention: str = "auto"         # auto | xformers | sdpa | math
    compile: Optional[bool] = None  # torch.compile the model; unset: on for one CUDA process
    device: str = "auto"            # auto | cpu | cuda
    dtype: str = "auto"             # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    max_bad_steps: int = 5          # consecutive non-finite steps before the run stops
    timeout: float = 600.0          # seconds a collective may wait on a stuck or dead rank

    @property
    def pipeline_schedule(self) -> Optional[str]:
        """--pp-schedule for parallel.py: None picks 1f1b, or interleaved with virtual stages."""
        return None if self.pp_schedule == "auto" else self.pp_schedule


# ---------------------------------------------------------------------------------------------
# 2. The recipe: schedule, optimizer, precision [LLaMA §2.3]
# ---------------------------------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to the peak over `warmup` steps, then cosine decay to min_lr_ratio * peak.

    step counts from 0; the step after the warmup gets the peak, and the last step (steps - 1)
    gets exactly the floor when the warmup ends before it (warmup < steps - 1). A warmup of
    steps - 1 or steps (check_config allows up to steps) leaves no step to decay over: the last
    step gets the peak.
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay_steps = max(1, cfg.steps - 1 - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / decay_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, cfg: TrainConfig):
    """AdamW(0.9, 0.95); weight decay 0.1 on matrices (linears and embeddings) only.

    NOTE: the RMSNorm gains are left undecayed: they are scales around 1, and pulling them to 0
    would shrink every activation rather than regularize a mapping (the usual GPT/Megatron rule:
    decay tensors of 2 or more dimensions).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    # PERF: the fused kernel updates every tensor in one pass, on CUDA and on CPU (the `tiny`
    # model's step on 2 cores: 2 ms against 14 for the default, foreach, which is the simpler).
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def autocast(cfg: TrainConfig, device: torch.device) -> tuple:
    """(compute dtype, the context every forward runs in): bf16 autocast with --dtype bf16, or
    --dtype auto on CUDA (the weights and the optimizer stay fp32); plain fp32 otherwise."""
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    return (torch.bfloat16 if bf16 else torch.float32,
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16))


# ---------------------------------------------------------------------------------------------
# 3. The training loop
# ---------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, world, given: Optional[dict] = None) -> dict:
    """The run: opened (new, or the saved one it continues), trained, saved. Returns the per-step
    losses and validation losses (for tests and the caller)."""
    say = world.say
    cfg, found, lock = open_run(cfg, given or {}, world)    # the helpers are below the banner
    try:
        if found and C.step_of(found[0]) >= cfg.steps:
            say(f"{cfg.out} is finished: it trained {C.step_of(found[0])} steps of --steps "
                f"{cfg.steps}; give --steps N (more than that) to train it further")
            return dict(losses={}, val_losses={}, stopped_at=None, finished=True)
        grid, device = P.make_grid(world, tp=cfg.tp, pp=cfg.pp), world.device
        if device.type == "cpu":
            keep_freed_memory()
        dtype, amp = autocast(cfg, device)
        sampler, tokenizer, dataset = open_data(cfg, world, found)   # dataset: what is saved
        args, init_state = model_args(cfg, tokenizer, found[0] if found else None)
        check_memory(cfg, args, grid, world, dtype)  # a first step that cannot fit: refused now
        # NOTE: parallel.py's seed policy: every rank builds this same full model from the same
        # seed, and parallelize() / PipelineStage keep each rank's part of it.
        torch.manual_seed(cfg.seed)
        model = M.Transformer(args)
        if init_state is not None:                           # --init-from's weights
            model.load_state_dict(init_state)
        model.set_attention_backend(cfg.attention)
        model = P.parallelize(model, grid, sp=cfg.sp).to(device)
        P.apply_recompute(model, cfg.recompute)
        if grid.pp > 1:                              # keep this rank's stage: its chunks of layers
            model = P.PipelineStage(model, grid, cfg.virtual_stages)
        optimizer = make_optimizer(model, cfg)
        start = resume(found, model, optimizer, sampler, world, grid, cfg) if found else 0
        step_fn = torch.compile(model) if uses_compile(cfg, device, world.world_size) else model
        sync = P.GradSync(model, grid, bucket_mb=cfg.bucket_mb, overlap=cfg.overlap)
        metrics = os.path.join(cfg.out, "metrics.jsonl")
        if world.is_main:
            C.truncate_metrics(metrics, start)
        global_batch = cfg.batch_size * cfg.micro_batches * grid.dp          # sequences
        peak_tps = describe_run(cfg, args, world, grid, dtype, global_batch)
        val = data.validation_windows(cfg.data, cfg.seq_len, cfg.eval_windows, seed=cfg.seed)

        def validate(step: int):
            val_losses[step] = validation_loss(model, val.to(device), cfg, grid, amp)
            say(f"\nstep {step}: validation loss {val_losses[step]:.4f}")
            if world.is_main:
                C.log_metrics(metrics, dict(step=step, val_loss=val_losses[step]))

        def save(step: int):
            nonlocal last_saved
            save_checkpoint(cfg, step, model, optimizer, sampler, world, grid, args, dataset)
            last_saved = step

        # `step` counts optimizer updates done: step 1 is the first update, checkpoints and
        # metrics are named by it, and validation at step 0 is the untrained model.
        losses, val_losses, bad_in_a_row, last_saved = {}, {}, 0, start
        if start == 0:
            validate(0)
        bar = cli.Progress("", cfg.steps, stream=sys.stdout, every=0, quiet=not world.is_main)
        with stop_signals(say) as stop:  # SIGTERM, SIGINT: stopped between steps or micro-batches
            for step in range(start + 1, cfg.steps + 1):
                t0 = time.perf_counter()
                lr = lr_at(step - 1, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                before = step_start(sampler)            # what a dropped step gives back
                batch = sampler.next_batch(global_batch, grid.dp_rank, grid.dp).to(device)
                try:
                    loss = forward_backward(model, step_fn, batch, cfg, grid, sync, amp,
                                            stop=lambda: stop_now(stop, world))
                except StepDropped:                   # a stop between two micro-batches
                    drop_step(step, before, sampler, optimizer, last_saved, save, say)
                    return dict(losses=losses, val_losses=val_losses, stopped_at=step - 1)
                grad_norm = P.clip_grad_norm(model, cfg.clip, grid)
                finite = math.isfinite(loss) and math.isfinite(grad_norm)
                bad_in_a_row = 0 if finite else bad_in_a_row + 1
                if finite:
                    optimizer.step()
                else:                                         # skip: weights stay as they were
                    say(f"\nstep {step}: non-finite loss {loss} or grad norm {grad_norm}; skipped")
                optimizer.zero_grad(set_to_none=True)
                synchronize(device)
                losses[step], tps = loss, global_batch * cfg.seq_len / (time.perf_counter() - t0)
                if tps > peak_tps:             # the peak was timed while the machine was busy
                    peak_tps, formula = peak_tokens_per_s(args, cfg.seq_len, device, dtype,
                                                          world.world_size, again=True)
                    say(f"\npeak timed again, as step {step} ran faster: {formula}")
                if world.is_main:
                    C.log_metrics(metrics, dict(
                        step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tps,
                        mfu=tps / peak_tps, skipped=not finite,   # NaN: null (C.log_metrics)
                        tokens_by_source=sampler.tokens_by_source()))
                if bad_in_a_row >= cfg.max_bad_steps:             # its row is written first
                    raise RunStopped(f"{bad_in_a_row} non-finite steps in a row at step {step}: "
                                     "lower --lr, or resume from an earlier checkpoint")
                if step % cfg.log_every == 0 or step in (1, cfg.steps):
                    bar.show(step, f"step {step}/{cfg.steps} loss {loss:.4f} lr {lr:.2e} |g| "
                             f"{grad_norm:.3f} {tps:,.0f} tok/s MFU {100 * tps / peak_tps:.1f}%")
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    validate(step)
                if not _all_ranks(stop["signal"] is None, world):   # one rank signalled: all stop
                    say(f"\nsignal received: saving step {step} and stopping")
                    save(step)
                    return dict(losses=losses, val_losses=val_losses, stopped_at=step)
                if step % cfg.save_every == 0 or step == cfg.steps:
                    save(step)
        if world.is_main:                  # the signals are as they were: Ctrl-C interrupts these
            png = plot_losses(metrics, os.path.join(cfg.out, "loss.png"))
            say(f"metrics: {metrics}" + (f", curve: {png}" if png else ""))
        if cfg.samples and grid.tp == 1 and grid.pp == 1:
            print_samples(model, tokenizer, cfg, say)
        return dict(losses=losses, val_losses=val_losses, stopped_at=None)
    finally:
        if lock is not None:
            C.unlock_run(cfg.out, lock)


def forward_backward(model, step_fn, batch, cfg: TrainConfig, grid, sync, amp,
                     stop=None) -> float:
    """Gradients of one step's batch (B * micro-batches, T+1) summed into .grad, synchronized
    over data parallelism; returns the step's mean loss (over micro-batches and replicas).
    stop(), asked between micro-batches, True: the step is dropped (StepDropped)."""
    if grid.pp > 1:                           # the micro-batches in the schedule's order
        loss_sum = P.pipeline_step(model, batch, grid, cfg.micro_batches, cfg.pipeline_schedule,
                                   sync, amp)
    else:
        loss_sum = torch.zeros((), device=batch.device)
        for micro, chunk in enumerate(batch.split(cfg.batch_size)):           # (B, T+1) each
            if micro and stop is not None and stop():
                raise StepDropped(micro)
            last = micro == cfg.micro_batches - 1
            # COMM: the data-parallel all-reduce runs only on the last micro-batch.
            with (contextlib.nullcontext() if last else sync.no_sync()), amp:
                loss = P.loss_fn(step_fn(chunk[:, :-1]), chunk[:, 1:], grid) / cfg.micro_batches
            loss.backward()
            loss_sum += loss.detach()
    sync.finish()
    if grid.dp > 1:                                           # for logging: mean over replicas
        dist.all_reduce(loss_sum, group=grid.dp_group)        # COMM: dp all-reduce, one float
        loss_sum /= grid.dp
    return loss_sum.item()


def validation_loss(model, val, cfg: TrainConfig, grid, amp) -> float:
    """Mean loss over fixed held-out windows; every rank evaluates the same windows."""
    model.eval()
    total = 0.0
    with torch.no_grad(), amp:
        for chunk in val.split(cfg.batch_size):
            if grid.pp > 1:                              # the forwards through the stages
                loss = P.pipeline_step(model, chunk, grid, 1, backward=False)
            else:
                loss = P.loss_fn(model(chunk[:, :-1]), chunk[:, 1:], grid)
            total += loss.item() * len(chunk)
    model.train()
    return total / len(val)


# =============================================================================================
# Below: what running it for real needs -- the checks of the flags, opening a run (its lock, its
# saved options), checkpoints across ranks, measuring, and main with its exit codes.
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# 4. Checks
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None) -> tuple:
    """(TrainConfig, {option: value} for those the command line names: what --resume may
    override). The CLI is the dataclass: `--batch-size 8`, `--sp/--no-sp`, the same under
    torchrun; an option left out keeps the dataclass's default."""
    p = cli.OneLineParser(prog="train.py", description=__doc__.split("\n\n")[1],
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          argument_default=argparse.SUPPRESS)
    cli.add_fields(p, TrainConfig)
    given = vars(p.parse_args(argv))
    return TrainConfig(**given), given


class ConfigError(ValueError):
    """A configuration that cannot work: reported in one line before any work is done."""


class RunStopped(RuntimeError):
    """The run cannot go on (repeated non-finite losses): reported in one line, exit code 1."""


class StepDropped(Exception):
    """A stop (SIGTERM, SIGINT) between two micro-batches: the unfinished step is dropped."""


def check_flags(cfg: TrainConfig):
    """Every number and name on its own, before any process group or file is touched."""
    def rule(flag: str, ok, what: str) -> tuple:      # NOTE: nan and inf pass no rule
        value = getattr(cfg, flag)
        return flag, value, cli.finite(value) and ok(value), what
    counts = ("steps", "batch_size", "seq_len", "tp", "eval_windows", "keep", "log_every",
              "eval_every", "save_every", "pp", "virtual_stages", "micro_batches")
    cli.check([
        (cfg.preset in M.PRESETS,
         f"unknown --preset {cfg.preset!r}; choose one of {', '.join(M.PRESETS)}"),
        (cfg.recompute in P.RECOMPUTE_MODES,
         f"--recompute {cfg.recompute!r}: choose none, selective or full"),
        (cfg.attention in M.ATTENTION_BACKENDS,
         f"--attention {cfg.attention!r}: choose {', '.join(M.ATTENTION_BACKENDS)}"),
        (cfg.dtype in ("auto", "fp32", "bf16") and cfg.device in ("auto", "cpu", "cuda"),
         "--dtype is auto, fp32 or bf16 and --device is auto, cpu or cuda"),
        (cfg.device != "cuda" or torch.cuda.is_available(),
         "--device cuda but no CUDA device is visible; use --device cpu"),
        *[rule(name, lambda x: x > 0, "positive") for name in counts],
        rule("lr", lambda x: x > 0, "a positive number, e.g. 3e-4"),
        rule("clip", lambda x: x > 0,
             "a positive global norm, e.g. 1.0 (a huge one, 1e9, turns clipping off)"),
        rule("weight_decay", lambda x: x >= 0, "0 or more, e.g. 0.1"),
        rule("beta1", lambda x: 0 <= x < 1, "in [0, 1), e.g. 0.9"),
        rule("beta2", lambda x: 0 <= x < 1, "in [0, 1), e.g. 0.95"),
        rule("min_lr_ratio", lambda x: 0 <= x <= 1, "in [0, 1], e.g. 0.1"),
        rule("warmup", lambda x: x >= 0, "0 or more steps"),
        rule("bucket_mb", lambda x: x > 0, "positive, e.g. 25"),
        rule("max_bad_steps", lambda x: x >= 1, "1 or more"),
        rule("samples", lambda x: 0 <= x <= 3, "0 to 3"),
        rule("seed", lambda x: 0 <= x < 2**64, "0 to 2**64 - 1"),
        rule("timeout", lambda x: x > 0, "positive seconds, e.g. 600"),
        (not (cfg.resume and cfg.init_from),
         "--resume continues a run, --init-from starts a new one: give one of them")],
        ConfigError)
    if cfg.mix:                           # its words now, before --out or the demo data is made
        try:
            data.parse_mix(cfg.mix)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def check_config(cfg: TrainConfig, world_size: int, resumed: bool = False):
    """The flags together, and against the number of processes torchrun started. resumed: the
    run continues a checkpoint, whose --warmup is its own (fixed on resume)."""
    if not cfg.init_from:       # the preset against the grid first: no world size would do
        check_split(M.preset(cfg.preset), cfg)
    n = cfg.tp * cfg.pp
    longer = (f"give --steps {cfg.warmup} or more" if resumed else
              f"give --warmup {cfg.steps} or less")
    cli.check([
        (world_size % n == 0, f"world size {world_size} is not divisible by --tp {cfg.tp} x --pp "
                              f"{cfg.pp} = {n}; launch a multiple of {n} processes"),
        (not (cfg.pp > 1 and cfg.compile),
         "--compile is not supported with --pp > 1; drop one of them"),
        (not cfg.sp or cfg.tp > 1,
         "--sp splits activations over the tensor-parallel group; add --tp 2 or more"),
        (cfg.pp > 1 or cfg.pp_schedule == "auto",
         f"--pp-schedule {cfg.pp_schedule} orders a pipeline's micro-batches, and --pp 1 has no "
         "pipeline: drop --pp-schedule, or add --pp 2 or more"),
        # NOTE: a warmup of steps - 1 or steps is let through (short runs, --steps 2 --warmup 1):
        # the run then ends at the peak, with no step of decay (lr_at's docstring).
        (cfg.warmup <= cfg.steps,
         f"--warmup {cfg.warmup} is longer than the run's --steps {cfg.steps}: the learning rate "
         f"would never reach its peak --lr {cfg.lr:g} nor decay; {longer}")],
        ConfigError)


def check_split(args: M.ModelArgs, cfg: TrainConfig):
    """parallel.py's rules: heads, vocabulary, FFN width and sequence against --tp and --sp,
    layers and micro-batches against --pp, --virtual-stages and the schedule."""
    P.check_config(args, cfg.tp, cfg.sp, cfg.seq_len)
    P.check_pipeline(args.n_layers, cfg.pp, cfg.virtual_stages, cfg.micro_batches,
                     cfg.pipeline_schedule)


def check_memory(cfg: TrainConfig, args: M.ModelArgs, grid, world, dtype):
    """Refuse, before the model is built, a first step that cannot fit: planner.py's accounting
    of this rank's stage at the worst moment of its schedule (stage_step_bytes) -- its weights
    and AdamW state (PRECISIONS), the gradients and autocast's copies that exist then, and the
    activations then held -- against the memory free on the device. A lower bound (temporary
    buffers come on top, and ranks that share a host share its memory): a step refused here
    cannot fit; one let through may still not. With one micro-batch no gradient exists while
    the activations are all held: the backward makes them as it frees those."""
    bf16 = dtype == torch.bfloat16
    # NOTE: compiled, the partitioner may keep less than the eager code does: the bound then
    # counts only what no recomputation avoids, each block's input and the head (as "full"),
    # and, as under full recomputation, no bf16 copy of the weights.
    compiled = uses_compile(cfg, world.device, world.world_size)
    full = compiled or cfg.recompute == "full"
    state, held = planner.stage_step_bytes(args, cfg.batch_size, cfg.seq_len, grid.tp, grid.pp,
                                           cfg.virtual_stages, cfg.micro_batches,
                                           cfg.pipeline_schedule, cfg.sp,
                                           "full" if compiled else cfg.recompute,
                                           "bf16" if bf16 else "fp32", grid.pp_rank,
                                           copies=not full)
    free = available_memory(world.device)
    if _all_ranks(free is None or state + held <= free, world):
        return
    if free is None or state + held <= free:
        raise ConfigError("the first step does not fit in another rank's memory; see its message")
    fix = ("the weights and optimizer state alone do not fit: use a smaller --preset, or split "
           "the model over more devices with --tp or --pp" if state > free else
           "lower --batch-size (and raise --micro-batches to keep the global batch)" + (
               ", or add --recompute full" if not compiled and cfg.recompute != "full" else ""))
    raise ConfigError(f"the first step needs at least {C.size_text(state)} for the weights and "
                      "AdamW state (with the gradients and bf16 copies held at its fullest) and "
                      f"{C.size_text(held)} of activations "
                      f"(--batch-size {cfg.batch_size} x --seq-len {cfg.seq_len}; planner.py's "
                      f"accounting), but {world.device} has {C.size_text(free)} free; {fix}")


def uses_compile(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> bool:
    """--compile or --no-compile as given; unset, compile on CUDA in a single process.

    PERF: on one H200, `1b` at sequence 2048 in bf16 trains at 54.6% MFU compiled against 41.0%
    eager, and the compilation costs its first step tens of seconds (tests/gpu_check.py; the
    README's GPU section). Several processes compile only when asked: parallel.py's hooks
    under torch.compile have not been measured, and CPU compiles slowly for a small gain.
    """
    return cfg.compile if cfg.compile is not None else device.type == "cuda" and world_size == 1


# ---------------------------------------------------------------------------------------------
# 5. Opening a run: what it continues, its lock, its data, its model
# ---------------------------------------------------------------------------------------------

# What makes a run the run it is: resuming with another value would not continue it exactly.
FIXED_ON_RESUME = ("preset", "data", "mix", "seq_len", "batch_size", "micro_batches", "lr",
                   "warmup", "min_lr_ratio", "weight_decay", "beta1", "beta2", "clip", "seed",
                   "init_from", "dtype", "tp", "pp", "virtual_stages", "pp_schedule", "sp")


def open_run(cfg: TrainConfig, given: dict, world) -> tuple:
    """(configuration, checkpoints to resume from, the run lock or None): what this launch
    continues or starts.

    --resume (or torchrun's restart) continues the run in --out with its own saved configuration;
    otherwise --out must hold no checkpoint (a run that saved none is started again). Then --out
    must be writable and no input of the run, and no other run may be using it: the lock is
    taken by rank 0, and every rank learns whether it got it.
    """
    restarted = world.restart > 0            # torchrun started this round after a failure
    found = C.checkpoints(cfg.out)
    if cfg.resume and not found:
        raise ConfigError(f"--resume: {cfg.out} holds no complete checkpoint to continue (a run "
                          "stopped before its first save, or none was started); start the run "
                          "again without --resume, with its flags")
    if found and (cfg.resume or restarted):
        # A checkpoint whose params.json, options or dataset.json cannot be read is passed over
        # now, as resume() passes over weights, so that what follows reads the one resumed.
        found = found[first_readable(found, read_opening, world)[0]:]
        cfg = restore_config(cfg, given, found[0])
        check_world(found[0], trained_grid(found[0], cfg.pp), world.world_size)
    elif found:
        raise ConfigError(f"{cfg.out} already holds a run ({found[0]}); pass --resume to "
                          "continue it, or choose another --out")
    check_config(cfg, world.world_size, resumed=bool(found))   # found: a run continued
    C.check_outputs([("--out", cfg.out)], [("--data", cfg.data)] + (
        C.checkpoint_paths("--init-from", cfg.init_from) if cfg.init_from else []))
    lock = refused = None
    if world.is_main:
        try:
            os.makedirs(cfg.out, exist_ok=True)
            lock = C.lock_run(cfg.out)
            C.remove_leftovers(os.path.join(cfg.out, "checkpoints"))  # e.g. a save's, disk full
        except ValueError as e:                      # a live run holds it
            refused = e
        except OSError as e:
            refused = ConfigError(f"--out {cfg.out} cannot be written ({e.strerror}); choose a "
                                  "writable folder")
    if not _all_ranks(refused is None, world):
        raise refused or ConfigError("rank 0 refused the run (its message says why)")
    if not found and (held := C.holds_a_run(cfg.out)):
        world.say(f"{cfg.out} holds a run that saved no checkpoint ({held}): it starts again "
                  "from step 0, and its metrics are replaced")
    return cfg, found, lock


def trained_grid(ckpt: str, pp: int) -> dict:
    """{"dp", "tp", "pp"} the checkpoint's run was trained at, from its first train state
    memory-mapped (no tensor is read); {} where that file cannot say: resume() passes over a
    damaged one, saying so, and checks the checkpoint it loads instead."""
    path = os.path.join(ckpt, C.train_state_name(0, 0, pp))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {axis: int(state[axis]) for axis in ("dp", "tp", "pp")}
    except Exception:                        # NOTE: torch, zipfile and pickle raise many kinds
        return {}


def check_world(ckpt: str, grid: dict, world_size: int):
    """A run resumes at the world size it was trained at: the data-parallel degree is the rest
    of the world after tp x pp, and another one would change the global batch (batch size x
    micro-batches x dp) silently. grid: trained_grid's, or a train state itself."""
    if "dp" in grid and (n := grid["dp"] * grid["tp"] * grid["pp"]) != world_size:
        raise ConfigError(f"cannot resume {ckpt} at world size {world_size}: the run was "
                          f"trained at world size {n} (dp {grid['dp']} x tp {grid['tp']} x pp "
                          f"{grid['pp']}), and another would change its global batch or its "
                          f"grid; launch {n} processes, or start a new run from these weights "
                          f"with --init-from {ckpt}")


def read_opening(ckpt: str):
    """What opening a run reads of the checkpoint it resumes: ValueError if a file is damaged."""
    C.read_params(ckpt)
    saved_options(ckpt)
    C.saved_dataset(ckpt)


def saved_options(ckpt: str) -> dict:
    """The options a checkpoint saved (train_config.json), each of its TrainConfig type: a file
    edited by hand (`"lr": "abc"`) is refused naming the file and the field."""
    saved = C.saved_config(ckpt)
    for f in dataclasses.fields(TrainConfig):
        if f.name in saved and not of_kind(saved[f.name], f):
            kind = "true, false or null" if f.default is None else TYPE_WORDS[type(f.default)]
            raise ConfigError(f"{ckpt}/train_config.json: {f.name} is {saved[f.name]!r}, not "
                              f"{kind}: the file was edited or damaged; fix the value, or copy "
                              "the file from another checkpoint of the run")
    return saved


TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def of_kind(value, field) -> bool:
    """Whether a saved value has its option's type (JSON's 3 is a float too; true is no int)."""
    if field.default is None:                            # Optional[bool]
        return value is None or isinstance(value, bool)
    kind = type(field.default)
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if kind is float else kind)


def restore_config(cfg: TrainConfig, given: dict, ckpt: str) -> TrainConfig:
    """The saved run's configuration, with the flags this command line names itself where they
    leave the run what it was (--steps, --eval-every, --save-every, --attention, --compile...).

    A flag of FIXED_ON_RESUME with another value is refused: the losses would no longer be the
    ones the run would have had. A path is compared as the folder it names; --data, where the
    checkpoint recorded the dataset (dataset.json), as the data it holds (open_data). The saved
    values are checked as the flags are (check_flags), naming the file. A new --steps is said
    once the checkpoint resumed is known (say_new_steps).
    """
    saved = saved_options(ckpt)
    if saved.get("grad_accum", 1) > 1:      # NOTE: older checkpoints named it --grad-accum
        saved["micro_batches"] = saved["grad_accum"]
    same = {"data": os.path.realpath, "init_from": lambda p: p and os.path.realpath(p),
            "mix": lambda m: m and data.parse_mix(m)}
    # A checkpoint with its dataset.json knows the data by its content: --data may name where it
    # lies now (moved, copied), and open_data refuses a folder that holds other data.
    fixed = [n for n in FIXED_ON_RESUME if n != "data" or C.saved_dataset(ckpt) is None]
    for name, value in given.items():
        norm, flag = same.get(name, lambda v: v), "--" + name.replace("_", "-")
        if name in fixed and name in saved and norm(saved[name]) != norm(value):
            raise ConfigError(f"cannot resume {ckpt} with {flag} {value}: the run was trained "
                              f"with {flag} {saved[name]!r}, and another value would not continue "
                              f"it; drop {flag}, or start a new run from these weights with "
                              f"--init-from {ckpt}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    restored = TrainConfig(**{**{k: v for k, v in saved.items() if k in known}, **given,
                              "resume": cfg.resume, "out": cfg.out})
    try:
        check_flags(dataclasses.replace(restored, resume=False))    # its init_from is its own
    except ConfigError as e:
        raise ConfigError(f"{ckpt}/train_config.json: {e}; fix the value there, or copy the file "
                          "from another checkpoint of the run") from None
    return restored


def open_data(cfg: TrainConfig, world, found: list) -> tuple:
    """(sampler, tokenizer, what each checkpoint records of the data: its tokenizer's path and
    identity); the demo corpus is built on first use. A resumed run's data must be the data it
    was trained on (the checkpoint's dataset.json): one prepared again in place is refused."""
    saved_data = C.saved_config(found[0]).get("data") if found else None
    if not os.path.isdir(cfg.data):
        if found:                              # a resumed run's data is never built anew
            raise ConfigError(f"--data {cfg.data} does not exist; give --data with the folder "
                              f"the run's data (trained on as {saved_data}) lies in now")
        if cfg.data != TrainConfig.data:
            raise ConfigError(f"--data {cfg.data} does not exist; build it with `python data.py "
                              "prepare ... --out DIR`")
        refused = None
        if world.is_main:
            try:
                data.prepare_demo(cfg.data)
            except FileExistsError:            # another run is building it, or has just built it
                if not data.is_complete(cfg.data):       # built: this run reads it
                    refused = ConfigError(f"--data {cfg.data} is being built by another process "
                                          "right now; wait for it to finish, then run again")
        if not _all_ranks(refused is None, world):       # the others wait for rank 0's build
            raise refused or ConfigError("rank 0 could not build --data (its message says why)")
    tok_path = os.path.join(cfg.data, "tokenizer.model")
    weights = data.parse_mix(cfg.mix) if cfg.mix else None
    sampler = data.MixtureSampler(cfg.data, cfg.seq_len, weights=weights, seed=cfg.seed)
    identity = data.dataset_identity(cfg.data)
    if found and (saved := C.saved_dataset(found[0])) is not None:
        try:
            changed = data.dataset_changes(saved, identity)
        except (KeyError, TypeError, AttributeError):
            changed = f"{found[0]}/dataset.json does not say what it was (the file is damaged)"
        if changed and cfg.mix and changed.startswith("its default mixture"):
            changed = None                               # --mix sets this run's mixture itself
        if changed and saved_data and os.path.realpath(saved_data) != os.path.realpath(cfg.data):
            raise ConfigError(f"cannot resume {found[0]}: --data {cfg.data} is not the data the "
                              f"run was trained on (as {saved_data}): {changed}; give --data with "
                              "the folder that data lies in now, or drop --data")
        if changed:
            raise ConfigError(f"cannot resume {found[0]}: --data {cfg.data} changed since it was "
                              f"saved: {changed}; resume on the data the run was trained on "
                              "(prepare it again as it was), or start a new run from these "
                              f"weights with --init-from {found[0]}")
    return sampler, Tokenizer(tok_path), dict(tokenizer=tok_path, identity=identity)


def model_args(cfg: TrainConfig, tokenizer, ckpt: Optional[str] = None) -> tuple:
    """(ModelArgs, full state or None): a resumed run's own, --init-from's model, or a preset
    sized to the tokenizer; checked against the grid (the preset was, before the data)."""
    state, source = None, ckpt or cfg.init_from
    if ckpt:                                 # resuming: the checkpoint's model, loaded later
        args = C.read_params(ckpt)
        C.check_params(ckpt, args)           # against its weights' shapes, before it is built
    elif cfg.init_from:
        args, state, _ = C.read_checkpoint(cfg.init_from)
    else:
        args = M.preset(cfg.preset, vocab_size=tokenizer.n_words)
    if args.vocab_size != tokenizer.n_words:
        raise ConfigError(f"{source} has a model of vocab {args.vocab_size} but --data {cfg.data} "
                          f"was tokenized with {tokenizer.n_words} pieces; prepare the data with "
                          "the checkpoint's tokenizer.model")
    args = dataclasses.replace(args, max_seq_len=max(args.max_seq_len, cfg.seq_len))
    check_split(args, cfg)
    return args, state


# ---------------------------------------------------------------------------------------------
# 6. Checkpoints across ranks (the files themselves: checkpoint.py)
# ---------------------------------------------------------------------------------------------

def save_checkpoint(cfg, step, model, optimizer, sampler, world, grid, args: M.ModelArgs,
                    dataset: dict):
    """Every rank calls this. dp rank 0 of each tp rank writes its shard (pp rank 0 gathers the
    stages' layers first); each stage writes its optimizer state; global rank 0 renames.

    Weights that are not finite are never saved (on any rank: the ranks agree first), and a
    write that fails on any rank leaves `latest` where it was and removes what it wrote (on a
    full disk, the space it took). dataset: open_data's, the data's tokenizer and identity."""
    if not _all_ranks(all(bool(torch.isfinite(p).all()) for p in model.parameters()), world):
        raise RunStopped(f"the weights are not finite at step {step}: not saved, the latest "
                         f"checkpoint is still {C.latest(cfg.out)}; lower --lr and resume")
    tmp = lock = failed = None
    if world.is_main:
        try:
            tmp, lock = C.start_build(C.step_folder(cfg.out, step))
        except OSError as e:
            failed = e
    try:
        box = [tmp]                                 # every rank writes into rank 0's folder
        if world.world_size > 1:
            dist.broadcast_object_list(box, src=0)  # COMM: world, the folder's path
        if (tmp := box[0]) is None:
            raise failed or OSError("rank 0 could not start the checkpoint; see its message")
        # This rank's tp slice (a tp all-gather inside), all layers on pp rank 0 (None elsewhere).
        shard = P.merge_stages(P.shard_state_dict(model, grid), grid)
        if grid.dp_rank == 0:                       # each file is flushed before the rename
            # torch's generators, so that a resumed run draws what the original drew: the
            # sampler keeps its own state, and no step draws from numpy's or Python's.
            rng = dict(torch=torch.get_rng_state(),
                       cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
            state = dict(step=step, optimizer=optimizer.state_dict(), sampler=sampler.state_dict(),
                         rng=rng, config=dataclasses.asdict(cfg), tp=grid.tp, dp=grid.dp,
                         pp=grid.pp)
            try:
                name = C.train_state_name(grid.tp_rank, grid.pp_rank, grid.pp)
                C.save_torch(state, os.path.join(tmp, name))
                if grid.pp_rank == 0:
                    C.save_torch(shard, os.path.join(tmp, C.shard_file(grid.tp_rank)))
                if grid.pp_rank == 0 and grid.tp_rank == 0:
                    C.write_model(tmp, args, dataset["tokenizer"], dataclasses.asdict(cfg),
                                  dataset["identity"])
            except OSError as e:
                failed = e
        if not _all_ranks(failed is None, world):
            if world.is_main:
                C.abandon_build(tmp, lock)
                lock = None
            raise failed or OSError(f"another rank could not write {tmp}; see its message")
        if world.is_main:
            C.publish(cfg.out, tmp, step, cfg.keep)
    finally:
        if lock is not None:
            os.close(lock)
    _all_ranks(True, world)                          # no rank goes on before the rename


def resume(candidates: list, model, optimizer, sampler, world, grid, cfg: TrainConfig) -> int:
    """Restore model, optimizer, sampler and RNG from the newest checkpoint that every rank
    reads whole; return the steps it had done. One that does not load (a truncated or corrupt
    file) is passed over, saying so, for the one before it (first_readable). Then a new --steps
    is said for the checkpoint resumed (say_new_steps)."""
    def load(path: str) -> int:
        state = C.read_train_state(path, grid.tp_rank, grid.pp_rank, grid.pp)
        check_world(path, state, world.world_size)   # open_run checked the newest, if it could
        P.load_sharded(model, C.read_checkpoint(path)[1], grid)   # all shards, merged
        optimizer.load_state_dict(state["optimizer"])
        try:
            sampler.load_state_dict(state["sampler"])
        except ValueError as e:              # another mixture: a configuration, not a damaged file
            raise ConfigError(f"cannot resume {path}: the data sampler it saved differs from "
                              f"this run's ({e}): --data was prepared again since; resume "
                              "on the data the run was trained on, or start a new run with "
                              f"--init-from {path}") from None
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        return state["step"]

    i, step = first_readable(candidates, load, world)
    world.say(f"resumed from {candidates[i]} at step {step}")
    say_new_steps(cfg, candidates[i], world.say)
    return step


def say_new_steps(cfg: TrainConfig, ckpt: str, say):
    """A --steps other than the one the resumed checkpoint's run planned, said with the learning
    rate before and after the recomputed decay."""
    done = C.step_of(ckpt)
    planned = dataclasses.replace(cfg, steps=C.saved_config(ckpt).get("steps", cfg.steps))
    if cfg.steps != planned.steps and done < cfg.steps:
        say(f"--steps {cfg.steps}: the run was planned for {planned.steps} steps; the cosine "
            f"decay is recomputed over {cfg.steps}, so the learning rate goes from "
            f"{lr_at(done - 1, planned):.3g} at step {done} to {lr_at(done, cfg):.3g} at step "
            f"{done + 1}, and reaches its floor at step {cfg.steps}")


def first_readable(candidates: list, read, world) -> tuple:
    """(index, read(path)) of the first checkpoint that every rank reads: one that cannot be read
    is passed over, saying so, for the complete checkpoint before it. A ConfigError is no damaged
    file: it stops the run. When none can be read, the newest's own one-line error (a damaged
    file named, with what to do) is the run's, where it has one."""
    newest = None                            # the first error met, the newest checkpoint's
    for i, path in enumerate(candidates):
        why = None
        try:
            result = read(path)
        except ConfigError:
            raise
        except Exception as e:               # NOTE: torch, zipfile and pickle raise many kinds
            why = f"{type(e).__name__}: {cli.first_line(e, 300)}"
            newest = newest or e
        if _all_ranks(why is None, world):
            return i, result
        world.say(f"cannot read checkpoint {path} ({why or 'on another rank'}); falling back to "
                  "the complete checkpoint before it")
    if isinstance(newest, ValueError):
        raise ConfigError(str(newest)) from None
    raise ConfigError(f"no checkpoint under {os.path.dirname(candidates[0])} can be read; "
                      "start a new run with another --out")


def _all_ranks(ok: bool, world) -> bool:
    """True on every rank if `ok` is true on every rank: one decision, so no rank is left
    waiting in a collective that the others skipped (and, as every rank takes part, a barrier)."""
    if world.world_size == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=world.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)              # COMM: world, min of one float
    return bool(flag.item())


# ---------------------------------------------------------------------------------------------
# 7. Measuring: the run described, peak FLOP/s for MFU, the CPU allocator, the curve, samples
# ---------------------------------------------------------------------------------------------

def describe_run(cfg: TrainConfig, args: M.ModelArgs, world, grid, dtype, global_batch) -> float:
    """Print the configuration, the model, the grid and the MFU formula; return the tokens/s at
    100% MFU."""
    peak_tps, formula = peak_tokens_per_s(args, cfg.seq_len, world.device, dtype, world.world_size)
    say = world.say
    say(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    say(f"model: {cfg.preset if not cfg.init_from else cfg.init_from} "
        f"{M.count_parameters(args):,} parameters, {json.dumps(dataclasses.asdict(args))}")
    say(f"grid: world {world.world_size} = pp {grid.pp} x dp {grid.dp} x tp {grid.tp}; global "
        f"batch {global_batch} sequences x {cfg.seq_len} = {global_batch * cfg.seq_len:,} "
        f"tokens in {cfg.micro_batches} micro-batches of {cfg.batch_size} per rank")
    say(formula)
    return peak_tps


_timed_peaks = {}                    # (device, dtype) -> the fastest timing so far, (FLOP/s, how)


def peak_flops(device: torch.device, dtype: torch.dtype, again: bool = False) -> tuple:
    """(FLOP/s, where it came from): a data-sheet figure on known GPUs, else a timed matmul.

    Timed once per process, and again when asked (again=True): the fastest timing so far stands.
    NOTE: on a shared machine one timing can be far off; the fastest of the large matmuls that
    fit in a third of a second (six at least) is the figure least disturbed by neighbours. A
    whole window can still be slowed (the demo once printed MFU 118%), so the training loop
    times it again when a step beats the peak.
    """
    known = device.type == "cuda" and M.data_sheet_peak(torch.cuda.get_device_name(device))
    if known:
        return known[1], f"{known[0]} data sheet, dense bf16"
    key = (str(device), dtype)
    if again or key not in _timed_peaks:
        n = 4096 if device.type == "cuda" else 1024
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        times, start = [], time.perf_counter()
        while len(times) < 6 or time.perf_counter() - start < 0.33:
            synchronize(device)
            t = time.perf_counter()
            a @ b
            synchronize(device)
            times.append(time.perf_counter() - t)
        timed = (2 * n ** 3 / min(times), f"fastest of {len(times)} timed {n}x{n} {dtype} matmuls")
        _timed_peaks[key] = max(_timed_peaks.get(key, timed), timed)
    return _timed_peaks[key]


def peak_tokens_per_s(args: M.ModelArgs, seq_len: int, device, dtype, devices: int = 1,
                      again: bool = False) -> tuple:
    """(tokens/s at 100% MFU, the formula in words): MFU = tokens/s * FLOP/token / (peak FLOP/s
    per device * devices), so MFU is tokens/s over the first number. again: peak_flops's."""
    flops_token = M.flops_per_token(args, seq_len)
    peak, source = peak_flops(device, dtype, again)
    return peak * devices / flops_token, (
        f"MFU = tokens/s * (6N + 12*L*D*T = {flops_token:,} FLOP/token, N without the input "
        f"embedding) / ({peak / 1e12:.2f} TFLOP/s peak per device [{source}] x {devices} "
        f"device{'s' if devices > 1 else ''})")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def keep_freed_memory() -> bool:
    """Let the memory of freed CPU tensors stay in the process for the next step (Linux, glibc).

    PERF: glibc's malloc gives large freed blocks back to the kernel: a block over its mmap
    threshold (at most 32 MiB) is unmapped when freed, and free memory at the top of the heap
    beyond the trim threshold is cut off. A training step frees its activations and allocates the
    same sizes again at the next one, so each step maps them afresh, and every 4 KiB page faults
    and is zeroed on its first write. At the shapes of tests/bench_cpu.py train that is 15,000 to
    25,000 faults a step (8,192 of them the 32 MiB of logits), 3-6% of our step, and 38,000 to
    41,000 in transformers' step, 7-15% of it. Raising both thresholds to 1 GiB keeps the blocks
    for reuse: no faults. The demo trains 3-5% faster. The process then keeps about its peak
    usage, which a run reaches at every step anyway. The simpler version is malloc's defaults;
    PyTorch's CPU tuning guide gets the same effect by preloading jemalloc or tcmalloc. GPU
    tensors need none of this: torch's CUDA caching allocator keeps its blocks already. Returns
    whether the thresholds were set.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt       # glibc only (not musl, macOS, Windows)
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3         # from glibc's <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def available_memory(device: torch.device) -> Optional[float]:
    """Bytes this process may still allocate on `device`, or None where it cannot be known: on
    CUDA the device's free memory; on CPU the least of the system's MemAvailable, the cgroup's
    limit less its usage (a container), and the address-space limit (ulimit -v) less this
    process's size."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    found = [_number("/proc/meminfo", "MemAvailable:")]
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        if (cap := _number(limit)) is not None and (used := _number(usage)) is not None:
            found.append(cap - used)
    address_space = resource.getrlimit(resource.RLIMIT_AS)[0]
    size = _number("/proc/self/status", "VmSize:")
    if address_space != resource.RLIM_INFINITY and size is not None:
        found.append(address_space - size)
    found = [x for x in found if x is not None]
    return min(found) if found else None


def _number(path: str, key: str = "") -> Optional[float]:
    """The number a /proc or /sys file holds (bytes), or the one after `key` (kB): None if the
    file is not there or holds no number ("max": no cgroup limit)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    if key:
        line = next((l for l in text.splitlines() if l.startswith(key)), "")
        return float(line.split()[1]) * 1024 if line else None
    return float(text) if text.strip().isdigit() else None


def plot_losses(metrics_path: str, png_path: str) -> Optional[str]:
    """The training and validation curves, where matplotlib is installed."""
    try:
        from matplotlib.figure import Figure     # no pyplot: no window, no global state
    except ImportError:
        return None
    rows = [json.loads(l) for l in open(metrics_path)]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for key, style, label in (("loss", "-", "train"), ("val_loss", "o-", "validation")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=label, lw=1)
    ax.set(xlabel="step", ylabel="loss (nats/token)")
    ax.legend()
    fig.savefig(png_path, dpi=100)
    return png_path


def print_samples(model, tokenizer, cfg: TrainConfig, say):
    prompts = ["def ", "import ", "The "][:cfg.samples]
    model.eval()
    texts = generate.generate(model, tokenizer, prompts, max_new_tokens=48, temperature=0.8,
                              top_p=0.95, seed=cfg.seed)
    for p, t in zip(prompts, texts):
        say(f"--- sample: {p!r}\n{p}{t}")


@contextlib.contextmanager
def stop_signals(say):
    """{"signal": None} while the loop runs, the number of SIGTERM or SIGINT once one arrives:
    honoured between steps, and between micro-batches (drop_step). The handlers are given back
    when the loop ends."""
    stop = {"signal": None}
    old = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum))
           for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        if sys.stdout.isatty():
            say()                                # ends the progress bar's line
        for s, h in old.items():
            signal.signal(s, h)


def step_start(sampler) -> tuple:
    """What a step about to begin may have to give back if it is dropped (drop_step): where the
    sampler stood, and torch's generators (no step draws from them today; one that did would
    draw again what it drew)."""
    return (sampler.state_dict(), torch.get_rng_state(),
            torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def stop_now(stop: dict, world) -> bool:
    """Whether a signal asks the run to stop, agreed by every rank (one rank's signal stops
    them all, and no rank waits in the all-reduce of a step the others dropped).
    PERF: under several processes, one all-reduce of a float per micro-batch: a host sync; one
    process asks only its own flag."""
    return stop["signal"] is not None if world.world_size == 1 else not _all_ranks(
        stop["signal"] is None, world)


def drop_step(step: int, before: tuple, sampler, optimizer, last_saved: int, save, say):
    """A stop between micro-batches: the unfinished step's gradients are dropped and the sampler
    and generators put back where the step began, so that the step finished last is saved as
    it was and a resumed run does this step again, exactly (tests/test_faults.py)."""
    sampler.load_state_dict(before[0])
    torch.set_rng_state(before[1])
    if before[2] is not None:
        torch.cuda.set_rng_state(before[2])
    optimizer.zero_grad(set_to_none=True)
    done = step - 1
    if done > last_saved:
        say(f"\nsignal received in step {step}: it is dropped; saving step {done} and stopping")
        save(done)
    elif done:
        say(f"\nsignal received in step {step}: it is dropped; step {done} is saved already; "
            "stopping")
    else:
        say("\nsignal received in step 1: it is dropped, and no step has finished, so there is "
            "nothing to save; run the same command again to start over")


# ---------------------------------------------------------------------------------------------
# 8. main
# ---------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    world = cfg = None
    try:
        cfg, given = parse_args(argv)
        check_flags(cfg)
        if cfg.resume and (found := C.checkpoints(cfg.out)):
            # The process group needs these before open_run restores the rest: a resumed run
            # keeps its own device and timeout unless the command line names them again.
            try:
                saved = saved_options(found[0])
            except ValueError:               # damaged: open_run passes over it, saying so
                saved = {}
            cfg = dataclasses.replace(cfg, **{k: saved[k] for k in ("device", "timeout")
                                              if k in saved and k not in given})
        world = P.init_distributed(device=cfg.device, timeout_s=cfg.timeout)
        return train(cfg, world, given)
    except SystemExit as e:                  # argparse's: a bad flag (not --help) would be
        if e.code and world is None:         # refused by every restart again
            P.stop_restarts()
        raise
    except (ValueError, OSError, RunStopped) as e:
        if world is None or world.is_main:
            print(f"error: {e}{advice(e, cfg)}", file=sys.stderr, flush=True)
        if not isinstance(e, OSError):       # a configuration (ConfigError is one), or a run
            P.stop_restarts()                # stopped by its numbers: every restart would fail
                                             # the same way (a restart resumes the same state)
        sys.exit(2 if isinstance(e, ValueError) else 1)
    except RuntimeError as e:
        if world is None and (line := cli.port_in_use(e, P.launcher()["master"])):
            sys.exit(line)                   # the rendezvous could not start: nothing ran
        if world is None or world.world_size == 1 or not P.is_collective_failure(e):
            raise
        # Every rank says it: the stuck or dead rank may be rank 0.
        print(f"error: rank {world.rank}: {cli.first_line(e, 200)}; a rank is stuck (more "
              f"than --timeout {cfg.timeout:g} s) or gone: see the other ranks' messages, then "
              "--resume", file=sys.stderr, flush=True)
        # NOTE: a group with a rank stuck or gone cannot be left cleanly: gloo's threads, still
        # waiting on that rank, can abort the process while it tears the group down (exit -6,
        # not 1). train()'s own cleanup has run; the process ends here, skipping `finally`.
        sys.stdout.flush()
        os._exit(1)
    finally:
        if world is not None:
            P.destroy(world)


def advice(e: BaseException, cfg: Optional[TrainConfig]) -> str:
    """What follows an error's line: "(then --resume continues the run)" only where a run has a
    checkpoint to continue from and the error may pass (a full disk, a failed write); for a
    permission error that names no fix, the fix."""
    if isinstance(e, PermissionError) and e.errno is not None:
        return f"; give your user access to {e.filename}, then run again"
    if not isinstance(e, OSError) or isinstance(e, (FileNotFoundError, PermissionError)):
        return ""
    try:
        resumable = cfg is not None and bool(C.checkpoints(cfg.out))
    except OSError:
        resumable = False
    return " (then --resume continues the run)" if resumable else ""


if __name__ == "__main__":
    main()
