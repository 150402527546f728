"""Tests for pipeline parallelism (parallel.py §8), on CPU (the planner's are in test_planner.py).

One group of 4 gloo workers (distributed.py) runs every multi-process experiment, so that the
file pays for one spawn, and returns what it measured:
  1. training: per-step losses and gradient norms of pp 2 under each schedule, pp 2 with 2
     virtual stages, pp 2 x tp 2 (+sp), pp 2 x dp 2, with recomputation, equal those of one plain
     process (test_parallel.reference, no parallel.py in it) over 10 steps;
  2. schedules: at pp 4, the sends and receives each rank exchanges, batch by batch, are the ones
     read off the timelines drawn in schedule_order's docstring, column by column; and every
     rank's recorded torch.distributed calls, in every configuration here, replay without
     deadlock under NCCL's rules (p2p_rules.py: no buffered sends, one call at a time on a group,
     every group started by all its ranks); GradSync's buckets start in the last backward of
     1F1B's last rank, and after the flush on the first;
  3. memory: the activation bytes each stage holds at its worst moment, and its weights,
     gradients and optimizer state, equal planner.py's prediction;
  4. checkpoints: saved at pp 2 x tp 2, the files are Meta's; loaded at pp 4, the loss is the same.
Two more groups, of 6 and 8 workers, record one step of each schedule at pp 3 and pp 4, with
dp 2 and with tp 2 + sp (the 4 workers do pp 2), and one at pp 3 with the groups not started:
that one must fail the replay. Another runs train.py itself at pp 2 x dp 2 and pp 2 (2 virtual
stages) x tp 2 + sp.
In this process: the drawn timelines and exchange are the code's, the bubble is PTD-P's formula,
pp = 1 is plain gradient accumulation, bad pipelines are refused in one line. What the workers
run comes after the tests.
"""

import inspect
import os
import re
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint as C
import data
import model as M
import parallel as P
import planner
import train as T
import test_parallel as parallel_tests
from distributed import held_bytes, spawn, spawn_each, state_bytes
from p2p_rules import Call, Deadlock, Recorder, collective, concat, p2p, replay
from test_parallel import perturbed_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]   # tests/conftest.py

WORLD = 4
STEPS, GLOBAL_BATCH, SEQ, LR, CLIP = 10, 8, 16, 5e-3, 1.0


def tiny(n_layers: int = 4) -> M.ModelArgs:
    return M.ModelArgs(dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=256,
                       multiple_of=32, max_seq_len=SEQ)


@dataclass(frozen=True)
class Config:
    """One pipeline of tiny() at pp 2: its schedule, its tp, the rest of the 4 ranks dp."""
    name: str
    schedule: str
    micro_batches: int
    tp: int = 1
    v: int = 1                      # virtual stages (model chunks) per rank
    sp: bool = False
    recompute: str = "none"
    data_parallel: bool = False     # False: each of the dp pipelines trains on the whole batch
    bf16: bool = False              # under bf16 autocast


# --- 1. training equals one process -------------------------------------------------------------

# Without data parallelism the two pipelines of the pp 2 x dp 2 grid each train on the whole
# batch alone.
CONFIGS = [
    Config("pp2 1f1b", schedule="1f1b", micro_batches=4),
    Config("pp2 afab", schedule="afab", micro_batches=4),
    Config("pp2 v2 interleaved", schedule="interleaved", micro_batches=4, v=2),
    Config("pp2 x tp2+sp", schedule="1f1b", micro_batches=2, tp=2, sp=True),
    Config("pp2 v2 x tp2+sp selective", schedule="interleaved", micro_batches=2, tp=2, v=2,
           sp=True, recompute="selective"),
    Config("pp2 x dp2", schedule="1f1b", micro_batches=2, data_parallel=True),
    Config("pp2 v2 x dp2 full", schedule="interleaved", micro_batches=2, v=2, recompute="full",
           data_parallel=True),
]


def test_pipeline_training_equals_one_process(ran):
    ref_losses, ref_norms = reference(tiny())
    assert ref_losses[-1] < ref_losses[0] - 1.0, "the reference must learn, or equality is weak"
    for config in CONFIGS:
        for rank in range(WORLD):
            losses, norms = ran[rank]["train"][config.name]
            what = f"{config.name}, rank {rank}"
            assert losses == pytest.approx(ref_losses, rel=1e-4), f"{what}: losses"
            assert norms == pytest.approx(ref_norms, rel=1e-4), f"{what}: grad norms"


# --- 2. the order of sends and receives ---------------------------------------------------------

def test_sends_and_receives_follow_the_drawn_timelines(ran):
    deep, drawn = tiny(n_layers=8), drawn_timelines()
    batch = batches(deep)[0]
    torch.manual_seed(0)
    plain = M.Transformer(deep)
    loss = F.cross_entropy(plain(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).item()
    for schedule, v in (("afab", 1), ("1f1b", 1), ("interleaved", 2)):
        for rank in range(WORLD):
            calls = ran[rank]["traffic"][f"pp4 {schedule}"]
            got = [sorted((kind, peer) for kind, peer, *_ in c.what)
                   for c in calls if c.op == "p2p"]
            assert got == expected_exchanges(drawn[schedule], rank, 4, v), (schedule, rank)
            assert ran[rank]["pp4 loss"][schedule] == pytest.approx(loss, rel=1e-5), schedule
    count = lambda schedule: sum(len(c.what) for c in ran[1]["traffic"][f"pp4 {schedule}"]
                                 if c.op == "p2p")
    assert count("interleaved") == 2 * count("1f1b")                        # v x messages


def test_dp_all_reduce_starts_in_the_last_backward_of_1f1b_last_rank_only(ran):
    """pp 2 x dp 2, 1F1B (planner.py's docstring says so): on the last pp rank, whose last two
    ops are one micro-batch's forward and backward, GradSync's buckets start during that
    backward, before the gradient it sends back; the first rank, which ends the step, runs every
    forward under no_sync() and sends all its buckets after the flush, in finish()."""
    for rank in range(WORLD):
        calls, dp_ranks = ran[rank]["traffic"]["pp2 x dp2"], (rank - rank % 2, rank - rank % 2 + 1)
        is_bucket = lambda c: c.op == "all_reduce" and c.ranks == dp_ranks and not c.blocking
        step = calls[:next(n for n, c in enumerate(calls) if c.op == "broadcast")]  # the loss's
        buckets = [n for n, c in enumerate(step) if is_bucket(c)]
        last_send = max(n for n, c in enumerate(step) if c.op == "p2p")
        if rank // 2 == 1:                                                  # the last pp rank
            assert buckets and buckets[0] < last_send, rank
        else:
            assert buckets == [] and is_bucket(calls[len(step) + 1]), rank


def test_recorded_traffic_cannot_deadlock_under_nccl_rules(ran):
    names = list(ran[0]["traffic"])
    assert len(names) == len(CONFIGS) + 3 + 3          # + validation x2, v3, pp 4 x 3 schedules
    for name in names:
        calls = {rank: concat(ran[rank]["started"], ran[rank]["traffic"][name])
                 for rank in range(WORLD)}
        assert all(any(c.op == "p2p" for c in seq) for seq in calls.values()), name
        assert replay(calls) == sum(len(seq) for seq in calls.values()), name


SCHEDULES = (("afab", 1), ("1f1b", 1), ("interleaved", 2))


def test_every_schedule_at_pp_2_3_4_with_dp2_and_with_tp2_sp_replays_clean(ran, deeper):
    """One step of each schedule at pp 2, 3 and 4, once with dp 2 and once with tp 2 + sp, the
    grid made and the gradients synchronized and clipped: every call of every rank recorded,
    collectives and waits included, replays under NCCL's rules; the loss is one process's."""
    runs = {2: ran, **deeper}
    for pp, by_rank in runs.items():
        names = list(by_rank[0]["schedules"]["traffic"])
        assert names == [f"pp{pp} x {axis} {s}" for axis in ("dp2", "tp2+sp") for s, _ in SCHEDULES]
        want = one_process_loss(tiny(2 * pp), 2 * pp)
        for name in names:
            calls = {rank: concat(r["schedules"]["started"], r["schedules"]["traffic"][name])
                     for rank, r in enumerate(by_rank)}
            ops = {c.op for seq in calls.values() for c in seq}
            assert {"p2p", "wait", "all_reduce", "broadcast"} <= ops, (name, ops)
            if "tp2" in name:
                assert {"all_gather_single", "reduce_scatter_single"} <= ops, (name, ops)
            assert replay(calls) == sum(len(seq) for seq in calls.values()), name
            for rank, r in enumerate(by_rank):
                assert r["schedules"]["loss"][name] == pytest.approx(want, rel=1e-5), (name, rank)


def test_pipeline_without_group_start_breaks_nccl_start_up_rule(deeper):
    """At pp 3 the first exchange (tick 0) involves ranks 0 and 1 of each pipeline only: without
    start_groups it is the pipeline group's first call, which NCCL leaves undefined."""
    calls = {rank: r["unstarted"] for rank, r in enumerate(deeper[3])}
    with pytest.raises(Deadlock, match=r"first call on that group and reaches ranks \[0, 2\] "
                                       r"only: NCCL needs all of \[0, 2, 4\]"):
        replay(calls)


def f32(kind, peer):
    return (kind, peer, 8, "f32")


def test_the_checker_finds_deadlocks():
    send = lambda peer, **kw: p2p(f32("send", peer), **kw)
    recv = lambda peer, **kw: p2p(f32("recv", peer), **kw)
    blocking = {0: [send(1, blocking=True), recv(1, blocking=True)],
                1: [send(0, blocking=True), recv(0, blocking=True)]}
    with pytest.raises(Deadlock, match="rank 0 call 0.*rank 1 call 0"):
        replay(blocking)
    # asynchronous, but one call at a time on a group: the sends still wait for the receives
    with pytest.raises(Deadlock):
        replay({0: [send(1), recv(1)], 1: [send(0), recv(0)]})
    batched = lambda peer: p2p(f32("send", peer), f32("recv", peer))
    assert replay({0: [batched(1)], 1: [batched(0)]}) == 2                  # batched: fine
    assert replay({0: [send(1), recv(1)], 1: [recv(0), send(0)]}) == 4
    with pytest.raises(Deadlock, match="expects"):                          # sizes must agree
        replay({0: [send(1)], 1: [p2p(("recv", 0, 9, "f32"))]})
    with pytest.raises(Deadlock):                                           # a send nobody takes
        replay({0: [send(1)], 1: []})
    # the issue itself: one call at a time, neighbours both send first in 1f1b's steady state
    # (pp 2, m 4: rank 0 sends act 2 and then waits for grad 1; rank 1 sends grad 1 first)
    with pytest.raises(Deadlock):
        replay(sends_then_receives("1f1b", 2, 4))
    assert replay(sends_then_receives("afab", 2, 4)) > 0        # no crossing: all sends first


def test_the_checker_holds_collectives_to_nccl_rules():
    pp = dict(group="pp", ranks=(0, 1))
    loss = lambda **kw: collective("broadcast", "pp", (0, 1), [("src", "1")], **kw)
    send, recv = p2p(f32("send", 1), **pp), p2p(f32("recv", 0), **pp)
    # a send then the loss's broadcast, against the broadcast then the receive: each rank's
    # second call on the group waits for its first, which waits for the other rank's second
    with pytest.raises(Deadlock, match="rank 0 call 0: p2p.*rank 1 call 0: broadcast"):
        replay({0: [send, loss()], 1: [loss(), recv]})
    assert replay({0: [send, loss()], 1: [recv, loss()]}) == 4
    # the same with a wait: an asynchronous broadcast lets its rank go on, its wait does not
    assert replay({0: [send, loss(blocking=False), Call("wait", waits=1)],
                   1: [recv, loss(blocking=False), Call("wait", waits=1)]}) == 6
    with pytest.raises(Deadlock, match="disagrees"):                # same op, same shape
        replay({0: [collective("all_reduce", "tp", (0, 1), [("tensor", ((4,), "f32"))])],
                1: [collective("all_reduce", "tp", (0, 1), [("tensor", ((5,), "f32"))])]})
    with pytest.raises(Deadlock, match="no call can complete"):      # a member never comes
        replay({0: [collective("all_reduce", "tp", (0, 1))], 1: []})
    # NCCL's start-up rule, pp 3: the first exchange (tick 0) is ranks 0 and 1 only
    three = dict(group="pp", ranks=(0, 1, 2))
    steps = {0: [p2p(f32("send", 1), **three)],
             1: [p2p(f32("recv", 0), **three), p2p(f32("send", 2), **three)],
             2: [p2p(f32("recv", 1), **three)]}
    with pytest.raises(Deadlock, match=r"rank 0 call 0: p2p .* reaches ranks \[0, 1\] only"):
        replay(steps)
    start = collective("all_reduce", "pp", (0, 1, 2), [("tensor", ((1,), "f32"))])
    assert replay({r: [start, *seq] for r, seq in steps.items()}) == 7


# --- 3. memory ---------------------------------------------------------------------------------

# One pipeline per dp rank, on 4 sequences.
MEMORY_CONFIGS = [
    Config("1f1b", schedule="1f1b", micro_batches=4),
    Config("afab", schedule="afab", micro_batches=4),
    Config("interleaved selective", schedule="interleaved", micro_batches=4, v=2,
           recompute="selective"),
    Config("interleaved full", schedule="interleaved", micro_batches=4, v=2, recompute="full"),
    Config("interleaved full bf16", schedule="interleaved", micro_batches=4, v=2,
           recompute="full", bf16=True),
    Config("tp2+sp 1f1b", schedule="1f1b", micro_batches=4, tp=2, sp=True),
    Config("tp2 afab", schedule="afab", micro_batches=2, tp=2),
    Config("1f1b bf16", schedule="1f1b", micro_batches=4, bf16=True),
    Config("tp2+sp interleaved selective bf16", schedule="interleaved", micro_batches=2, tp=2,
           v=2, sp=True, recompute="selective", bf16=True),
]


def test_memory_prediction_equals_measured_bytes(ran):
    args = tiny()
    for config in MEMORY_CONFIGS:
        m = config.micro_batches
        for rank in range(WORLD):
            want = planner.stage_activation_bytes(
                args, 4 // m, SEQ, tp=config.tp, pp=2, virtual_stages=config.v, micro_batches=m,
                schedule=config.schedule, sp=config.sp, recompute=config.recompute,
                bytes_per_el=2 if config.bf16 else 4, rank=rank // (WORLD // 2))   # its pp rank
            got = ran[rank]["memory"][config.name]
            assert got == want, f"{config.name}, rank {rank}: {got} vs {want}"
    measured = {r: ran[r]["memory"] for r in range(WORLD)}
    assert measured[0]["afab"] > measured[0]["1f1b"] > measured[2]["1f1b"]  # 1F1B holds fewer
    for rank in range(WORLD):
        n = planner.stage_parameters(args, tp=2, pp=2, rank=rank // 2)
        weights, grads, optimizer = planner.PRECISIONS["fp32"][:3]     # bytes per parameter
        assert ran[rank]["state bytes"] == dict(weights=n * weights, grads=n * grads,
                                                optimizer=n * optimizer), rank


# --- 4. checkpoints ----------------------------------------------------------------------------

def test_checkpoint_saved_at_pp2_tp2_loads_at_pp4(ran):
    args = tiny()
    state = perturbed_model(args).state_dict()
    assert set(ran[0]["full"]) == set(state)
    for key, t in state.items():
        assert torch.equal(ran[0]["full"][key], t), key
    assert all(ran[r]["full"] is None for r in range(1, WORLD))
    for rank, tp_rank in ((0, 0), (1, 1)):                     # pp rank 0 writes each tp file
        shard = C.split_state_dict(state, 2)[tp_rank]
        assert set(ran[rank]["consolidated"]) == set(shard)
        for key, t in shard.items():
            assert torch.equal(ran[rank]["consolidated"][key], t), (rank, key)
    assert ran[2]["consolidated"] is None and ran[3]["consolidated"] is None
    assert ran[0]["keys at pp 4"] == sorted(["tok_embeddings.weight"] + [
        k for k in state if k.startswith("layers.0.")])
    rows = batches(args)[0][:4]
    logits = perturbed_model(args)(rows[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).item()
    for rank in range(WORLD):
        assert ran[rank]["loss at pp 4"] == pytest.approx(loss, rel=1e-5)


# --- in this process: schedules ------------------------------------------------------------------

def test_drawn_timelines_are_the_codes():
    drawn = drawn_timelines()
    for schedule, v in (("afab", 1), ("1f1b", 1), ("interleaved", 2)):
        assert cells_by_tick(timeline(schedule, 4, 4, v)) == drawn[schedule], schedule


@pytest.mark.parametrize("schedule,pp,m,v", [
    (s, pp, m, 1) for s in ("afab", "1f1b") for pp in (2, 3, 4) for m in (1, 2, 5, 8)] + [
    ("interleaved", pp, m, v) for pp in (2, 3, 4) for v in (2, 3) for m in (pp, 2 * pp, 3 * pp)])
def test_bubble_is_ptdp_formula_and_1f1b_bounds_memory(schedule, pp, m, v):
    rows = timeline(schedule, pp, m, v)                       # unit-time F and B
    width = len(str(m - 1)) + 2                                  # a cell and its space
    slots = max(len(row) - len("rank 0  ") + 1 for row in rows) // width
    busy = 2 * m * v
    assert (slots - busy) / busy == pytest.approx((pp - 1) / (v * m)), rows
    for rank in range(pp):
        held = P.in_flight(schedule, pp, m, v, rank)
        if schedule == "afab":
            assert held == m
        if schedule == "1f1b":
            assert held == min(pp - rank, m)


def test_the_drawn_exchange_is_the_codes():
    """parallel.py's picture of NCCL's rule, 1f1b at pp 2 and m 3: its rows of ops are play's
    ticks, its rows of messages are `messages` (a: an activation, g: a gradient)."""
    block = inspect.getsource(P).split("# NCCL's rule")[1].split("\ndef ")[0]
    header, *rows = re.findall(r"^#(\s{4,}(?:tick|rank \d|\d -> \d).*)$", block, re.M)
    columns = {m.start(): int(m.group()) for m in re.finditer(r"\d+", header)}    # column: tick
    first = min(columns)
    drawn = {row[:first].strip(): {t: row[c:c + 3].strip() for c, t in columns.items()
                                   if row[c:c + 3].strip()} for row in rows}
    ticks = P.play([P.schedule_order("1f1b", 2, 3, 1, r) for r in range(2)], 2)
    want = {f"rank {r}": {t: f"{op}{i}" for t, op, i, _ in row} for r, row in enumerate(ticks)}
    for t, sent in P.messages(ticks, 2).items():
        for src, dst, (kind, i, _) in sent:
            want.setdefault(f"{src} -> {dst}", {})[t] = ("a" if kind == "F" else "g") + str(i)
    assert drawn == want


def test_pp1_is_plain_gradient_accumulation():
    args, grid = tiny(), P.Grid()
    rows = batches(args)[0]
    torch.manual_seed(0)
    plain = M.Transformer(args)
    for micro in rows.chunk(2):
        (F.cross_entropy(plain(micro[:, :-1]).flatten(0, 1), micro[:, 1:].flatten()) / 2).backward()
    for schedule in ("1f1b", "afab"):
        stage = build_stage(args, grid)
        assert list(stage.state_dict()) == list(plain.state_dict())
        loss = P.pipeline_step(stage, rows, grid, 2, schedule)
        with torch.no_grad():
            want = F.cross_entropy(plain(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
        grads = [p.grad.clone() for p in stage.parameters()]
        forward_only = P.pipeline_step(stage, rows, grid, 4, backward=False)
        assert forward_only.item() == pytest.approx(want.item(), rel=1e-5)
        assert all(torch.equal(p.grad, g) for p, g in zip(stage.parameters(), grads))
        for (name, a), b in zip(stage.named_parameters(), plain.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("call,message", [
    (lambda: P.check_pipeline(4, 2, 3), "n_layers=4 cannot be cut into pp=2 x virtual stages=3"),
    (lambda: P.check_pipeline(8, 4, 2, micro_batches=2),
     "micro-batches=2 must be a multiple of 4"),
    (lambda: P.check_pipeline(8, 2, 2, schedule="1f1b"), "need the interleaved schedule"),
    (lambda: P.check_pipeline(8, 2, 1, schedule="interleaved"), "needs 2 or more virtual"),
    (lambda: P.check_pipeline(8, 1, 2), "add pp > 1"),
    (lambda: P.check_pipeline(8, 2, schedule="zb"), "choose one of afab, 1f1b, interleaved"),
    (lambda: P.make_grid(P.Dist(rank=0, world_size=6), tp=2, pp=2),
     "world size 6 is not divisible by tp*pp=4"),
    (lambda: P.PipelineStage(M.Transformer(tiny(n_layers=3)), P.Grid(pp=2), 1),
     "n_layers=3 cannot be cut into pp=2"),
    (lambda: P.pipeline_step(build_stage(tiny(), P.Grid()), batches(tiny())[0][:3], P.Grid(), 2),
     "a batch of 3 sequences per data-parallel rank cannot be cut into 2 micro-batches"),
])
def test_bad_pipelines_are_refused_in_one_line(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


# --- through train.py ---------------------------------------------------------------------------

def train_argv(data_dir, out, batch_size, *extra):
    return ["--data", data_dir, "--out", str(out), "--preset", "tiny", "--seq-len", "32",
            "--batch-size", str(batch_size), "--steps", "6", "--warmup", "2", "--eval-every", "100",
            "--eval-windows", "4", "--save-every", "100", "--samples", "0", "--device", "cpu",
            "--log-every", "100", *extra]


# (name, extra flags, batch size per rank); 4 workers, a global batch of 8 sequences
TRAIN_RUNS = [
    ("pp2 x dp2", ["--pp", "2", "--micro-batches", "2"], 2),
    ("pp2 v2 x tp2+sp", ["--pp", "2", "--virtual-stages", "2", "--micro-batches", "2", "--tp",
                         "2", "--sp", "--recompute", "selective"], 4),
]


def test_train_py_at_pp2_equals_one_process_and_saves_meta_files(demo_data, tmp_path):
    one = T.main(train_argv(demo_data, tmp_path / "one", 8))
    argvs = [train_argv(demo_data, tmp_path / name, batch_size, *extra)
             for name, extra, batch_size in TRAIN_RUNS]
    names = [name for name, *_ in TRAIN_RUNS]
    ran = dict(zip(names, spawn_each(T.main, WORLD, argvs, timeout=300)))   # name -> per rank
    assert one["losses"][6] < one["losses"][1] - 0.5            # it learns
    for name, ranks in ran.items():
        for rank, result in enumerate(ranks):
            for step, loss in one["losses"].items():
                assert result["losses"][step] == pytest.approx(loss, rel=1e-4), (name, rank, step)
            for step, loss in one["val_losses"].items():              # forward-only pipeline
                assert result["val_losses"][step] == pytest.approx(loss, rel=1e-4), \
                    (name, rank, step)
    # saved at pp 2 x tp 2: Meta's files, one per tp rank, every layer in each; loads at pp 1
    ckpt = C.latest(str(tmp_path / "pp2 v2 x tp2+sp"))
    files = sorted(f for f in os.listdir(ckpt) if f.endswith(".pth"))
    assert files == ["consolidated.00.pth", "consolidated.01.pth", "train_state.00.stage00.pth",
                     "train_state.00.stage01.pth", "train_state.01.stage00.pth",
                     "train_state.01.stage01.pth"]
    args, state, _ = C.read_checkpoint(ckpt)
    model = M.Transformer(args)
    model.load_state_dict(C.meta_weights(state))
    val = data.validation_windows(demo_data, 32, 4, seed=0)
    with torch.no_grad():
        loss = F.cross_entropy(model(val[:, :-1]).flatten(0, 1), val[:, 1:].flatten()).item()
    assert loss == pytest.approx(ran["pp2 v2 x tp2+sp"][0]["val_losses"][6], rel=1e-4)


@pytest.mark.parametrize("extra,world,message", [
    (["--pp", "2"], 3, "world size 3 is not divisible by --tp 1 x --pp 2"),
    (["--pp", "3"], 3, "n_layers=4 cannot be cut into pp=3 x virtual"),     # not a world size
    (["--pp", "3"], 4, "n_layers=4 cannot be cut into pp=3 x virtual"),     # to launch: a split
    (["--pp", "2", "--virtual-stages", "3"], 4, "n_layers=4 cannot be cut into pp=2 x virtual"),
    (["--pp", "4", "--virtual-stages", "2"], 4, "n_layers=4 cannot be cut into pp=4 x virtual"),
    (["--pp", "2", "--virtual-stages", "2", "--micro-batches", "3"], 4,
     "micro-batches=3 must be a multiple of 2"),
    (["--pp", "2", "--pp-schedule", "gpipe"], 2, "pipeline schedule 'gpipe' is unknown"),
    (["--pp", "0"], 2, "--pp=0 must be positive"),
])
def test_train_py_refuses_bad_pipelines_before_any_work(tmp_path, capsys, monkeypatch, extra,
                                                       world, message):
    # as if torchrun had started `world` processes: main refuses before it joins any group, and
    # before it reads the data (there is none here)
    monkeypatch.setattr(P, "init_distributed", lambda device, timeout_s: P.Dist(0, world))
    with pytest.raises(SystemExit) as e:
        T.main(train_argv(str(tmp_path / "no-data"), tmp_path / "out", 4, *extra))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())                          # nothing written


# --- what the workers run, and the drawings read --------------------------------------------------

def batches(args):
    """test_parallel's fixed global batch, repeated for this file's STEPS."""
    return parallel_tests.batches(args, STEPS)


def reference(args):
    """One plain process, the whole global batch at once: test_parallel's, at this file's STEPS
    and LR."""
    return parallel_tests.reference(args, STEPS, LR)


def build_stage(args, grid, v=1, sp=False, recompute="none", model=None):
    if model is None:
        torch.manual_seed(0)
        model = M.Transformer(args)
    model = P.parallelize(model, grid, sp=sp)
    P.apply_recompute(model, recompute)
    return P.PipelineStage(model, grid, v)


def train(config, args, grid):
    stage = build_stage(args, grid, config.v, config.sp, config.recompute)
    # GradSync also sums the norms' gradients over tp under sp; on the pp 2 x dp 2 grid without
    # data parallelism there is nothing for it to do.
    needs_sync = config.data_parallel or grid.dp == 1
    sync = P.GradSync(stage, grid, bucket_mb=0.02) if needs_sync else None
    opt = torch.optim.AdamW(stage.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    losses, norms = [], []
    for batch in batches(args):
        rows = batch.chunk(grid.dp)[grid.dp_rank] if config.data_parallel else batch
        loss = P.pipeline_step(stage, rows, grid, config.micro_batches, config.schedule, sync)
        if sync is not None:
            sync.finish()
        if config.data_parallel:
            loss = P.all_reduce(loss, grid.dp_group) / grid.dp          # for logging only
        norms.append(P.clip_grad_norm(stage, CLIP, grid))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, norms


def cells_by_tick(rows: list) -> list:
    """Timeline rows ("rank r  F0 F1 ...", three characters a tick) -> per rank, {tick: cell}."""
    ticks = []
    for line in rows:
        cells = line.split("rank ", 1)[1][3:]                   # after "rank r  "
        ticks.append({t: cells[3 * t:3 * t + 2].strip() for t in range((len(cells) + 1) // 3)
                      if cells[3 * t:3 * t + 2].strip()})
    return ticks


def drawn_timelines() -> dict:
    """The timelines of schedule_order's docstring: {schedule: per rank, {tick: cell}}."""
    rows = [line for line in P.schedule_order.__doc__.splitlines() if re.match(r"\s+rank \d", line)]
    ticks = cells_by_tick(rows)
    return {name: ticks[4 * i:4 * i + 4] for i, name in enumerate(P.PIPELINE_SCHEDULES)}


def expected_exchanges(drawn, rank, pp, v):
    """The batches a rank must exchange to run the drawn timelines, read off column by column:
    at each tick, what its own cell sends and what its neighbours' cells send to it."""
    last, batches_ = pp * v - 1, []
    for t in range(max(max(row) for row in drawn) + 1):
        batch = []
        for q, row in enumerate(drawn):
            cell = row.get(t)
            if cell is None:
                continue
            op, c = cell[0].upper(), (0 if cell[0].isupper() else 1) * pp + q
            to = (q + 1) % pp if op == "F" and c < last else (q - 1) % pp if op == "B" and c > 0 \
                else None
            if to is not None and q == rank:
                batch.append(("send", to))
            if to == rank:
                batch.append(("recv", q))
        if batch:
            batches_.append(sorted(batch))
    return batches_


def timeline(schedule: str, pp: int, micro_batches: int, virtual_stages: int = 1) -> list:
    """Each rank's row of the schedule as parallel.play runs it, one cell per tick; v <= 2 to draw
    (F for chunk 0, f for chunk 1)."""
    width = len(str(micro_batches - 1)) + 1
    ticks = P.play([P.schedule_order(schedule, pp, micro_batches, virtual_stages, r)
                    for r in range(pp)], pp, virtual_stages)
    n = max(row[-1][0] for row in ticks) + 1
    rows = []
    for r, row in enumerate(ticks):
        cells = [" " * width] * n
        for t, op, i, k in row:
            cells[t] = ((op if k == 0 else op.lower()) + str(i)).ljust(width)
        rows.append(f"rank {r}  " + " ".join(cells).rstrip())
    return rows


def sends_then_receives(schedule, pp, m, v=1):
    """Each rank's calls as pipeline_step made them before it exchanged by ticks: per op, a
    blocking receive of its input, then an isend of its output, one call each."""
    last, calls = pp * v - 1, {}
    for rank in range(pp):
        seq = []
        for op, i, k in P.schedule_order(schedule, pp, m, v, rank):
            c = k * pp + rank
            if op == "F":
                seq += [p2p(f32("recv", (rank - 1) % pp), blocking=True)] if c > 0 else []
                seq += [p2p(f32("send", (rank + 1) % pp))] if c < last else []
            else:
                seq += [p2p(f32("recv", (rank + 1) % pp), blocking=True)] if c < last else []
                seq += [p2p(f32("send", (rank - 1) % pp))] if c > 0 else []
        calls[rank] = seq
    return calls


def one_process_loss(args, rows):
    """The loss of the plain seeded model on the first rows of the fixed batch."""
    torch.manual_seed(0)
    batch = batches(args)[0][:rows]
    with torch.no_grad():
        logits = M.Transformer(args)(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()


def record_schedules(world, pp):
    """One step of each schedule at pp, on the world's 2 pp ranks: with dp 2 (each pipeline on
    the same 2 pp sequences, m = pp), then with tp 2 + sp; every call recorded, the grids'
    making too. The model has 2 pp layers: one per chunk of the interleaved schedule."""
    with Recorder() as started:
        grids = {"dp2": P.make_grid(world, pp=pp), "tp2+sp": P.make_grid(world, tp=2, pp=pp)}
    args, out = tiny(2 * pp), {"started": started, "traffic": {}, "loss": {}}
    rows = batches(args)[0][:2 * pp]
    for axis, grid in grids.items():
        for schedule, v in SCHEDULES:
            stage = build_stage(args, grid, v, sp=grid.tp > 1)
            sync = P.GradSync(stage, grid, bucket_mb=0.01)
            name = f"pp{pp} x {axis} {schedule}"
            with Recorder() as calls:
                loss = P.pipeline_step(stage, rows, grid, pp, schedule, sync)
                sync.finish()
                P.clip_grad_norm(stage, CLIP, grid)
            out["traffic"][name], out["loss"][name] = calls, loss.item()
    return out


def worker_deeper(pp):
    """record_schedules at pp on 2 pp workers; at pp 3, a step made without start_groups too."""
    world = P.init_distributed(device="cpu")
    try:
        out = {"schedules": record_schedules(world, pp)}
        if pp == 3:
            P.start_groups = lambda grid, device: None            # the code before the rule
            with Recorder() as calls:
                grid = P.make_grid(world, pp=pp)
                P.pipeline_step(build_stage(tiny(6), grid), batches(tiny(6))[0][:6], grid, 3)
            out["unstarted"] = calls
        return out
    finally:
        P.destroy(world)


@pytest.fixture(scope="module")
def deeper():
    return {pp: spawn(worker_deeper, 2 * pp, pp, timeout=300) for pp in (3, 4)}


def worker():
    world = P.init_distributed(device="cpu")
    try:
        with Recorder() as started:
            grids = {(tp, pp): P.make_grid(world, tp=tp, pp=pp)
                     for tp, pp in ((1, 2), (2, 2), (1, 4))}
        args = tiny()
        out = {"train": {}, "pp4 loss": {}, "memory": {}, "started": started}
        out["traffic"] = {}                  # every torch.distributed call, replayed in the test
        for config in CONFIGS:
            with Recorder() as calls:
                out["train"][config.name] = train(config, args, grids[config.tp, 2])
            out["traffic"][config.name] = calls
        for name, tp, v, m in (("pp2 validation", 1, 1, 4), ("pp2 v2 x tp2 validation", 2, 2, 2)):
            with Recorder() as calls, torch.no_grad():
                P.pipeline_step(build_stage(args, grids[tp, 2], v), batches(args)[0],
                                grids[tp, 2], m, backward=False)
            out["traffic"][name] = calls
        six = tiny(n_layers=6)                  # 3 virtual stages of 1 layer on each of 2 ranks
        with Recorder() as calls:
            P.pipeline_step(build_stage(six, grids[1, 2], 3), batches(six)[0], grids[1, 2], 4)
        out["traffic"]["pp2 v3 interleaved"] = calls

        # the order of sends and receives at pp 4, 8 layers (2 chunks of 1 layer per rank)
        grid, deep = grids[1, 4], tiny(n_layers=8)
        for schedule, v in (("afab", 1), ("1f1b", 1), ("interleaved", 2)):
            with Recorder() as calls:
                loss = P.pipeline_step(build_stage(deep, grid, v), batches(deep)[0], grid, 4,
                                       schedule)
            out["pp4 loss"][schedule] = loss.item()
            out["traffic"][f"pp4 {schedule}"] = calls

        # memory: activations held at the worst moment; weights, gradients, optimizer state
        rows = batches(args)[0][:4]
        for config in MEMORY_CONFIGS:
            grid = grids[config.tp, 2]
            stage = build_stage(args, grid, config.v, config.sp, config.recompute)
            out["memory"][config.name] = held_bytes(stage, rows, grid, config.micro_batches,
                                                    config.schedule, config.bf16)
        grid = grids[2, 2]
        stage = build_stage(args, grid, 1, sp=True)
        opt = torch.optim.AdamW(stage.parameters())
        P.pipeline_step(stage, rows, grid, 2)
        opt.step()
        out["state bytes"] = state_bytes(stage, opt)

        # checkpoints: saved at pp 2 x tp 2 (+sp), loaded at pp 4
        saved = build_stage(args, grid, 1, sp=True, model=perturbed_model(args))
        out["full"] = P.full_state_dict(saved, grid)
        out["consolidated"] = P.merge_stages(P.shard_state_dict(saved, grid), grid)
        full = [out["full"]]
        dist.broadcast_object_list(full, src=0)
        grid = grids[1, 4]
        loaded = build_stage(args, grid, 1)
        P.load_sharded(loaded, full[0], grid)
        out["loss at pp 4"] = P.pipeline_step(loaded, rows, grid, 2).item()
        out["keys at pp 4"] = sorted(loaded.state_dict())
        out["schedules"] = record_schedules(world, 2)
        return out
    finally:
        P.destroy(world)


@pytest.fixture(scope="module")
def ran():
    return spawn(worker, WORLD, timeout=300)
