"""
parallel.py -- tensor, sequence, data and pipeline parallelism for model.py's Transformer,
proven equal to one process.

model.py is the single-device reference and stays that way. This file takes a Transformer built
on every rank from the same seed and, in place, swaps its modules for sharded ones (a short
visible table, TP_PLAN): each rank of a tensor-parallel group holds one slice of the very same
full initialization. Every collective is a named call tagged with its group and direction, so
that `grep COMM: parallel.py` prints the communication schedule. Every parallel path degrades to
the plain one when its axis has size 1; one process is the default. What it all costs is
predicted in planner.py, which imports this file; this file imports model.py and checkpoint.py.

    torchrun --nproc_per_node=4 train.py --preset tiny --tp 2 --sp     # how it is used
    torchrun --nproc_per_node=4 train.py --pp 2 --virtual-stages 2 --micro-batches 4
    python -m pytest -q tests/test_parallel.py tests/test_pipeline.py  # proven equal to 1 process

Reading map
  1. The process grid       Dist, Grid, make_grid: a (pp, dp, tp) mesh, tp innermost
  2. Collectives            all_reduce, all_gather, reduce_scatter, blocking or async
  3. Conjugate operators    f, g [PTD-P] and their sequence-parallel forms f_sp, g_sp
  4. Parallel layers        column/row-parallel linears, the column backward overlapped (the
                            plain version beside it), vocab-parallel embedding, TP_PLAN
  5. The loss               vocabulary-parallel cross-entropy: full logits are never gathered
  6. Recomputation          none | selective | full: apply_recompute's table of what is kept
  7. Data parallelism       GradSync: naive all-reduce and overlapped Buckets, side by side
  8. Pipeline parallelism   schedules as warmup / steady 1F1B / cooldown; the exchange, drawn
  9. Clipping               the global norm, each parameter counted once
  ---------------------------------------------------------------------------- (the banner)
 10. Launching              torchrun's variables, the process group, NCCL's start-up, restarts
 11. Checks                 impossible splits refused in one line, before any work
 12. Checkpoints            Meta's shards (checkpoint.py's split); any tp x pp loads any other

One transformer block over tp = 2 ranks with sequence parallelism (sp). Column-parallel matrices
(wq wk wv w1 w3, output) are split by output rows, row-parallel ones (wo w2) by input columns:
Meta's split (checkpoint.shard_dim; the embedding is the one exception, VocabParallelEmbedding).

      residual (B, T/tp, D)                           wq (H*E, D)          wo (D, H*E)
        |  norm                                       +--------+           +----+----+
        |  f_sp: all-gather T  (fwd)                  | rank 0 |  heads    |    |    |
        |        reduce-scatter (bwd)                 +--------+  0..H/2   | r0 | r1 |
      (B, T, D) ---> wq wk wv (this rank's heads)     | rank 1 |  H/2..H   |    |    |
                     attention on H/tp, K/tp heads    +--------+           +----+----+
                     wo -> partial sums (B, T, D)     split dim 0          split dim 1
        |  g_sp: reduce-scatter T (fwd), all-gather (bwd)
      (B, T/tp, D) + residual                         same for the FFN: w1 w3 dim 0, w2 dim 1

Shape legend: B batch, T sequence, D model width, H query heads, K key/value heads, E head dim,
F FFN hidden, V vocab, N = B*T tokens; a split dimension carries its divisor, (B, T/tp, D).

Seed policy, stated once: tensor-parallel peers hold shards of one full initialization and
pipeline stages their layers of it (no result depends on tp or pp); dp replicas differ in data.

What this file leaves out: ZeRO/FSDP sharding of optimizer state; overlap of the forward's tp
collectives and of g_sp's backward all-gather (the column linears' backward alone overlaps);
gradient buckets that are views into one flat buffer (we copy). Decoding works under tp, not sp
(one new token cannot be split over T): parallelize with sp=False to generate. Of pipelining:
Megatron frees an activation once sent, splits it over tp to send it [PTD-P §4.1] and receives
it just in time; we keep it, send it whole without sp and receive it at the tick it is sent;
interleaving needs micro-batches in multiples of pp. Every rank builds the full model before it
keeps its slice and its stage.

Papers: Megatron-LM (arXiv 1909.08053), PTD-P (2104.04473), Korthikanti et al., "Reducing
Activation Recomputation in Large Transformer Models" (2205.05198), LLaMA (2302.13971) §2.4.
"""

import gc
import os
import signal
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from fnmatch import fnmatch
from functools import partial
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from checkpoint import merge_state_dicts, meta_weights, piece, shard_dim
from model import ModelArgs, Transformer, activation_dtype


# ---------------------------------------------------------------------------------------------
# 1. The process grid
# ---------------------------------------------------------------------------------------------

@dataclass
class Dist:
    """This process in the world: what torchrun told it, and the device it computes on. Made by
    init_distributed (section 10, below the banner), which joins the process group."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = 600.0        # how long a collective waits for its peers, in every group
    restart: int = 0                # torchrun's restart round: 0 first, then 1, 2... after failures

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def say(self, *args, **kwargs):
        """print, on rank 0 alone: what every rank knows is said once."""
        if self.is_main:
            print(*args, **kwargs)


@dataclass
class Grid:
    """The axes this rank sits on: sizes, its coordinate on each, and the group along each.

    A group is None when its axis has size 1 (nothing to talk to). pp_ranks: the global ranks of
    this rank's pipeline in stage order (pp_ranks[pp_rank] is this rank), for the point-to-point
    calls, which name their peer by global rank. Passed explicitly to everything that
    communicates; there is no global grid.
    """
    tp: int = 1
    dp: int = 1
    pp: int = 1
    tp_rank: int = 0
    dp_rank: int = 0
    pp_rank: int = 0
    tp_group: Any = None
    dp_group: Any = None
    pp_group: Any = None
    pp_ranks: tuple = (0,)


def make_grid(world: Dist, tp: int = 1, pp: int = 1) -> Grid:
    """Lay the world out as a (pp, dp, tp) mesh, tensor parallel innermost.

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank. Tensor parallelism talks twice per sub-layer
    in forward and twice in backward, on the critical path; consecutive ranks share a node (and
    NVLink), so tp goes innermost. Data parallelism talks once per step and overlaps with
    backward; pipeline parallelism sends one activation per micro-batch: both tolerate the
    slower links between nodes. Eight ranks, tp=2, dp=2, pp=2:

        tp groups [0 1] [2 3] [4 5] [6 7]    dp groups [0 2] [1 3] [4 6] [5 7]
        pp groups [0 4] [1 5] [2 6] [3 7]    (ranks 0-3 hold the first stage, 4-7 the second)
    """
    if tp < 1 or pp < 1:
        raise ValueError(f"tp={tp} and pp={pp} must be positive integers")
    if world.world_size % (tp * pp):
        raise ValueError(f"world size {world.world_size} is not divisible by tp*pp={tp * pp}; "
                         f"launch a multiple of {tp * pp} processes or change --tp/--pp")
    dp = world.world_size // (tp * pp)
    mesh = torch.arange(world.world_size).view(pp, dp, tp)        # the formula above, as a table
    pp_rank, dp_rank, tp_rank = (mesh == world.rank).nonzero()[0].tolist()

    def group_along(axis: int):
        # NOTE: new_group is collective: every rank creates every group, in the same order,
        # including the groups it is not a member of.
        size, mine = mesh.shape[axis], None
        if size == 1:
            return None
        for ranks in mesh.movedim(axis, -1).reshape(-1, size).tolist():
            group = dist.new_group(ranks, timeout=timedelta(seconds=world.timeout_s))
            if world.rank in ranks:
                mine = group
        return mine

    grid = Grid(tp, dp, pp, tp_rank, dp_rank, pp_rank, tp_group=group_along(2),
                dp_group=group_along(1), pp_group=group_along(0),
                pp_ranks=tuple(mesh[:, dp_rank, tp_rank].tolist()))
    start_groups(grid, world.device)                        # NCCL's start-up rule (section 10)
    return grid


# ---------------------------------------------------------------------------------------------
# 2. Collectives
# ---------------------------------------------------------------------------------------------
# The three calls below (and GradSync's asynchronous all-reduce) carry every byte of tensor and
# data parallelism. The tests count them by patching torch.distributed. With async_op=True each
# returns a Pending at once: its wait() blocks until the collective has landed and returns what
# the call would have returned, so that compute can run while the bytes travel.
#
# PERF: all-gather and reduce-scatter concatenate along dim 0; the sequence is dim 1 of our
# (B, T, D) activations, so each call copies twice, its input into (T, B, D) order and its
# result back (views, no copy, at B = 1). Megatron keeps activations (T, B, D) to avoid the
# copies; we keep model.py's layout.

@dataclass
class Pending:
    """A collective in flight, and how to read its result once it has landed."""
    work: Any
    result: Any                             # () -> the tensor the blocking call would return

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.result()


def all_reduce(x, group, op=dist.ReduceOp.SUM, async_op=False):
    """Sum (or max) of x over the group, in place; returns x."""
    work = dist.all_reduce(x, op=op, group=group, async_op=async_op)
    return Pending(work, lambda: x) if async_op else x


def all_gather(x, dim: int, group, async_op=False):
    """Concatenate every rank's x along dim: (.., n/tp, ..) -> (.., n, ..)."""
    size = dist.get_world_size(group)
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    work = dist.all_gather_single(out, x, group=group, async_op=async_op)
    result = lambda: out.movedim(0, dim).contiguous()
    return Pending(work, result) if async_op else result()


def reduce_scatter(x, dim: int, group, async_op=False):
    """Sum x over the group and keep this rank's slice of dim: (.., n, ..) -> (.., n/tp, ..)."""
    size = dist.get_world_size(group)
    if x.shape[dim] % size:
        raise ValueError(f"cannot scatter dim {dim} of size {x.shape[dim]} over {size} ranks; "
                         f"make it a multiple of {size}")
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    work = dist.reduce_scatter_single(out, x, group=group, async_op=async_op)
    result = lambda: out.movedim(0, dim).contiguous()
    return Pending(work, result) if async_op else result()


# ---------------------------------------------------------------------------------------------
# 3. Conjugate operators
# ---------------------------------------------------------------------------------------------
# PAPER: f and g are conjugate: what one does forward, the other does backward [PTD-P §2.3,
# Fig. 5]. A tensor-parallel region opens with f and closes with g. Under sequence parallelism
# they become f_sp and g_sp, which Korthikanti calls g and g-bar [Korthikanti §4.2.2, Fig. 5];
# we name them after the side of the region they sit on. Each all-reduce becomes an all-gather
# and a reduce-scatter: the same bytes, and the residual stream, its norms and what they save
# split along T, a tp-th of the activation memory. f and f_sp enter a region in the plain
# version; the overlapped one does their work inside the column linears (section 4).

class f(torch.autograd.Function):
    """Identity forward; all-reduce of the input gradient over tp backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        # COMM: tp all-reduce, backward (f, plain)
        return all_reduce(dy.clone(), ctx.group), None


class g(torch.autograd.Function):
    """All-reduce over tp forward (sums the partial outputs); identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.clone(), group)                      # COMM: tp all-reduce, forward (g)

    @staticmethod
    def backward(ctx, dy):
        return dy, None


class f_sp(torch.autograd.Function):
    """All-gather along T forward, (B, T/tp, D) -> (B, T, D); reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        # COMM: tp all-gather, forward (f_sp, plain)
        return all_gather(x, 1, group)

    @staticmethod
    def backward(ctx, dy):
        # COMM: tp reduce-scatter, backward (f_sp, plain)
        return reduce_scatter(dy, 1, ctx.group), None


class g_sp(torch.autograd.Function):
    """Reduce-scatter along T forward, (B, T, D) partial -> (B, T/tp, D) summed; all-gather back."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        # COMM: tp reduce-scatter, forward (g_sp)
        return reduce_scatter(x, 1, group)

    @staticmethod
    def backward(ctx, dy):
        # COMM: tp all-gather, backward (g_sp)
        return all_gather(dy, 1, ctx.group), None


# ---------------------------------------------------------------------------------------------
# 4. Parallel layers
# ---------------------------------------------------------------------------------------------

def shard(full: torch.Tensor, dim: int, grid: Grid) -> torch.Tensor:
    """This tp rank's slice of a full tensor along dim (a copy, so the full one can be freed)."""
    return piece(full.detach(), dim, grid.tp, grid.tp_rank).clone()


class Region:
    """Where one module's input enters tensor-parallel work and where its output leaves it.

    Installed as a forward pre-hook (enter) and a forward hook (leave: g, or g_sp, if its output
    is a partial sum: `leaves`) on an unchanged model.py module, so the module's own forward and
    its state_dict keys stay as they are. Several column-parallel linears read the one entered
    input (wq wk wv, or w1 w3): their input is gathered, and its gradient reduced, once per
    module. Two versions of the entry, side by side (tests prove them equal):

      plain       enter through f (f_sp under sp); each column linear is a plain product. The
                  linears' input gradients meet in autograd, then f's backward reduces them:
                  the wire waits for every product, then the products wait for the wire.
      overlapped  (tp_overlap) the region's column linears run as one ColumnParallelLinears,
                  which communicates itself, its backward's products computed while the bytes
                  travel. The module still calls its linears one by one: the first call of a
                  forward computes them all, the others take their output.
    """

    def __init__(self, grid: Grid, sp: bool, leaves: bool, overlap: bool = True):
        self.group, self.sp, self.leaves, self.overlap = grid.tp_group, sp, leaves, overlap
        self.linears = []              # its ColumnParallelLinears, in order
        self.outputs = None            # overlapped: (this forward's input, one output per linear)

    def enter(self, module, args):
        self.outputs = None
        if not self.overlap:
            return ((f_sp if self.sp else f).apply(args[0], self.group), *args[1:])

    def leave(self, module, args, out):
        self.outputs = None
        return (g_sp if self.sp else g).apply(out, self.group) if self.leaves else out

    def linear(self, x, i: int):
        """Column linear i of this region on the entered x (its T/tp shard, overlapped with sp)."""
        if not self.overlap:
            return F.linear(x, self.linears[i].weight)
        if self.outputs is None or self.outputs[0] is not x:     # the first of this input's
            weights = [linear.weight for linear in self.linears]
            self.outputs = x, ColumnParallelLinears.apply(x, self.group, self.sp, *weights)
        return self.outputs[1][i]


class ColumnParallelLinears(torch.autograd.Function):
    """The column-parallel linears of one region, y_i = x W_i^T, doing f's (or f_sp's)
    communication themselves so that it overlaps their backward's products. Megatron's
    asynchronous input-gradient all-reduce [Megatron-LM's column linear; LLaMA §2.4]:

      forward   x: (B, T, D), or under sp this rank's (B, T/tp, D), gathered first; saved as it
                came, so under sp the shard: the memory saving of sp, all of it [Korthikanti
                §4.2.2], where the plain version saves the gathered input
      backward  no sp   start the all-reduce of dx = sum_i dy_i W_i | dW_i = dy_i^T x | wait
                sp      start the all-gather of x | dx                                  | wait
                        start the reduce-scatter of dx              | dW_i = dy_i^T x  | wait

    One function for all of a region's linears, so that the one reduction of their summed
    input gradient travels while every weight gradient of the region is computed.
    """

    @staticmethod
    def forward(ctx, x, group, sp, *weights):
        ctx.group, ctx.sp = group, sp
        ctx.save_for_backward(x, *weights)
        # COMM: tp all-gather, forward (sp; f_sp's forward, in the column layer)
        full = all_gather(x, 1, group) if sp else x                    # (B, T, D)
        return tuple(F.linear(full, w) for w in weights)                # autocast applies

    @staticmethod
    def backward(ctx, *dys):
        # NOTE: the backward may run outside the forward's autocast (it does on CPU): the
        # matmuls run in dy's dtype explicitly, as autograd does for an autocast forward.
        x, *weights = ctx.saved_tensors
        group, dtype = ctx.group, dys[0].dtype
        if ctx.sp:
            # COMM: tp all-gather of the kept shard, backward, async: travels while dx is computed
            gathering = all_gather(x, 1, group, async_op=True)
        dx = sum(dy @ w.to(dtype) for dy, w in zip(dys, weights))      # (B, T, D), partial
        full = gathering.wait() if ctx.sp else x                        # (B, T, D)
        # COMM: tp reduce-scatter (sp) or all-reduce (f's) of dx, backward, async: travels
        # while the weight gradients are computed
        reducing = (reduce_scatter(dx, 1, group, async_op=True) if ctx.sp
                    else all_reduce(dx, group, async_op=True))
        full = full.flatten(0, -2).to(dtype)                            # (B*T, D)
        dws = [(dy.flatten(0, -2).t() @ full).to(w.dtype) for dy, w in zip(dys, weights)]
        dx = reducing.wait()                                # (B, T, D), or (B, T/tp, D) with sp
        return dx.to(x.dtype), None, None, *dws


class ColumnParallelLinear(nn.Module):
    """A Linear whose output features (rows of W) are split: y_r = x W_r^T, (.., out/tp).

    It reads the input of its region and leaves its output split (heads, FFN columns,
    vocabulary); it computes through its region, which knows which version runs.
    """

    def __init__(self, full: nn.Linear, grid: Grid, region: Region):
        super().__init__()
        self.weight = nn.Parameter(shard(full.weight, 0, grid))  # (out/tp, in)
        self.region, self.index = region, len(region.linears)
        region.linears.append(self)

    def forward(self, x):
        return self.region.linear(x, self.index)


class RowParallelLinear(nn.Module):
    """A Linear whose input features (columns of W) are split: y = sum_r x_r W_r^T.

    Each rank computes one term of the sum, a partial (B, T, D); the region's exit (g or g_sp)
    adds the terms. Input split = the previous column-parallel output: no communication between.
    """

    def __init__(self, full: nn.Linear, grid: Grid):
        super().__init__()
        self.weight = nn.Parameter(shard(full.weight, 1, grid))  # (out, in/tp)

    def forward(self, x):
        return F.linear(x, self.weight)                          # (B, T, D), partial sum


class VocabParallelEmbedding(nn.Module):
    """The embedding table split by vocabulary rows; each rank looks up the tokens it owns.

    A rank holds rows [start, start + V/tp); other tokens get zero vectors, so the per-rank
    answers are partial sums, which its region's exit adds: g, or under sp g_sp, which also keeps
    this rank's T/tp positions, where the residual stream starts. NOTE: Meta's files split this
    table by width (dim 1). We split rows, as Megatron does: the answers are then partial sums
    closed like every region's, where a width split needs an all-gather along D (and, under sp, a
    reshuffle from a D split to a T split). shard_state_dict converts to Meta's split;
    load_sharded slices rows.
    """

    def __init__(self, full: nn.Embedding, grid: Grid):
        super().__init__()
        self.weight = nn.Parameter(shard(full.weight, 0, grid))  # (V/tp, D)
        self.start = grid.tp_rank * self.weight.shape[0]

    def forward(self, tokens):
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        h = h.masked_fill(outside[..., None], 0.0)               # (B, T, D), partial
        return h.to(activation_dtype(h.device, h.dtype))         # bf16 on the wire under autocast


# The swap table: which module of model.py's Transformer becomes which, and under it, which
# Linear becomes which. Read it with the sketch in the docstring. Column = split by output rows
# (dim 0: heads, FFN columns, vocabulary); row = split by input columns (dim 1). Each entry is a
# Region: its input enters through f (f_sp) if it holds column-parallel linears, which need all
# of it; its output leaves through g (g_sp) if it is a partial sum, row-parallel or embedding.
TP_PLAN = {
    "tok_embeddings":        VocabParallelEmbedding,     # rows (vocab); token ids enter as they are
    "layers.*.attention":    {"wq": ColumnParallelLinear, "wk": ColumnParallelLinear,
                              "wv": ColumnParallelLinear, "wo": RowParallelLinear},
    "layers.*.feed_forward": {"w1": ColumnParallelLinear, "w3": ColumnParallelLinear,
                              "w2": RowParallelLinear},
    "output":                ColumnParallelLinear,       # vocab; logits stay split, (B, T, V/tp)
}


def parallelize(model: Transformer, grid: Grid, sp: bool = False,
                tp_overlap: bool = True) -> Transformer:
    """Swap model's modules for their tensor-parallel shards, in place, following TP_PLAN.

    model must be the full model, built identically on every rank (same seed). Build the
    optimizer after this call: the parameters are new objects. A no-op at tp=1 (sp included).
    tp_overlap: the column linears' backward communication overlapped with their products
    (ColumnParallelLinears); False: the plain version, f and f_sp (Region).
    Sets two attributes on the model, which other files read (a model never parallelized has
    neither: read them as getattr(model, "grid", None)):
      model.grid                 the Grid it is split over (generate.py gathers logits over tp)
      model.sequence_parallel    sp and tp > 1: the residual stream is (B, T/tp, D) (GradSync
                                 sums the norms' gradients over tp, PipelineStage sends T/tp)
    """
    check_config(model.args, grid.tp, sp)
    if getattr(model, "grid", None) is not None:
        raise ValueError("this model is already parallelized; build a fresh one")
    model.grid, model.sequence_parallel = grid, sp and grid.tp > 1
    if grid.tp == 1:
        return model
    for pattern, swaps in TP_PLAN.items():
        swaps = swaps if isinstance(swaps, dict) else {"": swaps}    # "": the module itself
        kinds = set(swaps.values())
        leaves = bool(kinds & {RowParallelLinear, VocabParallelEmbedding})    # partial sums
        for name in [name for name, _ in model.named_modules() if fnmatch(name, pattern)]:
            region = Region(grid, sp, leaves, tp_overlap)
            for child, cls in swaps.items():
                path = f"{name}.{child}" if child else name
                full = model.get_submodule(path)
                model.set_submodule(path, cls(full, grid, region) if cls is ColumnParallelLinear
                                    else cls(full, grid))
            module = model.get_submodule(name)
            if ColumnParallelLinear in kinds:                    # they need the whole input
                module.register_forward_pre_hook(region.enter)
            module.register_forward_hook(region.leave)
    return model


# ---------------------------------------------------------------------------------------------
# 5. The loss
# ---------------------------------------------------------------------------------------------

class CrossEntropy(torch.autograd.Function):
    """Cross-entropy per token from logits split over the vocabulary, (N, V/tp) -> (N,).

    loss = log sum_v exp(z_v) - z_target needs, from all ranks, only three numbers per token: the
    max (for a stable exp), the sum of exponentials, and the target's logit, which lives on one
    rank. Three all-reduces of N floats instead of an all-gather of N*V. The gradient is local:
    softmax(z) - onehot(target), this rank's columns of it. At tp = 1 (group None) the same
    lines run with nothing to reduce.

    A target equal to IGNORE_INDEX (-100, F.cross_entropy's) is a position without a target
    (padding; a prompt that a fine-tuning run does not learn): its loss is 0, its gradient 0,
    and loss_fn leaves it out of the count.

    PERF: the forward writes exp(z - max) over the logits, and the backward scales that into
    the gradient in place. F.cross_entropy, the simpler version, keeps log_softmax(z) and builds
    a zeroed N x V gradient besides: two more N x V tensors a step (at 2048 tokens, 32 MiB each
    at vocab 4096, 250 MiB at 32000). On CPU the passes over the logits go by blocks of 2^18
    values, which stay in cache. The output layer, the loss and their backward at that size
    take 64 ms against 92 under malloc's defaults, which page every new tensor in afresh, and
    55-58 ms against 56-58 with freed memory kept (train.keep_freed_memory). On a GPU one
    block, one launch per pass.
    NOTE: so the logits must not be read once the loss is taken. The forward marks the tensor
    it writes over (`overwritten_by_loss`), and a second loss of the same logits raises.
    """

    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start):
        def reduce(x, op=dist.ReduceOp.SUM):
            return x if group is None else all_reduce(x, group, op)

        owner = logits if logits._base is None else logits._base     # whose memory is written
        if getattr(owner, "overwritten_by_loss", False):
            raise RuntimeError("these logits were overwritten by an earlier loss; compute them "
                               "again, or give the first loss logits.clone()")
        owner.overwritten_by_loss = True
        N, n_local = logits.shape
        rows = max(1, 2**18 // n_local) if logits.device.type == "cpu" else N
        local, counted = targets - vocab_start, targets != IGNORE_INDEX
        mine = (local >= 0) & (local < n_local)
        local = local.clamp(0, n_local - 1)
        z_mine = logits.gather(1, local[:, None]).squeeze(1) * mine   # read before overwritten
        # COMM: tp all-reduce (max), forward
        zmax = reduce(logits.amax(-1), dist.ReduceOp.MAX)                  # (N,)
        e = logits                                      # NOTE: in place, see the docstring
        sum_exp = torch.cat([e[i:i + rows].sub_(zmax[i:i + rows, None]).exp_().sum(-1)
                             for i in range(0, N, rows)])    # (N,); e now holds exp(z - zmax)
        # COMM: tp all-reduce (sum exp), forward
        sum_exp = reduce(sum_exp)                                           # (N,)
        # COMM: tp all-reduce (target logit), forward
        z_target = reduce(z_mine)
        ctx.save_for_backward(e, sum_exp, local, mine, counted)
        loss = zmax + sum_exp.log() - z_target             # log sum_v exp(z_v) - z_target, (N,)
        return loss.where(counted, 0.0)                 # 0 at an ignored position

    @staticmethod
    def backward(ctx, dloss):
        e, sum_exp, local, mine, counted = ctx.saved_tensors
        dloss = dloss.where(counted, 0.0)               # an ignored position: no gradient
        dz = e.mul_((dloss / sum_exp)[:, None])         # softmax(z) * dloss, in place
        dz.scatter_add_(1, local[:, None], -(dloss * mine)[:, None])
        return dz, None, None, None


IGNORE_INDEX = -100


def loss_fn(logits, targets, grid: Grid):
    """Mean cross-entropy over the B*T positions whose target is not IGNORE_INDEX. logits
    (B, T, V) at tp=1, (B, T, V/tp) beyond. It overwrites the logits: with exponentials, then
    with their gradient (CrossEntropy). NOTE: gradient accumulation (train.py, pipeline_step)
    and data parallelism average these means, which is one pass's mean when every micro-batch
    counts as many targets: pretraining's windows all do, a batch with ignored targets may not."""
    logits, targets = logits.flatten(0, 1), targets.flatten()
    group = grid.tp_group if grid.tp > 1 else None
    losses = CrossEntropy.apply(logits, targets, group, grid.tp_rank * logits.shape[-1])  # (N,)
    return losses.sum() / (targets != IGNORE_INDEX).sum()


# ---------------------------------------------------------------------------------------------
# 6. Recomputation
# ---------------------------------------------------------------------------------------------

class Recompute(torch.autograd.Function):
    """Run fn keeping only its tensor inputs; run it again in backward to differentiate it.

    The RNG state (CPU, and the device's) is recorded before the forward run and restored for the
    second one, so a dropout inside fn draws the same mask twice; the caller's RNG stream is left
    where it was. The autocast state of the forward is re-entered too.
    """

    @staticmethod
    def forward(ctx, fn, *args):
        ctx.fn, ctx.is_tensor = fn, [torch.is_tensor(a) for a in args]
        ctx.others = [None if t else a for a, t in zip(args, ctx.is_tensor)]
        ctx.save_for_backward(*[a for a in args if torch.is_tensor(a)])
        device = next(a.device for a in args if torch.is_tensor(a))
        ctx.cuda = device if device.type == "cuda" else None
        ctx.rng = (torch.get_rng_state(), ctx.cuda and torch.cuda.get_rng_state(ctx.cuda))
        ctx.amp = (device.type, torch.is_autocast_enabled(device.type),
                   torch.get_autocast_dtype(device.type))
        return fn(*args)                                         # grad is off inside forward

    @staticmethod
    def backward(ctx, *grads):
        saved = iter(t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors)
        args = [next(saved) if t else a for a, t in zip(ctx.others, ctx.is_tensor)]
        device_type, amp_on, amp_dtype = ctx.amp
        with torch.random.fork_rng(devices=[ctx.cuda] if ctx.cuda else []), torch.enable_grad(), \
                torch.autocast(device_type, dtype=amp_dtype, enabled=amp_on):
            torch.set_rng_state(ctx.rng[0])
            if ctx.cuda:
                torch.cuda.set_rng_state(ctx.rng[1], ctx.cuda)
            out = ctx.fn(*args)
        torch.autograd.backward(out, grads)
        return (None, *[a.grad if t and a.requires_grad else None
                        for a, t in zip(args, ctx.is_tensor)])


RECOMPUTE_MODES = ("none", "selective", "full")


def apply_recompute(model: Transformer, mode: str) -> None:
    """Trade compute for activation memory [Korthikanti §5, LLaMA §2.4]. The one place that says
    what autograd keeps of a layer from its forward to its backward, and what it recomputes:

      mode       kept, per layer                             recomputed in backward
      none       what each op saves: per norm its input,     nothing
                 output and 1/rms; the column linears'
                 input y (its T/tp shard under sp); q k v;
                 SDPA's output (wo's input) and log-sum-exp
                 (the T x T scores under the math backend);
                 a = w1 y, b = w3 y, silu(a), silu(a) * b
      selective  none's, less the log-sum-exp (or scores),   the core softmax(q k^T / sqrt(E)) v
                 silu(a) and silu(a) * b; k and v at their   from q k v; silu(a) and silu(a) * b
                 K heads                                     from a and b (model.SwiGLUFunction)
      full       the block's input x, (B, T, D), or          the whole block, its tp collectives
                 (B, T/tp, D) under sp                       included: one more forward pass

    Selective runs no matmul with a weight twice. planner.activation_bytes_per_layer counts each
    row's bytes (tested equal to what autograd saves). apply_recompute is the one writer of
    FeedForward.manual_backward, on for selective alone. Works at any tp, on a Transformer or a
    PipelineStage (whose layers are keyed by number). It wraps methods in place, so once: it
    sets model.recompute = mode and refuses a second call.
    """
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute mode {mode!r} is unknown; choose none, selective or full")
    if getattr(model, "recompute", None) is not None:
        raise ValueError(f"recompute {model.recompute!r} is already applied to this model; "
                         "apply one mode, once, to a fresh model")
    model.recompute = mode
    for layer in model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers:
        layer.feed_forward.manual_backward = mode == "selective"
        if mode == "selective":
            layer.attention.core = partial(Recompute.apply, layer.attention.core)
        if mode == "full":
            layer.forward = partial(Recompute.apply, layer.forward)


# ---------------------------------------------------------------------------------------------
# 7. Data parallelism
# ---------------------------------------------------------------------------------------------

def make_buckets(numels: list, bucket_bytes: float, bytes_per_el: int) -> list:
    """Group consecutive parameters (indices into numels) into buckets of about bucket_bytes."""
    buckets, size = [[]], 0
    for i, n in enumerate(numels):
        if buckets[-1] and size + n * bytes_per_el > bucket_bytes:
            buckets, size = buckets + [[]], 0
        buckets[-1].append(i)
        size += n * bytes_per_el
    return [b for b in buckets if b]


@dataclass
class Bucket:
    """Parameters whose gradients travel in one all-reduce, and that all-reduce's progress."""
    params: list
    waiting: int                            # gradients still to arrive this step
    flat: Optional[torch.Tensor] = None     # the gradients, concatenated, once launched
    work: Any = None                        # the asynchronous all-reduce, once launched

    def launch(self, group):
        self.flat = torch.cat([_grad(p).flatten() for p in self.params])
        # COMM: dp all-reduce, async during backward (bucketed)
        self.work = dist.all_reduce(self.flat, group=group, async_op=True)

    def land(self, dp: int):
        """Wait for the all-reduce, leave the dp-mean in each .grad, and reset for the next step."""
        self.work.wait()
        _copy_back(self.params, self.flat.div_(dp))
        self.waiting, self.flat, self.work = len(self.params), None, None


class GradSync:
    """Data-parallel gradient averaging, two versions side by side (tests prove them equal).

    naive (overlap=False): after backward, one all-reduce per parameter. Simple; the wire is idle
      during backward and the compute idle during the all-reduces.
    bucketed (overlap=True): parameters are grouped, in reverse order of definition (roughly the
      order backward produces their gradients), into Buckets of bucket_mb. A hook fires when a
      parameter's gradient is complete; when a bucket's last gradient arrives, its asynchronous
      all-reduce is launched while backward goes on with the layers below. finish() waits once.
      [PTD-P §2.1; LLaMA §2.4: "overlap the computation of activations and the communication"]

    Per optimizer step: `with sync.no_sync():` around every micro-batch but the last (gradients
    accumulate locally, no communication), then the last one, then `sync.finish()` (also on a
    step whose update is then skipped). As in DDP, a backward is local when its forward ran
    inside no_sync(), so the context may hold the forward alone or forward and backward. After
    it every dp rank holds the dp-mean gradient. Under sp finish() also sums the norm weights'
    gradients over tp: each rank saw only T/tp positions. One GradSync per model, kept while the
    model trains: its hooks stay on the parameters, and hold it weakly.
    """

    def __init__(self, model, grid: Grid, bucket_mb: float = 25.0, overlap: bool = True):
        self.grid, self.overlap, self.syncing, self.sync_backward = grid, overlap, True, True
        self.params = [p for p in model.parameters() if p.requires_grad]
        sp = getattr(model, "sequence_parallel", False)                  # set by parallelize()
        self.tp_partial = [p for name, p in model.named_parameters()
                           if sp and shard_dim(name) is None]
        self.buckets, self.bucket_of = [], {}
        if grid.dp > 1 and overlap:
            order = self.params[::-1]                            # about the order of backward
            sizes, el = [p.numel() for p in order], self.params[0].element_size()
            self.buckets = [Bucket([order[i] for i in bucket], len(bucket))
                            for bucket in make_buckets(sizes, bucket_mb * 2**20, el)]
            self.bucket_of = {p: bucket for bucket in self.buckets for p in bucket.params}
            # NOTE: the hooks hold this object weakly. A parameter holding it strongly would make
            # a cycle through a tensor, which Python's collector cannot free: the model, and the
            # process groups, would live until interpreter exit, after the process group is
            # destroyed, where a live gloo group can abort a finished run (exit -6).
            me = weakref.proxy(self)
            for p in self.params:
                p.register_post_accumulate_grad_hook(partial(GradSync._grad_ready, me))
            model.register_forward_pre_hook(partial(GradSync._forward_starts, me))

    @contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def _forward_starts(self, model, args):
        self.sync_backward = self.syncing                        # decided here, as DDP does

    def _grad_ready(self, p):
        if not (self.syncing and self.sync_backward):
            return
        bucket = self.bucket_of[p]
        if bucket.work is not None:
            raise RuntimeError("a gradient arrived for a bucket already sent: call "
                               "GradSync.finish() after each step's last backward")
        bucket.waiting -= 1
        if bucket.waiting == 0:
            bucket.launch(self.grid.dp_group)

    def finish(self) -> None:
        grid = self.grid
        for bucket in self.buckets:                              # bucketed (none when naive)
            if bucket.work is None:                              # a parameter got no gradient
                bucket.launch(grid.dp_group)
        for bucket in self.buckets:
            bucket.land(grid.dp)
        if grid.dp > 1 and not self.overlap:
            for p in self.params:
                # COMM: dp all-reduce, after backward (naive)
                all_reduce(_grad(p), grid.dp_group).div_(grid.dp)
        if self.tp_partial:
            flat = torch.cat([_grad(p).flatten() for p in self.tp_partial])
            # COMM: tp all-reduce, norm weight grads (sp), after backward
            _copy_back(self.tp_partial, all_reduce(flat, grid.tp_group))


def _grad(p):
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def _copy_back(params, flat):
    """Each parameter's slice of a flat tensor of their concatenated gradients, into its .grad."""
    for p, g_ in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g_.view_as(p))


# ---------------------------------------------------------------------------------------------
# 8. Pipeline parallelism
# ---------------------------------------------------------------------------------------------
# PAPER: the layers are cut into pp * v chunks of consecutive layers; pipeline rank r holds chunks
# r, r + pp, r + 2 pp, ... (v "virtual stages" per rank) [PTD-P §2.2]. Chunk 0 begins with the
# embedding, the last chunk ends with the final norm, the output and the loss. A step's batch is
# cut into m micro-batches; an activation crosses to the next chunk's rank with a point-to-point
# send, its gradient comes back with another. The order of each rank (schedule_order) fixes
# when every op runs (play) and so when every message travels (messages); every rank computes
# all three for every rank, so each knows what its peers send, and when, without a message.

PIPELINE_SCHEDULES = ("afab", "1f1b", "interleaved")


def default_schedule(virtual_stages: int) -> str:
    return "interleaved" if virtual_stages > 1 else "1f1b"


def schedule_order(schedule: str, pp: int, micro_batches: int, virtual_stages: int = 1,
                   rank: int = 0) -> list:
    """The (op, micro-batch, chunk) a pipeline rank runs, in order: op "F" or "B", chunk 0..v-1.

    Every schedule has the paper's three phases [PTD-P §2.2]: a warmup of forwards alone; a
    steady state of one forward, then one backward; a cooldown of the backwards left. Only the
    warmup's length differs. Below, pp = 4 and m = 4, each op drawn at the tick `play` runs it
    (a test holds these drawings to the code); in the last one each rank has v = 2 chunks of
    half the layers, F for chunk 0 and f for chunk 1:

    afab, all forwards then all backwards (GPipe): warmup = m, no steady state. Bubble (pp-1)/m;
    m micro-batches in flight.
      rank 0  F0 F1 F2 F3                   B0 B1 B2 B3
      rank 1     F0 F1 F2 F3             B0 B1 B2 B3
      rank 2        F0 F1 F2 F3       B0 B1 B2 B3
      rank 3           F0 F1 F2 F3 B0 B1 B2 B3
    1f1b: warmup = pp - 1 - rank. The same bubble, but at most pp - rank micro-batches in flight
    whatever m: the backward of micro-batch i frees its activations before i + pp starts.
      rank 0  F0 F1 F2 F3          B0    B1    B2    B3
      rank 1     F0 F1 F2       B0 F3 B1    B2    B3
      rank 2        F0 F1    B0 F2 B1 F3 B2    B3
      rank 3           F0 B0 F1 B1 F2 B2 F3 B3
    interleaved 1f1b: micro-batches go through chunk 0 in groups of pp, then through chunk 1...
    warmup = 2 (pp - 1 - rank) + (v - 1) pp: micro-batch 0 must reach the last chunk, and its
    gradient travel back, before this rank's first backward. Bubble (pp-1)/(v m), for v times
    the point-to-point messages [PTD-P §2.2.2, Fig. 4].
      rank 0  F0 F1 F2 F3 f0 f1 f2 f3          b0    b1    b2    b3 B0 B1 B2 B3
      rank 1     F0 F1 F2 F3 f0 f1 f2 f3    b0    b1    b2    b3 B0 B1 B2 B3
      rank 2        F0 F1 F2 F3 f0 f1 f2 b0 f3 b1    b2    b3 B0 B1 B2 B3
      rank 3           F0 F1 F2 F3 f0 b0 f1 b1 f2 b2 f3 b3 B0 B1 B2 B3
    """
    m, v = micro_batches, virtual_stages
    # The forwards in the order a rank runs them: groups of pp micro-batches (a last one may be
    # shorter) through chunk 0, the same group through chunk 1, ...; one chunk: one by one. The
    # backwards in that same order, chunks reversed.
    forwards = [(g + i, k) for g in range(0, m, pp) for k in range(v)
                for i in range(min(pp, m - g))]
    backwards = iter([(i, v - 1 - k) for i, k in forwards])
    forwards, order = iter(forwards), []
    warmup = min(m * v, {"afab": m * v, "1f1b": pp - 1 - rank,
                         "interleaved": 2 * (pp - 1 - rank) + (v - 1) * pp}[schedule])
    for _ in range(warmup):                                         # 1. warmup
        order.append(("F", *next(forwards)))
    for _ in range(m * v - warmup):                                 # 2. steady: 1F1B
        order += [("F", *next(forwards)), ("B", *next(backwards))]
    for _ in range(warmup):                                         # 3. cooldown
        order.append(("B", *next(backwards)))
    return order


def play(orders: list, pp: int, virtual_stages: int = 1) -> list:
    """When each op of every rank's order runs, in ticks of one op: per rank, [(tick, op,
    micro-batch, chunk), ...]. An op runs at the first tick after the op whose output it reads
    has run: a forward after the forward of the chunk before (chunk 0 reads tokens), a backward
    after the backward of the chunk after (the last chunk's reads its own loss). A schedule that
    deadlocks raises."""
    last, todo, done = pp * virtual_stages - 1, [list(order) for order in orders], set()
    ticks, tick = [[] for _ in orders], 0

    def ready(r, op, i, k):
        c = k * pp + r
        return (op, c) in (("F", 0), ("B", last)) or (op, i, c - 1 if op == "F" else c + 1) in done

    while any(todo):
        now = [(r, todo[r].pop(0)) for r in range(pp) if todo[r] and ready(r, *todo[r][0])]
        if not now:
            raise RuntimeError(f"the schedule deadlocks at pp={pp}, v={virtual_stages}")
        for r, (op, i, k) in now:
            ticks[r].append((tick, op, i, k))
            done.add((op, i, k * pp + r))
        tick += 1
    return ticks


def messages(ticks: list, pp: int, virtual_stages: int = 1) -> dict:
    """What travels after each tick: {tick: [(from, to, message), ...]}, pipeline ranks. A
    forward sends its output to the next chunk's rank, a backward its input's gradient to the
    previous chunk's. A message names the op that reads it: ("F", i, c) is the activation that
    chunk c's forward of micro-batch i reads, ("B", i, c) the gradient its backward reads."""
    last, sent = pp * virtual_stages - 1, {}
    for r, row in enumerate(ticks):
        for t, op, i, k in row:
            c = k * pp + r
            if op == "F" and c < last:
                sent.setdefault(t, []).append((r, (r + 1) % pp, ("F", i, c + 1)))
            if op == "B" and c > 0:
                sent.setdefault(t, []).append((r, (r - 1) % pp, ("B", i, c - 1)))
    return sent


def in_flight(schedule: str, pp: int, micro_batches: int, virtual_stages: int = 1,
              rank: int = 0, sizes: Optional[list] = None):
    """The most chunk-forwards a rank holds at once, waiting for their backward; sizes[k], when
    given, weighs chunk k (its bytes, say)."""
    held = most = 0
    for op, _, k in schedule_order(schedule, pp, micro_batches, virtual_stages, rank):
        held += (1 if sizes is None else sizes[k]) * (1 if op == "F" else -1)
        most = max(most, held)
    return most


class PipelineStage(nn.Module):
    """One pipeline rank's chunks of a Transformer, its state_dict keys still Meta's.

    Made from a full (possibly tensor-parallel) model built on every rank: keeps layers of its
    chunks under their global numbers (`layers.13.attention.wq.weight`), the embedding on rank 0,
    the final norm and output on the last rank, and drops the rest. forward(x, chunk) runs one
    chunk: tokens (B, T) in for chunk 0, else the residual stream (B, T, D), or (B, T/tp, D)
    under sp; logits out of the last chunk, the residual stream out of the others. Like a
    parallelized Transformer it carries `grid` and `sequence_parallel` (GradSync reads it).
    """

    def __init__(self, model: Transformer, grid: Grid, virtual_stages: int = 1):
        super().__init__()
        pp, r, v = grid.pp, grid.pp_rank, virtual_stages
        check_pipeline(model.args.n_layers, pp, v)
        self.args, self.grid, self.virtual_stages = model.args, grid, v
        self.sequence_parallel = getattr(model, "sequence_parallel", False)
        n = model.args.n_layers // (pp * v)                     # layers per chunk
        self.chunks = [range((k * pp + r) * n, (k * pp + r + 1) * n) for k in range(v)]
        self.tok_embeddings = model.tok_embeddings if r == 0 else None   # model.py's order
        self.layers = nn.ModuleDict({str(i): model.layers[i] for c in self.chunks for i in c})
        self.norm = model.norm if r == pp - 1 else None
        self.output = model.output if r == pp - 1 else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x, chunk: int = 0):
        grid = self.grid
        c = chunk * grid.pp + grid.pp_rank                      # the chunk's global number
        seq_len = x.shape[1] * (grid.tp if self.sequence_parallel and c > 0 else 1)
        # model.py's own steps around the layers, run on the parts this stage holds (they carry
        # the Transformer's attribute names), so that the two forwards cannot drift apart.
        if c == 0:
            x = Transformer.embed(self, x)                      # (B, T, D) or (B, T/tp, D)
        cos, sin = Transformer.rotations(self, 0, seq_len)      # (T, E/2)
        for i in self.chunks[chunk]:
            x = self.layers[str(i)](x, cos, sin)
        if c == grid.pp * self.virtual_stages - 1:
            return Transformer.head(self, x)                    # (B, T, V) or (B, T, V/tp)
        return x




# NCCL's rule: a send may wait until its receive is posted (nothing is buffered), and each rank's
# calls run one at a time, in the order it made them. Played in ticks, 1f1b at pp = 2, m = 3, and
# its exchange (a: activation, g: gradient, sent after the tick of the op that makes it):
#
#     tick      0    1    2    3    4    5    6    7
#     rank 0    F0   F1        B0   F2   B1        B2
#     rank 1         F0   B0   F1   B1   F2   B2
#     0 -> 1    a0   a1             a2
#     1 -> 0              g0        g1        g2
#
# At tick 4 both ranks send. Made as two calls, isend then recv, each would wait in its send
# for a receive its peer has not posted: a hang that gloo, which buffers sends, never shows. So
# after tick t every rank makes one batch_isend_irecv (one NCCL group: its operations progress
# together) of its sends of tick t and the receives of what its neighbours send at tick t. All
# ranks derive the same ticks, so every operation's partner is in the peer's batch of the same
# tick, which the peer reaches after its batches before it: by induction on t, every batch
# completes, and the n-th message from a to b is the n-th that b receives from a (NCCL has no
# tags). The first exchange is not the pipeline group's first call (start_groups: NCCL's
# start-up rule). tests/p2p_rules.py replays every torch.distributed call the tests' runs make,
# collectives and waits included, under these rules.

def _landed(tensor: torch.Tensor, works: list) -> torch.Tensor:
    """tensor, received or sent in an earlier exchange, once that exchange has completed.

    NOTE: the messages of one exchange share its list of works, and each work is waited once and
    dropped from the list (a second wait on a completed gloo receive can block).
    """
    while works:
        works.pop().wait()
    return tensor


def pipeline_step(stage: PipelineStage, batch, grid: Grid, micro_batches: int,
                  schedule: Optional[str] = None, sync: Optional[GradSync] = None,
                  amp=nullcontext(), backward: bool = True):
    """Forward and backward of one step's batch (B, T+1) through the pipeline; the mean loss.

    batch is this data-parallel rank's rows, cut into micro_batches along B; every pipeline rank
    passes the same batch (only the first reads the inputs, only the last the targets).
    Gradients are left accumulated, the mean over micro-batches, as one pass over the batch
    would leave them (loss_fn says when): with a GradSync call sync.finish() next. Returns the
    loss, on every rank. With pp = 1 and the 1f1b schedule this is plain gradient accumulation.
    backward=False runs the forwards alone, without autograd (validation). amp: a context
    entered for each forward.
    The ops run in schedule_order, at the ticks of `play`; after each tick, one exchange (above).
    """
    m, v, pp, me = micro_batches, stage.virtual_stages, grid.pp, grid.pp_rank
    schedule = schedule or default_schedule(v)
    check_pipeline(stage.args.n_layers, pp, v, m if backward else None, schedule)
    if batch.shape[0] % m:
        raise ValueError(f"a batch of {batch.shape[0]} sequences per data-parallel rank cannot "
                         f"be cut into {m} micro-batches; make it a multiple of {m}")
    micro = batch.chunk(m)                                      # m x (B/m, T+1)
    b, seq_len = micro[0].shape[0], micro[0].shape[1] - 1
    shape = (b, seq_len // (grid.tp if stage.sequence_parallel else 1), stage.args.dim)
    with amp:                                   # what the stages send: bf16 under autocast
        dtype = activation_dtype(batch.device, next(stage.parameters()).dtype)
    orders = [[o for o in schedule_order(schedule, pp, m, v, r) if backward or o[0] == "F"]
              for r in range(pp)]                       # forward-only: the forwards, in order
    ticks = play(orders, pp, v)
    exchange, last = messages(ticks, pp, v), pp * v - 1
    # COMM: the dp all-reduce must see complete gradients: forwards run under no_sync(), except
    # one whose backward is this rank's last op (1f1b's last rank, and pp = 1); GradSync.finish
    # sends the rest after the flush, as PTD-P does.
    i, k = orders[me][-1][1:]
    synced = len(orders[me]) - 2 if orders[me][-2:] == [("F", i, k), ("B", i, k)] else -1
    ops_at = {t: (n, op, i, k) for n, (t, op, i, k) in enumerate(ticks[me])}
    held, inbox, sending, loss = {}, {}, [], torch.zeros((), device=batch.device)
    for tick in range(max(row[-1][0] for row in ticks) + 1):
        out = None                              # what this rank's op of this tick sends on
        if tick in ops_at:
            n, op, i, k = ops_at[tick]
            c = k * pp + me
            if op == "F":
                x = micro[i][:, :-1] if c == 0 else \
                    _landed(*inbox.pop(("F", i, c))).requires_grad_(backward)
                no_sync = sync.no_sync() if sync is not None and n != synced else nullcontext()
                with no_sync, amp, torch.set_grad_enabled(backward):
                    y = stage(x, k)
                    if c == last:
                        y = loss_fn(y, micro[i][:, 1:], grid) / m
                        loss += y.detach()
                out = y.detach() if c < last else None
                if backward:
                    held[i, k] = (x, y)
            else:
                x, y = held.pop((i, k))
                torch.autograd.backward(y, _landed(*inbox.pop(("B", i, c))) if c < last else None)
                out = x.grad if c > 0 else None
        ops, received = [], {}
        for src, dst, message in exchange.get(tick, ()):
            # COMM: pp send and receive, one batch per tick: this tick's activation or gradient
            # to its neighbour, and whatever the neighbours send at this tick
            if src == me:
                ops.append(dist.P2POp(dist.isend, out, grid.pp_ranks[dst], grid.pp_group))
            if dst == me:
                received[message] = buffer = torch.empty(shape, dtype=dtype, device=batch.device)
                ops.append(dist.P2POp(dist.irecv, buffer, grid.pp_ranks[src], grid.pp_group))
        if ops:
            works = dist.batch_isend_irecv(ops)
            inbox.update((message, (buffer, works)) for message, buffer in received.items())
            sending = [(t_, w) for t_, w in sending if not all(w_.is_completed() for w_ in w)]
            if out is not None:
                sending.append((out, works))    # kept alive until it has left
    for out, works in sending:
        _landed(out, works)
    if pp > 1:
        # COMM: pp broadcast, the step's loss (one number) from the last rank to the others
        dist.broadcast(loss, grid.pp_ranks[-1], group=grid.pp_group)
    return loss


# ---------------------------------------------------------------------------------------------
# 9. Clipping
# ---------------------------------------------------------------------------------------------

def clip_grad_norm(model, max_norm: float, grid: Grid) -> float:
    """Scale all gradients so that their global 2-norm is at most max_norm; return the norm before.

    The global norm is over the full model, each parameter counted once: split parameters add
    their shards' squares over tp; replicated ones (the norms) are counted by tp rank 0 only;
    pipeline stages hold different layers, whose squares add over pp. Data-parallel replicas
    hold the same (averaged) gradients: nothing to add over dp. Call it after GradSync.finish().
    Same eps as torch.nn.utils.clip_grad_norm_.
    """
    squares = torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device)
    for name, p in model.named_parameters():
        if p.grad is not None and (shard_dim(name) is not None or grid.tp_rank == 0):
            squares += torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()
    if grid.tp > 1:
        # COMM: tp all-reduce, one scalar (clipping)
        all_reduce(squares, grid.tp_group)
    if grid.pp > 1:
        # COMM: pp all-reduce, one scalar (clipping)
        all_reduce(squares, grid.pp_group)
    norm = squares.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.dtype))
    return norm.item()


# =============================================================================================
# Below: what running it for real needs. Joining the process group torchrun describes, and
# stopping its restarts; the checks that refuse a split before any work; checkpoint resharding.

# ---------------------------------------------------------------------------------------------
# 10. Launching
# ---------------------------------------------------------------------------------------------

def launcher() -> dict:
    """torchrun's variables, read here and nowhere else (one process when WORLD_SIZE is unset).
    One that is no whole number, or a RANK missing beside a WORLD_SIZE above 1 (processes
    started by other means: each would take rank 0), is refused in one line."""
    env = os.environ

    def number(name: str, default: Optional[str]) -> int:
        value = env.get(name, default)
        if value is None:
            raise ValueError(f"WORLD_SIZE={env['WORLD_SIZE']} is set but {name} is not: each "
                             "process needs its own; launch with torchrun")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} is not a whole number; set it as torchrun does, "
                             "or launch with torchrun") from None

    world_size = number("WORLD_SIZE", "1")
    return dict(world_size=world_size, rank=number("RANK", "0" if world_size == 1 else None),
                local_rank=number("LOCAL_RANK", "0"),
                master=(env.get("MASTER_ADDR"), number("MASTER_PORT", "0")),
                restart=number("TORCHELASTIC_RESTART_COUNT", "0"),          # --max-restarts
                max_restarts=number("TORCHELASTIC_MAX_RESTARTS", "0"),
                agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> Dist:
    """Join the process group torchrun describes; one process when WORLD_SIZE is unset.

    timeout_s: how long any collective or send may wait for its peers before it raises
    (is_collective_failure tells those errors apart), instead of holding the job forever.
    NCCL and cuda:LOCAL_RANK when CUDA is there (and device is not "cpu"), else gloo.
    """
    use_cuda = torch.cuda.is_available() and device != "cpu"
    env = launcher()
    if env["world_size"] == 1:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"), timeout_s=timeout_s,
                    restart=env["restart"])
    dev = torch.device("cuda", env["local_rank"]) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    timeout, store = timedelta(seconds=timeout_s), None
    if env["agent_store"]:
        # NOTE: torchrun's agent keeps one store for every restart of the job, so a restarted
        # round could read the addresses the dead round's ranks published, and hang or fail to
        # connect. Each round's keys go under their own prefix.
        agent = dist.TCPStore(*env["master"], env["world_size"], is_master=False, timeout=timeout)
        store = dist.PrefixStore(f"llama-recipe/restart-{env['restart']}", agent)
    # NOTE: device_id binds this process's GPU to the group (and NCCL starts its communicator
    # now, with every rank); start_groups does the same for each group make_grid creates.
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=env["rank"],
                            world_size=env["world_size"], timeout=timeout, store=store,
                            device_id=dev if use_cuda else None)
    return Dist(env["rank"], env["world_size"], env["local_rank"], dev, timeout_s, env["restart"])


def start_groups(grid: Grid, device: torch.device) -> None:
    """Start every group's communicator with all of its ranks, as soon as the grid is made.

    NOTE: torch's batch_isend_irecv requires that, when it is the first collective call on a
    group, every rank of the group takes part (else the behaviour is undefined). The pipeline's
    first exchange involves two ranks only (at pp >= 3, tick 0: ranks 0 and 1). So each group's
    first call is this one, made by all its ranks, in the same order on every rank.
    """
    for group in (grid.tp_group, grid.dp_group, grid.pp_group):
        if group is not None:
            # COMM: tp, dp, pp all-reduce of one number each, at start-up, all ranks of the group
            dist.all_reduce(torch.zeros(1, device=device), group=group)


def stop_restarts() -> None:
    """Ask torchrun not to restart the job: a configuration error would only come back.

    torchrun restarts a job whenever a worker exits non-zero, for whatever reason. Its agent is
    this process's parent, and SIGTERM makes it stop every worker and exit non-zero at once.
    Local rank 0 of each node asks, after the error is printed; without restarts, nothing.
    """
    try:
        env = launcher()
    except ValueError:                   # variables torchrun would not set: no torchrun to stop
        return
    if env["max_restarts"] > 0 and env["local_rank"] == 0:
        os.kill(os.getppid(), signal.SIGTERM)


def is_collective_failure(e: BaseException) -> bool:
    """Whether an error is a collective giving up: a peer silent past the process group's
    timeout, or gone (what gloo and NCCL report then, in their own words)."""
    markers = ("Timed out", "timed out", "timeout", "Connection closed by peer", "Connection reset",
               "pair closure", "NCCL error", "Broken pipe")
    return isinstance(e, getattr(dist, "DistError", ())) or any(m in str(e) for m in markers)


def destroy(world: Dist) -> None:
    """Leave the process group (call it in a `finally`)."""
    if world.world_size > 1 and dist.is_initialized():
        # NOTE: a gloo group still alive at interpreter exit, after the destroy, can abort a
        # finished run ("terminate called without an active exception", exit -6; 13 exits in
        # 50 in a minimal script, 0 in 100 with the group freed first). The run's objects hold
        # the groups in reference cycles (the tp regions and their linears): collected here.
        gc.collect()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# 11. Checks
# ---------------------------------------------------------------------------------------------

def check_config(args: ModelArgs, tp: int, sp: bool = False, seq_len: Optional[int] = None):
    """Refuse, in one line, a split that cannot work. Needs no process group: call it first."""
    if tp < 1:
        raise ValueError(f"tp={tp} must be a positive integer")
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
             "vocab_size": args.vocab_size, "FFN hidden": args.ffn_hidden}
    ok = [d for d in range(1, args.n_kv_heads + 1) if all(n % d == 0 for n in sizes.values())]
    for name, n in sizes.items():
        if n % tp:
            raise ValueError(f"tp={tp} must divide {name}={n}; use one of "
                             f"{', '.join(map(str, ok))}")
    if sp and seq_len is not None and seq_len % tp:
        raise ValueError(f"sequence parallelism splits the sequence over tp={tp}: seq_len="
                         f"{seq_len} is not divisible; use a multiple of {tp}")


def check_pipeline(n_layers: int, pp: int, virtual_stages: int = 1,
                   micro_batches: Optional[int] = None, schedule: Optional[str] = None):
    """Refuse, in one line, a pipeline that cannot run. Needs no process group: call it first."""
    v = virtual_stages
    schedule = schedule or default_schedule(v)
    if pp < 1 or v < 1:
        raise ValueError(f"pp={pp} and virtual stages={v} must be positive integers")
    if schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"pipeline schedule {schedule!r} is unknown; choose one of "
                         f"{', '.join(PIPELINE_SCHEDULES)}")
    if n_layers % (pp * v):
        ok = ", ".join(str(d) for d in range(1, n_layers + 1) if n_layers % d == 0)
        raise ValueError(f"n_layers={n_layers} cannot be cut into pp={pp} x virtual stages={v} "
                         f"= {pp * v} equal chunks; choose pp x v among {ok}")
    if schedule == "interleaved" and v == 1:
        raise ValueError("the interleaved schedule needs 2 or more virtual stages per rank; "
                         "raise --virtual-stages or use the 1f1b schedule")
    if schedule != "interleaved" and v > 1:
        raise ValueError(f"the {schedule} schedule runs one chunk per rank; virtual stages={v} "
                         "need the interleaved schedule")
    if v > 1 and pp == 1:
        raise ValueError(f"virtual stages={v} interleave chunks over pipeline ranks; add pp > 1 "
                         "or use one virtual stage")
    if schedule == "interleaved" and micro_batches is not None and micro_batches % pp:
        raise ValueError(f"the interleaved schedule runs micro-batches in groups of pp={pp}: "
                         f"micro-batches={micro_batches} must be a multiple of {pp}")


# ---------------------------------------------------------------------------------------------
# 12. Checkpoints
# ---------------------------------------------------------------------------------------------
# A file per tp rank, `consolidated.{tp_rank:02d}.pth`, holding what Meta's file of that rank
# holds, all layers: under pp, merge_stages gathers the stages' parts first. The split is
# checkpoint.py's (shard_dim, piece, merge_state_dicts), parallelize's too, with one exception:
# the embedding, split by vocabulary rows at run time (VocabParallelEmbedding) and by width in
# Meta's files. Loading goes through the full state dict, and each rank takes its slice and its
# layers: a checkpoint saved at one tp x pp layout loads at any other.

def _runtime_dim(key: str) -> Optional[int]:
    """How parallelize() splits key: Meta's dim, except the embedding, split by vocab rows."""
    return 0 if key.startswith("tok_embeddings") else shard_dim(key)


def shard_state_dict(model, grid: Grid) -> dict:
    """This tp rank's shard in Meta's split, as CPU copies: consolidated.{tp_rank:02d}.pth."""
    out = {}
    for key, t in model.state_dict().items():
        if grid.tp > 1 and _runtime_dim(key) != shard_dim(key):  # the embedding: rows -> width
            # COMM: tp all-gather, checkpoint save
            t = shard(all_gather(t, _runtime_dim(key), grid.tp_group), shard_dim(key), grid)
        out[key] = t.detach().cpu().clone()
    return out


def merge_stages(state: dict, grid: Grid) -> Optional[dict]:
    """Every pipeline stage's part of a state dict, merged on pp rank 0 (None on the others)."""
    if grid.pp == 1:
        return state
    parts = [None] * grid.pp if grid.pp_rank == 0 else None
    # COMM: pp gather of the stages' state dicts to pp rank 0, checkpoint save
    dist.gather_object(state, parts, dst=grid.pp_ranks[0], group=grid.pp_group)
    return {key: t for part in parts for key, t in part.items()} if parts else None


def full_state_dict(model, grid: Grid) -> Optional[dict]:
    """The whole model, Meta's keys, on rank 0 (None on the others): the tp ranks' files of
    shard_state_dict and merge_stages, merged by checkpoint.merge_state_dicts."""
    state = merge_stages(shard_state_dict(model, grid), grid)
    if grid.pp_rank > 0 or grid.dp_rank > 0:
        return None
    shards = [state] if grid.tp == 1 else [None] * grid.tp if grid.tp_rank == 0 else None
    if grid.tp > 1:
        # COMM: tp gather of the shards to tp rank 0, checkpoint save
        dist.gather_object(state, shards, dst=dist.get_global_rank(grid.tp_group, 0),
                           group=grid.tp_group)
    return merge_state_dicts(shards) if shards else None


def load_sharded(model, full_state: dict, grid: Grid) -> None:
    """Load a full (merged) Meta state dict into a parallelized model: each rank takes its slice
    (and, under pp, only the keys of its stage)."""
    pieces, own = {}, model.state_dict()
    for key, t in meta_weights(full_state).items():
        if grid.pp > 1 and key not in own:                       # another stage's weights
            continue
        dim = _runtime_dim(key)
        pieces[key] = t if dim is None or grid.tp == 1 else shard(t, dim, grid)
    model.load_state_dict(pieces, strict=True)
