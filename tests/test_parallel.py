"""Tests for parallel.py, on CPU, with gloo workers spawned from inside pytest (distributed.py).

Four groups of 4 workers, three of them running many experiments each, keep the file fast. The
workers return what they measured; each test compares it with a closed form, the unsharded
modules, one plain process (written out below, no parallel.py in it) or planner.py's prediction:
  1. operators and layers: the collectives, f, g, f_sp, g_sp against closed forms; every parallel
     layer and the vocabulary-parallel cross-entropy against the unsharded module, both passes;
     the overlapped and plain tp backwards give equal gradients, and the recorded order of one
     backward shows the overlap; the loss ignores targets of -100 as F.cross_entropy does.
  2. training: per-step losses of tp 4, tp 2 (+sp), dp 4, dp 2 x tp 2 and each recompute mode equal
     those of one plain process; naive and bucketed data parallelism give equal gradients; the
     first bucket's all-reduce starts before backward reaches the first layer; leaving the
     process group after training leaves no group alive.
  3. accounting and checkpoints: saved activation bytes and collective calls/bytes equal
     planner.py's predictions; a checkpoint saved at tp 2 loads at tp 4 and at tp 1.
Plus, in this process: recomputation with random ops, a second loss of the same logits refused,
bad configurations refused in one line.
What the workers run comes after the tests, at the end of the file.
"""

import inspect
import re
import weakref
from contextlib import nullcontext
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import checkpoint as C
import model as M
import parallel as P
import planner
from distributed import record_collectives, saved_bytes_of_layer, spawn, tally
from p2p_rules import Recorder

pytestmark = pytest.mark.slow

WORLD = 4
STEPS, GLOBAL_BATCH, SEQ, LR, CLIP = 6, 8, 16, 1e-2, 1.0


def tiny(kv_heads: int) -> M.ModelArgs:
    return M.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads, vocab_size=256,
                       multiple_of=32, max_seq_len=SEQ)


def close(actual, expected, what, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# --- 1. operators and layers -------------------------------------------------------------------

def test_collectives_and_operators_match_closed_forms(layers):
    """On a tp group of n, rank r's inputs (operator_inputs) are r + 1, or its slice of the
    positions 0..4n-1 along T, so that every answer is a closed form of n and r."""
    for rank in range(WORLD):
        for n in (2, 4):
            got, r, what = layers[rank]["operators", n], rank % n, f"tp={n}, rank {rank}"
            x = operator_inputs(n, r)
            total = n * (n + 1) / 2                                   # the sum of r + 1
            pos = torch.arange(4 * n).float()[None, :, None]          # (1, T, 1), T = 4n
            owner = torch.arange(n).float().repeat_interleave(4)[None, :, None]   # of each position
            mine = slice(4 * r, 4 * r + 4)                            # rank r's T/n positions
            close(got["all_reduce"], torch.full((3,), total), f"all_reduce, {what}")
            close(got["all_gather"], torch.arange(n).float().repeat_interleave(3)[None, :, None]
                  .expand(2, -1, 5), f"all_gather along dim 1, {what}")
            close(got["reduce_scatter"], x["reduce_scatter"][:, mine] / (r + 1) * total,
                  f"reduce_scatter along dim 1, {what}")
            # f: identity forward, sum of the ranks' gradients (r + 1 each) backward
            close(got["f"][0], x["f"][0], f"f forward, {what}")
            close(got["f"][1], torch.full((2, 4 * n, 3), total), f"f backward, {what}")
            # g: sum forward, identity backward
            close(got["g"][0], torch.full((2, 4 * n, 3), total), f"g forward, {what}")
            close(got["g"][1], pos.expand(2, -1, 3), f"g backward, {what}")
            # f_sp: all-gather along T forward, reduce-scatter backward
            close(got["f_sp"][0], (pos * 10 + owner).expand(2, -1, 3), f"f_sp forward, {what}")
            close(got["f_sp"][1], (pos[:, mine] * total).expand(2, 4, 3), f"f_sp backward, {what}")
            # g_sp: reduce-scatter along T forward, all-gather backward
            close(got["g_sp"][0], (pos[:, mine] * total).expand(2, 4, 3), f"g_sp forward, {what}")
            close(got["g_sp"][1], (owner + 1).expand(2, -1, 3), f"g_sp backward, {what}")


LAYER_CONFIGS = [(2, False, True), (2, True, True), (4, False, True), (4, True, True),
                 (2, True, False), (4, False, False)]    # (tp, sp, tp_overlap); False: plain


def test_parallel_layers_match_unsharded_modules(layers):
    """Attention, FFN, embedding, and output + loss, each alone, both passes, against the full
    modules in this process: outputs and input gradients at this rank's positions (its T/tp
    under sp), logits and weight gradients at its slice, in Meta's split but for the embedding
    (by vocabulary rows); the loss all-reduces N numbers three times, never the N x V logits."""
    for tp, sp, tp_overlap in LAYER_CONFIGS:
        args = tiny(kv_heads=tp)
        want = both_passes(perturbed_model(args), *layer_inputs(args), plain_loss)
        for rank in range(WORLD):
            got, r = layers[rank]["layers", tp, sp, tp_overlap], rank % tp
            what = f"tp={tp} sp={sp} tp_overlap={tp_overlap}, rank {rank}"
            mine = (lambda t: t.chunk(tp, 1)[r]) if sp else (lambda t: t)
            for name, ref in want.items():
                if name == "output":
                    assert got[name]["out"].shape == (2, SEQ, args.vocab_size // tp), what
                    close(got[name]["out"], C.piece(ref["out"], 2, tp, r), f"logits, {what}")
                else:
                    close(got[name]["out"], mine(ref["out"]), f"{name} forward, {what}")
                if "dx" in ref:
                    close(got[name]["dx"], mine(ref["dx"]), f"{name} input grad, {what}")
                for key, grad in ref["grads"].items():
                    dim = 0 if key.startswith("tok_embeddings") else C.shard_dim(key)
                    close(got[name]["grads"][key], C.piece(grad, dim, tp, r), f"{key}, {what}")
            close(got["output"]["loss"], want["output"]["loss"], f"loss, {what}")
            assert got["output"]["calls"] == [("tp", "all_reduce", 2 * SEQ * 4)] * 3, what


OVERLAP_CONFIGS = [(tp, sp, amp) for tp in (2, 4) for sp in (False, True) for amp in (False, True)]


def test_overlapped_and_plain_tp_backwards_give_equal_gradients(layers):
    """The whole model, forward and backward, with the column linears' backward overlapped
    (ColumnParallelLinears) and plain (f, f_sp): the same loss, bit for bit (the forwards are the
    same products), and the same gradients of every weight on every rank. They differ only in
    the order in which the input gradients of wq wk wv (w1 w3) are summed: in fp32 by 1e-6 of
    the largest, under bf16 autocast by less than twice what bf16 itself changes (the plain
    version's gradients in bf16 against fp32; the two measure 0.86 of it at most)."""
    for tp, sp, amp in OVERLAP_CONFIGS:
        for rank in range(WORLD):
            overlapped, plain = (layers[rank]["whole model", tp, sp, amp, o] for o in (True, False))
            fp32 = layers[rank]["whole model", tp, sp, False, False]
            what = f"tp={tp} sp={sp} {'bf16' if amp else 'fp32'}, rank {rank}"
            assert torch.equal(overlapped["loss"], plain["loss"]), what
            assert list(overlapped["grads"]) == list(plain["grads"]), what
            for name, grad in plain["grads"].items():
                got = overlapped["grads"][name]
                assert grad.abs().max() > 0, f"{name}, {what}: no gradient"
                if amp:
                    bf16_noise = (grad - fp32["grads"][name]).norm()
                    assert 0 < bf16_noise and (got - grad).norm() <= 2 * bf16_noise, \
                        f"{name}, {what}: {(got - grad).norm()} against bf16's {bf16_noise}"
                else:
                    close(got, grad, f"{name}, {what}", rtol=0, atol=1e-6 * grad.abs().max())


def test_column_backward_overlaps_its_collectives_with_weight_gradients(layers):
    """One backward at tp 2, in the order it ran: the tp collectives (blocking, or started and
    waited), and each matrix product, a weight gradient or another. In the overlapped version
    each region's reduction of its input gradient (an all-reduce; under sp a reduce-scatter) is
    started before its weight gradients and waited after them all: output 1, then per layer
    from the last FFN 2 (w1 w3), attention 3 (wq wk wv). Under sp the kept shard's all-gather is
    started before the input gradient's products and waited before the weight gradients. The
    plain version blocks in each reduction, after its products."""
    regions = [1, 2, 3, 2, 3]                                  # weight gradients per region
    for sp in (False, True):
        reduce = "reduce_scatter" if sp else "all_reduce"
        events = layers[0]["backward order", sp, True]
        starts = [i for i, e in enumerate(events) if e == f"start tp {reduce}"]
        waits = [i for i, e in enumerate(events) if e == f"wait tp {reduce}"]
        assert len(starts) == len(waits) == len(regions), events
        for start, wait, n in zip(starts, waits, regions):
            between = events[start + 1:wait]
            assert between.count("weight grad") == n, (start, wait, events)
            assert not any(e.startswith(("start", "wait", "tp")) for e in between), between
        if sp:
            gathers = [i for i, e in enumerate(events) if e == "start tp all_gather"]
            assert len(gathers) == len(regions), events
            for gather, start in zip(gathers, starts):
                wait = events.index("wait tp all_gather", gather)
                assert "product" in events[gather:wait] and wait < start, events[gather:start]
                assert "weight grad" not in events[gather:start], events[gather:start]
        else:
            assert not any(e.startswith("tp ") for e in events), events     # g backward: none
        plain = layers[0]["backward order", sp, False]
        assert not any(e.startswith(("start", "wait")) for e in plain), plain
        reductions = [i for i, e in enumerate(plain) if e == f"tp {reduce}"]
        grads = [i for i, e in enumerate(plain) if e == "weight grad"]
        assert len(reductions) == len(regions) and len(grads) == sum(regions), plain
        done = 0                          # the plain reduction comes after its region's products
        for reduction, n in zip(reductions, regions):
            done += n
            assert grads[done - 1] < reduction, plain


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_loss_ignores_targets_of_minus_100_as_f_cross_entropy(request, tp):
    """Targets equal to -100 are left out of the sum and the count, at every tp, as
    F.cross_entropy's ignore_index: the loss, and the gradient of this rank's logits."""
    z, t = ignored_targets_inputs()
    leaf = z.clone().requires_grad_()
    want = F.cross_entropy(leaf.flatten(0, 1), t.flatten())
    want.backward()
    assert (t == -100).sum() == 8 and want.item() != F.cross_entropy(
        z.flatten(0, 1), t.flatten().clamp(min=0)).item()              # the ignored ones matter
    got = [ignored_targets_loss(P.Grid())] if tp == 1 else [   # tp 1 here, the others on workers
        request.getfixturevalue("layers")[rank]["ignored targets", tp] for rank in range(WORLD)]
    for rank, (loss, grad) in enumerate(got):
        close(loss, want.detach(), f"loss at tp {tp}, rank {rank}", rtol=1e-6)
        close(grad, C.piece(leaf.grad, 2, tp, rank % tp), f"gradient at tp {tp}, rank {rank}",
              rtol=1e-5, atol=1e-7)


def test_launch_variables_that_torchrun_would_not_set_are_refused_in_one_line(monkeypatch):
    """Processes started by other means: a WORLD_SIZE above 1 without RANK would make every
    process rank 0 (and the second's rendezvous be blamed on another job); a variable that is no
    whole number would end in int()'s words. Neither asks torchrun to stop: it did not start
    them."""
    for name in ("RANK", "LOCAL_RANK", "MASTER_PORT", "TORCHELASTIC_MAX_RESTARTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError) as e:
        P.launcher()
    assert str(e.value) == ("WORLD_SIZE=2 is set but RANK is not: each process needs its own; "
                            "launch with torchrun")
    monkeypatch.setenv("RANK", "1")
    assert (P.launcher()["rank"], P.launcher()["local_rank"]) == (1, 0)
    for name, value in (("WORLD_SIZE", ""), ("MASTER_PORT", "29500x")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError) as e:
            P.launcher()
        assert str(e.value) == (f"{name}={value!r} is not a whole number; set it as torchrun "
                                "does, or launch with torchrun")
        P.stop_restarts()                        # returns: no torchrun agent to ask
        monkeypatch.setenv(name, "2")


def test_a_second_loss_of_the_same_logits_raises():
    """loss_fn writes over its logits (parallel.CrossEntropy): a second loss of them, or of a
    view of them, raises instead of giving the loss of what is left there."""
    torch.manual_seed(0)
    z, t = 4 * torch.randn(4, 8, 32), torch.randint(0, 32, (4, 8))
    want = F.cross_entropy(z.flatten(0, 1), t.flatten()).item()
    logits = z.clone()
    assert P.loss_fn(logits, t, P.Grid()).item() == pytest.approx(want, rel=1e-6)
    left = F.cross_entropy(logits.flatten(0, 1), t.flatten()).item()    # what a second reads
    assert abs(left - want) > 0.1, (left, want)
    for again in (logits, logits[:2], logits.view(32, 1, 32)):
        with pytest.raises(RuntimeError, match="overwritten by an earlier loss; compute them"):
            P.loss_fn(again, t.view(again.shape[:2]) if again.shape[1] == 1 else t[:len(again)],
                      P.Grid())
    for _ in range(2):                                              # each loss its own copy
        assert P.loss_fn(z.clone(), t, P.Grid()).item() == pytest.approx(want, rel=1e-6)


# --- 2. training equals one process -------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """One parallel configuration of tiny(kv_heads): tp ranks share one model, and the ranks of
    the 4 workers that tp leaves over are data parallel. Each list below sets the fields it
    varies."""
    name: str
    tp: int
    kv_heads: int                     # tp must divide it
    sp: bool = False
    recompute: str = "none"
    overlap: bool = True              # bucketed all-reduces launched in backward; False: naive dp
    backward_in_no_sync: bool = True  # False: DDP's other idiom, the forward alone in no_sync()
    tp_overlap: bool = True           # False: the plain tp backward (f, f_sp; sp saves the
                                      # gathered input, not its shard)
    bf16: bool = False                # under bf16 autocast


CONFIGS = [
    Config("tp4+sp", tp=4, kv_heads=4, sp=True),
    Config("tp4", tp=4, kv_heads=4),
    Config("dp2 x tp2+sp", tp=2, kv_heads=2, sp=True),
    Config("dp2 x tp2", tp=2, kv_heads=2),
    Config("dp4", tp=1, kv_heads=2),
    Config("dp4, forward-only no_sync", tp=1, kv_heads=2, backward_in_no_sync=False),
    Config("dp2 x tp2+sp naive dp", tp=2, kv_heads=2, sp=True, overlap=False),
    Config("tp4+sp plain tp", tp=4, kv_heads=4, sp=True, tp_overlap=False),
    Config("dp2 x tp2 plain tp", tp=2, kv_heads=2, tp_overlap=False),
    Config("dp2 x tp2+sp selective", tp=2, kv_heads=2, sp=True, recompute="selective"),
    Config("dp2 x tp2+sp full", tp=2, kv_heads=2, sp=True, recompute="full"),
    Config("dp2 x tp2 selective", tp=2, kv_heads=2, recompute="selective"),
    Config("tp4+sp selective", tp=4, kv_heads=4, sp=True, recompute="selective"),
    Config("dp4 selective", tp=1, kv_heads=2, recompute="selective"),
    Config("dp4 full", tp=1, kv_heads=2, recompute="full"),
]


def test_training_losses_equal_one_process(trained):
    refs = {kv: reference(tiny(kv)) for kv in (2, 4)}
    for kv, (losses, _) in refs.items():
        assert losses[-1] < losses[0] - 1.0, "the reference must learn, or equality proves little"
    for config in CONFIGS:
        ref_losses, ref_norms = refs[config.kv_heads]
        for rank in range(WORLD):
            losses, norms = trained[rank][config.name]
            what = f"{config.name}, rank {rank}"
            assert losses == pytest.approx(ref_losses, rel=1e-4), f"{what}: losses"
            assert norms == pytest.approx(ref_norms, rel=1e-4), f"{what}: grad norms"


def test_naive_and_bucketed_data_parallel_give_equal_gradients(trained):
    for rank in range(WORLD):
        naive, bucketed = trained[rank]["naive grads"], trained[rank]["bucketed grads"]
        assert sum(g.pow(2).sum().item() for g in bucketed) > 0
        assert max((a - b).abs().max().item() for a, b in zip(naive, bucketed)) < 1e-7, rank


def test_first_bucket_all_reduce_starts_before_backward_reaches_first_layer(trained):
    events = trained[0]["events"]
    dp_launches = [i for i, e in enumerate(events) if e == "dp all_reduce"]
    reach_first = events.index("backward reaches layers[0]")
    assert trained[0]["buckets"] >= 3 and len(dp_launches) == trained[0]["buckets"]
    assert dp_launches[0] < reach_first, events
    assert sum(i < reach_first for i in dp_launches) >= 2, events     # several, overlapping
    assert dp_launches[-1] < events.index("backward done"), events    # all launched in backward


def test_leaving_the_process_group_frees_every_group():
    """After training (GradSync's hooks, the tp regions), P.destroy leaves no group alive: a gloo
    group still alive at interpreter exit, after the destroy, can abort a finished run (exit -6)."""
    assert spawn(worker_leaving, WORLD) == [{"tp": True, "dp": True}] * WORLD


# --- 3. accounting and checkpoints --------------------------------------------------------------

# The activation bytes of one layer: at tp 1 in this process (the plain model), the rest on the
# workers, each in fp32 and under bf16 autocast.
ONE_PROCESS_ACTIVATION_CONFIGS = [Config(mode, tp=1, kv_heads=2, recompute=mode)
                                  for mode in ("none", "selective", "full")]
ACTIVATION_CONFIGS = [
    Config("tp", tp=2, kv_heads=2),
    Config("tp+sp", tp=2, kv_heads=2, sp=True),
    Config("tp+sp plain", tp=2, kv_heads=2, sp=True, tp_overlap=False),
    Config("tp+sp+selective", tp=2, kv_heads=2, sp=True, recompute="selective"),
    Config("tp+sp+full", tp=2, kv_heads=2, sp=True, recompute="full"),
    Config("tp+selective", tp=2, kv_heads=2, recompute="selective"),
    Config("tp4+sp", tp=4, kv_heads=4, sp=True),
    Config("tp4+sp+selective", tp=4, kv_heads=4, sp=True, recompute="selective"),
]
# The collectives of one optimizer step (accum 2). Under bf16 the activations cross the wire in
# bf16; the gradients stay fp32.
COMM_CONFIGS = [
    Config("dp2 x tp2", tp=2, kv_heads=2),
    Config("dp2 x tp2 full", tp=2, kv_heads=2, recompute="full"),
    Config("dp2 x tp2+sp", tp=2, kv_heads=2, sp=True),
    Config("dp2 x tp2+sp selective", tp=2, kv_heads=2, sp=True, recompute="selective"),
    Config("dp2 x tp2+sp full", tp=2, kv_heads=2, sp=True, recompute="full"),
    Config("dp2 x tp2+sp naive dp", tp=2, kv_heads=2, sp=True, overlap=False),
    Config("dp2 x tp2+sp plain tp", tp=2, kv_heads=2, sp=True, tp_overlap=False),
    Config("tp4+sp", tp=4, kv_heads=4, sp=True),
    Config("dp4", tp=1, kv_heads=2),
    Config("dp2 x tp2 bf16", tp=2, kv_heads=2, bf16=True),
    Config("dp2 x tp2+sp selective bf16", tp=2, kv_heads=2, sp=True, recompute="selective",
           bf16=True),
]
ACC_BATCH = 2


def test_activation_bytes_measured_equal_prediction(accounted):
    # fp32, and bf16 autocast: activations in bf16, as Megatron keeps them (model.activation_dtype)
    tokens = batches(tiny(2))[0][:ACC_BATCH, :-1]
    measured = {}                                    # (name, amp) -> bytes, every rank's
    for config in ONE_PROCESS_ACTIVATION_CONFIGS + ACTIVATION_CONFIGS:
        for amp in (False, True):
            want = planner.activation_bytes_per_layer(
                tiny(config.kv_heads), ACC_BATCH, SEQ, tp=config.tp, sp=config.sp,
                recompute=config.recompute, tp_overlap=config.tp_overlap,
                bytes_per_el=2 if amp else 4)
            if config.tp == 1:                       # in this process, the plain model
                torch.manual_seed(0)
                model = M.Transformer(tiny(config.kv_heads))
                P.apply_recompute(model, config.recompute)
                by = {"this process": saved_bytes_of_layer(model, tokens, amp=amp)}
            else:
                by = {f"rank {r}": accounted[r]["activations"][config.name, amp]
                      for r in range(WORLD)}
            for who, nbytes in by.items():
                assert nbytes == want, (f"{config.name}, {'bf16' if amp else 'fp32'}, {who}: "
                                        f"measured {nbytes}, predicted {want}")
            measured[config.name, amp] = nbytes
    for amp in (False, True):
        assert measured["none", amp] > measured["tp", amp] > measured["tp+sp", amp] > \
            measured["tp+sp+selective", amp] > measured["tp+sp+full", amp]
        assert measured["tp+sp plain", amp] > measured["tp+sp", amp]    # the kept shard saves
    assert measured["tp+sp", True] < 0.6 * measured["tp+sp", False]          # bf16 nearly halves it


def test_collective_calls_and_bytes_equal_prediction(accounted):
    for config in COMM_CONFIGS:
        want = planner.comm_per_step(tiny(config.kv_heads), ACC_BATCH, SEQ, tp=config.tp,
                                     dp=WORLD // config.tp, sp=config.sp,
                                     recompute=config.recompute, micro_batches=2, bucket_mb=0.05,
                                     overlap=config.overlap, tp_overlap=config.tp_overlap,
                                     bytes_per_el=2 if config.bf16 else 4)
        for rank in range(WORLD):
            got = accounted[rank]["comm"][config.name]
            what = f"{config.name}, rank {rank}"
            assert set(got) == set(want), f"{what}: {got} vs {want}"
            for key, (calls, payload) in want.items():
                got_calls, got_payload = got[key]
                assert got_calls == calls, f"{what}, {key}: {got_calls} calls, not {calls}"
                assert abs(got_payload - payload) <= 0.05 * payload, \
                    f"{what}, {key}: {got_payload} bytes, not {payload} within 5%"


def test_checkpoint_saved_at_tp2_loads_at_tp4_and_tp1(accounted):
    expected = perturbed_model(tiny(4))
    state = expected.state_dict()
    merged = accounted[0]["merged"]
    assert set(merged) == set(state)
    for key, t in state.items():
        assert torch.equal(merged[key], t), key                   # saving lost nothing
        assert torch.equal(accounted[0]["full"][key], t), key     # full_state_dict, the same
    assert all(accounted[r]["full"] is None for r in range(1, WORLD))
    meta_split = C.split_state_dict(state, 2)                     # each file is Meta's shard
    for rank in range(WORLD):
        tp_rank = rank % 2
        for key, t in meta_split[tp_rank].items():
            assert torch.equal(accounted[rank]["shard"][key], t), (rank, key)
    plain = M.Transformer(tiny(4))
    plain.load_state_dict(C.meta_weights(merged))
    tokens = batches(tiny(2))[0][:ACC_BATCH, :-1]
    with torch.no_grad():
        logits = plain(tokens)
    for rank in range(WORLD):
        close(accounted[rank]["logits at tp 4"], logits, "tp 2 checkpoint run at tp 4")
        close(accounted[rank]["logits at tp 2"], logits, "tp 2 model against tp 1")


# --- in this process ----------------------------------------------------------------------------

def test_recompute_modes_give_equal_gradients_with_random_ops():
    """A dropout inside the recomputed regions draws the same mask twice: gradients agree."""
    args, tokens = tiny(2), batches(tiny(2))[0][:2]
    loss, rng_after, grads = {}, {}, {}
    for mode in ("none", "selective", "full", "no dropout"):
        torch.manual_seed(0)
        model = M.Transformer(args)
        for layer in model.layers:
            if mode != "no dropout":
                core = layer.attention.core
                layer.attention.core = lambda q, k, v, core=core: F.dropout(core(q, k, v), 0.3)
        P.apply_recompute(model, "none" if mode == "no dropout" else mode)
        assert all(layer.feed_forward.manual_backward == (mode == "selective")   # its one writer
                   for layer in model.layers)
        torch.manual_seed(1)
        step_loss = P.loss_fn(model(tokens[:, :-1]), tokens[:, 1:], P.Grid())
        step_loss.backward()
        loss[mode], rng_after[mode] = step_loss.item(), torch.rand(()).item()
        grads[mode] = [p.grad for p in model.parameters()]
    for mode in ("selective", "full"):
        assert loss[mode] == loss["none"], mode
        assert rng_after[mode] == rng_after["none"], f"{mode}: the RNG stream after the step"
        for a, b in zip(grads[mode], grads["none"]):
            close(a, b, f"{mode} recompute grads")
    assert loss["no dropout"] != loss["none"]                     # the dropout did something


def test_single_process_degrades_to_the_plain_model():
    world = P.init_distributed(device="cpu")
    grid = P.make_grid(world)
    assert (grid.tp, grid.dp, grid.pp, grid.tp_group, grid.dp_group) == (1, 1, 1, None, None)
    args, tokens = tiny(2), batches(tiny(2))[0][:2]
    torch.manual_seed(0)
    plain = M.Transformer(args)
    torch.manual_seed(0)
    model = P.parallelize(M.Transformer(args), grid, sp=True)
    assert all(type(a) is type(b) for a, b in zip(plain.modules(), model.modules()))
    sync = P.GradSync(model, grid)
    for m in (plain, model):
        P.loss_fn(m(tokens[:, :-1]), tokens[:, 1:], grid).backward()
    sync.finish()
    norm = P.clip_grad_norm(model, CLIP, grid)
    assert norm == pytest.approx(torch.nn.utils.clip_grad_norm_(plain.parameters(), CLIP).item())
    for a, b in zip(model.parameters(), plain.parameters()):
        close(a.grad, b.grad, "tp=1 gradients")
    P.destroy(world)


@pytest.mark.parametrize("N,V", [(6, 10), (600, 1025)])      # one row block; 2^18 // V = 255
def test_loss_is_the_mean_negative_log_softmax(N, V):
    """P.loss_fn at tp=1 against the definition written out in float64: the mean over tokens of
    -log softmax(z)[target], and its gradient (softmax(z) - onehot(target)) / N. After backward
    the logits hold that gradient: the loss writes it over them (parallel.CrossEntropy)."""
    torch.manual_seed(0)
    z, t = 5 * torch.randn(N, V, dtype=torch.float64), torch.randint(0, V, (N,))
    log_softmax = z - z.exp().sum(-1, keepdim=True).log()
    leaf = z.clone().requires_grad_()
    logits = leaf * 1                                   # not a leaf, as the model's output
    loss = P.loss_fn(logits[None], t[None], P.Grid())
    close(loss, -log_softmax.gather(1, t[:, None]).mean(), "loss")
    loss.backward()
    close(leaf.grad, (z.softmax(-1) - F.one_hot(t, V)) / N, "gradient")
    assert torch.equal(logits.detach(), leaf.grad)


def recompute_twice(model):
    P.apply_recompute(model, "full")
    P.apply_recompute(model, "none")


@pytest.mark.parametrize("call,message", [
    (lambda: P.check_config(M.preset("tiny"), 3), "tp=3 must divide n_heads=8; use one of 1, 2, 4"),
    (lambda: P.check_config(tiny(2), 4), "tp=4 must divide n_kv_heads=2; use one of 1, 2"),
    (lambda: P.check_config(M.ModelArgs(dim=64, n_heads=4, vocab_size=250, multiple_of=32), 4),
     "tp=4 must divide vocab_size=250"),
    (lambda: P.check_config(tiny(2), 2, sp=True, seq_len=15), "seq_len=15 is not divisible"),
    (lambda: P.make_grid(P.Dist(rank=0, world_size=6), tp=4), "world size 6 is not divisible"),
    (lambda: P.apply_recompute(M.Transformer(tiny(2)), "some"), "choose none, selective or full"),
    (lambda: recompute_twice(M.Transformer(tiny(2))), "'full' is already applied"),
    (lambda: P.parallelize(P.parallelize(M.Transformer(tiny(2)), P.Grid()), P.Grid()),
     "already parallelized; build a fresh one"),
])
def test_bad_input_is_refused_in_one_line(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_presets_admit_tp_1_2_4():
    for tp in (1, 2, 4):
        P.check_config(M.preset("tiny"), tp, sp=True, seq_len=M.preset("tiny").max_seq_len)


def test_parallelize_follows_the_table(monkeypatch):
    """TP_PLAN drives parallelize(): a module taken out of the table stays whole (replicated)."""
    plan = {key: swaps for key, swaps in P.TP_PLAN.items() if key != "layers.*.feed_forward"}
    monkeypatch.setattr(P, "TP_PLAN", plan)
    model = P.parallelize(M.Transformer(tiny(2)), P.Grid(tp=2))  # building needs no process group
    for layer in model.layers:
        assert type(layer.feed_forward.w1) is M.Linear
        assert type(layer.attention.wo) is P.RowParallelLinear
        assert layer.attention.wq.weight.shape == (tiny(2).dim // 2, tiny(2).dim)
    assert type(model.tok_embeddings) is P.VocabParallelEmbedding
    assert type(model.output) is P.ColumnParallelLinear


class CountCopies(TorchDispatchMode):
    """Counts the tensors copied into a new layout (`.contiguous()` of a moved view)."""
    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.copies += func is torch.ops.aten.clone.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batch,copies", [(2, 2), (1, 0)])
def test_sequence_collectives_copy_input_and_result_along_t_except_at_batch_1(
        monkeypatch, batch, copies):
    """Section 2's PERF note: gathering or scattering T, dim 1 of (B, T, D), copies the input
    into (T, B, D) order and the result back; at B = 1 both moves are views. A group of one
    stands in for the collective (it copies nothing of its own)."""
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(dist, "all_gather_single", lambda out, x, **kw: out.set_(x))
    monkeypatch.setattr(dist, "reduce_scatter_single", lambda out, x, **kw: out.set_(x))
    x = torch.randn(batch, 4, 3)                                            # (B, T, D)
    for collective in (P.all_gather, P.reduce_scatter):
        with CountCopies() as counted:
            y = collective(x, 1, None)
        assert counted.copies == copies and torch.equal(y, x), collective.__name__


# PAPER: PTD-P's (arXiv 2104.04473) figures: what each shows, and the section drawn from it.
PTD_P_FIGURES = {
    "3": ("2.2.1", "GPipe's pipeline schedule"),
    "4": ("2.2.2", "the 1F1B schedule, default and interleaved"),
    "5": ("2.3", "tensor model parallelism: f and g are conjugate"),
}


def test_ptd_p_figures_are_cited_from_the_sections_that_show_them():
    """A citation [PTD-P §s, Fig. n] names the paper's figure n and its section s: the f/g
    operators are Fig. 5 of §2.3 (Fig. 3 is GPipe's schedule)."""
    source = inspect.getsource(P).replace("\n#", "")     # a citation may break across lines
    cited = re.findall(r"\[PTD-P §([\d.]+),\s+Fig\. (\d+)\]", source)
    assert ("2.3", "5") in cited
    for section, figure in cited:
        assert PTD_P_FIGURES[figure][0] == section, (section, figure)


# --- what the workers run, and the one-process reference ---------------------------------------

def batches(args, steps=STEPS):
    """The global batch of every training step, (steps, GLOBAL_BATCH, SEQ + 1) tokens: one fixed
    batch, repeated, so that the model learns it (random tokens would leave the loss at log V)."""
    gen = torch.Generator().manual_seed(1234)
    batch = torch.randint(0, args.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    return batch.expand(steps, -1, -1)


def perturbed_model(args, seed=0):
    """The seeded model with its norms and matrices moved off their initial values."""
    torch.manual_seed(seed)
    model = M.Transformer(args)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return model


def operator_inputs(n: int, r: int) -> dict:
    """Rank r's inputs on a tp group of n (and, for the operators, the gradient dy that flows
    back into their output): r + 1, its slice of the positions 0..4n-1 along T, or both."""
    pos = torch.arange(4 * n).float()[None, :, None]              # (1, T, 1), T = 4n
    return {"all_reduce": torch.full((3,), r + 1.0),
            "all_gather": torch.full((2, 3, 5), float(r)),
            "reduce_scatter": torch.arange(2 * 4 * n * 3).float().view(2, 4 * n, 3) * (r + 1),
            "f": (torch.randn(2, 4 * n, 3, generator=torch.Generator().manual_seed(0)), r + 1.0),
            "g": (torch.full((2, 4 * n, 3), r + 1.0), pos),
            "f_sp": ((pos[:, 4 * r:4 * r + 4] * 10 + r).expand(2, 4, 3), pos * (r + 1)),
            "g_sp": ((pos * (r + 1)).expand(2, -1, 3), r + 1.0)}


def measure_operators(grid) -> dict:
    """The collectives' answers; each operator's output and input gradient, both passes."""
    x, group = operator_inputs(grid.tp, grid.tp_rank), grid.tp_group
    out = {"all_reduce": P.all_reduce(x["all_reduce"].clone(), group),
           "all_gather": P.all_gather(x["all_gather"], 1, group),
           "reduce_scatter": P.reduce_scatter(x["reduce_scatter"], 1, group)}
    for name in ("f", "g", "f_sp", "g_sp"):
        xr, dy = x[name][0].clone().requires_grad_(), x[name][1]
        y = getattr(P, name).apply(xr, group)
        (y * dy).sum().backward()
        out[name] = (y.detach(), xr.grad)
    return out


def layer_inputs(args):
    """The activations x (B, T, D), the gradient dy that flows back into a module's output, and
    the tokens (B, T+1) of test_parallel_layers_match_unsharded_modules."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, SEQ, args.dim, generator=gen)
    dy = torch.randn(2, SEQ, args.dim, generator=gen)
    return x, dy, torch.randint(0, args.vocab_size, (2, SEQ + 1), generator=gen)


def plain_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def both_passes(model, x, dy, tokens, loss_fn) -> dict:
    """Each module alone, forward and backward: layers[0]'s attention and FFN on x with dy back,
    the embedding on the tokens with dy back, the output on x with loss_fn's gradient back.
    {module: its output, its input's gradient (dx), its weights' gradients (Meta's keys)}."""
    cos, sin, out = model.rope_cos[:SEQ], model.rope_sin[:SEQ], {}
    for name, extra in (("layers.0.attention", (cos, sin)), ("layers.0.feed_forward", ()),
                        ("output", ())):
        module, xr = model.get_submodule(name), x.clone().requires_grad_()
        y = module(xr, *extra)
        out[name] = dict(out=y.detach().clone())                  # the loss overwrites logits
        if name == "output":
            loss = loss_fn(y, tokens[:, 1:])
            out[name]["loss"] = loss.detach()
            loss.backward()
        else:
            (y * dy).sum().backward()
        out[name].update(dx=xr.grad, grads={f"{name}.{key}": p.grad
                                            for key, p in module.named_parameters()})
    emb = model.tok_embeddings(tokens[:, :-1])
    (emb * dy).sum().backward()
    out["tok_embeddings"] = dict(out=emb.detach(), grads={
        "tok_embeddings.weight": model.tok_embeddings.weight.grad})
    return out


def recorded_loss(grid, calls):
    """P.loss_fn over grid's tp group, each collective it launches logged into calls."""
    def loss_fn(logits, targets):
        with record_collectives(grid, calls):
            return P.loss_fn(logits, targets, grid)
    return loss_fn


def ignored_targets_inputs():
    """Logits (2, T, 256) and their targets, 8 of them -100 (ignored)."""
    gen = torch.Generator().manual_seed(3)
    z = 3 * torch.randn(2, SEQ, 256, generator=gen)
    t = torch.randint(0, 256, (2, SEQ), generator=gen)
    t[0, :5], t[1, -3:] = -100, -100
    return z, t


def ignored_targets_loss(grid):
    """P.loss_fn on this rank's vocabulary slice of ignored_targets_inputs: loss, its gradient."""
    z, t = ignored_targets_inputs()
    leaf = C.piece(z, 2, grid.tp, grid.tp_rank).clone().requires_grad_()
    loss = P.loss_fn(leaf * 1, t, grid)             # leaf * 1: the loss writes over its input
    loss.backward()
    return loss.detach(), leaf.grad


def whole_model_gradients(grid, sp, amp, tp_overlap):
    """Loss and gradients (by name) of one forward and backward of the whole model."""
    args = tiny(kv_heads=grid.tp)
    tokens = batches(args)[0][:2]
    model = P.parallelize(perturbed_model(args), grid, sp=sp, tp_overlap=tp_overlap)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = P.loss_fn(model(tokens[:, :-1]), tokens[:, 1:], grid)
    loss.backward()
    return dict(loss=loss.detach(), grads={n: p.grad for n, p in model.named_parameters()})


class Products(TorchDispatchMode):
    """Appends the shape of each matrix product (aten.mm) to a list, in the order they run."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.mm.default:
            self.log.append(tuple(out.shape))
        return out


def backward_order(grid, sp, tp_overlap):
    """One backward at tp 2 (3 sequences: no product's output has a weight's shape by chance),
    as events: "tp all_reduce" (blocking), "start tp all_reduce" and "wait tp all_reduce"
    (asynchronous), "weight grad" (a product of a column weight's shape), "product"."""
    args = tiny(kv_heads=grid.tp)
    tokens = batches(args)[0][:3]
    model = P.parallelize(perturbed_model(args), grid, sp=sp, tp_overlap=tp_overlap)
    columns = {tuple(m.weight.shape) for m in model.modules()
               if isinstance(m, P.ColumnParallelLinear)}
    loss = P.loss_fn(model(tokens[:, :-1]), tokens[:, 1:], grid)
    log = []
    with Recorder(log), Products(log):
        loss.backward()

    def name(call):
        axis = "tp" if call.group == grid.tp_group.group_name else call.group
        return f"{axis} {call.op.replace('_single', '')}"
    return [("weight grad" if e in columns else "product") if isinstance(e, tuple)
            else f"wait {name(log[e.waits])}" if e.op == "wait"
            else ("" if e.blocking else "start ") + name(e) for e in log]


def worker_operators_and_layers():
    world = P.init_distributed(device="cpu")
    try:
        grids = {tp: P.make_grid(world, tp=tp) for tp in (2, 4)}
        out = {("operators", tp): measure_operators(grid) for tp, grid in grids.items()}
        for tp, sp, tp_overlap in LAYER_CONFIGS:
            grid, args, calls = grids[tp], tiny(kv_heads=tp), []
            x, dy, tokens = layer_inputs(args)
            mine = (lambda t: t.chunk(tp, 1)[grid.tp_rank]) if sp else (lambda t: t)
            model = P.parallelize(perturbed_model(args), grid, sp=sp, tp_overlap=tp_overlap)
            measured = both_passes(model, mine(x), mine(dy), tokens, recorded_loss(grid, calls))
            measured["output"]["calls"] = calls
            out["layers", tp, sp, tp_overlap] = measured
        for tp, sp, amp in OVERLAP_CONFIGS:
            for tp_overlap in (True, False):
                out["whole model", tp, sp, amp, tp_overlap] = whole_model_gradients(
                    grids[tp], sp, amp, tp_overlap)
        for sp in (False, True):
            for tp_overlap in (True, False):
                out["backward order", sp, tp_overlap] = backward_order(grids[2], sp, tp_overlap)
        for tp in (2, 4):
            out["ignored targets", tp] = ignored_targets_loss(grids[tp])
        return out
    finally:
        P.destroy(world)


@pytest.fixture(scope="module")
def layers():
    return spawn(worker_operators_and_layers, WORLD)


def train(config, grid, accum=2, bucket_mb=0.05):
    """AdamW steps on the fixed global batch; each dp rank takes its rows, in micro-batches."""
    args = tiny(config.kv_heads)
    torch.manual_seed(0)
    model = P.parallelize(M.Transformer(args), grid, sp=config.sp, tp_overlap=config.tp_overlap)
    P.apply_recompute(model, config.recompute)
    sync = P.GradSync(model, grid, bucket_mb=bucket_mb, overlap=config.overlap)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    losses, norms = [], []
    for batch in batches(args):
        rows, total = batch.chunk(grid.dp)[grid.dp_rank], torch.zeros(())
        for i, micro in enumerate(rows.chunk(accum)):
            with sync.no_sync() if i < accum - 1 else nullcontext():
                loss = P.loss_fn(model(micro[:, :-1]), micro[:, 1:], grid) / accum
                if config.backward_in_no_sync:
                    loss.backward()
            if not config.backward_in_no_sync:
                loss.backward()
            total += loss.detach()
        sync.finish()
        norms.append(P.clip_grad_norm(model, CLIP, grid))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if grid.dp > 1:                                          # for logging only
            total = P.all_reduce(total, grid.dp_group) / grid.dp
        losses.append(total.item())
    return losses, norms


def reference(args, steps=STEPS, lr=LR):
    """One plain process, the whole global batch at once: the numbers to match."""
    torch.manual_seed(0)
    model = M.Transformer(args)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    losses, norms = [], []
    for batch in batches(args, steps):
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, norms


def worker_training():
    world = P.init_distributed(device="cpu")
    try:
        grids = {tp: P.make_grid(world, tp=tp) for tp in (1, 2, 4)}
        out = {config.name: train(config, grids[config.tp]) for config in CONFIGS}

        # naive and bucketed data parallelism: the same gradients after finish()
        grid, args = grids[2], tiny(2)
        micro = batches(args)[0].chunk(grid.dp)[grid.dp_rank]
        for overlap in (False, True):
            torch.manual_seed(0)
            model = P.parallelize(M.Transformer(args), grid, sp=True)
            sync = P.GradSync(model, grid, bucket_mb=0.02, overlap=overlap)
            P.loss_fn(model(micro[:, :-1]), micro[:, 1:], grid).backward()
            sync.finish()
            grads = [p.grad for p in model.parameters()]
            out["bucketed grads" if overlap else "naive grads"] = grads

        # overlap, shown: the order of collective launches and of backward reaching layers[0]
        torch.manual_seed(0)
        model = P.parallelize(M.Transformer(args), grid, sp=True)
        sync = P.GradSync(model, grid, bucket_mb=0.02, overlap=True)
        events = []
        model.layers[0].register_full_backward_pre_hook(
            lambda *_: events.append("backward reaches layers[0]"))
        with record_collectives(grid, events):
            P.loss_fn(model(micro[:, :-1]), micro[:, 1:], grid).backward()
            events.append("backward done")
            sync.finish()
        out["events"] = [e if isinstance(e, str) else f"{e[0]} {e[1]}" for e in events]
        out["buckets"] = len(sync.buckets)
        return out
    finally:
        P.destroy(world)


def worker_leaving():
    world = P.init_distributed(device="cpu")
    grid = P.make_grid(world, tp=2)
    train(CONFIGS[3], grid, accum=1)                              # dp2 x tp2, GradSync's hooks
    freed = {"tp": weakref.ref(grid.tp_group), "dp": weakref.ref(grid.dp_group)}
    del grid
    P.destroy(world)
    return {axis: ref() is None for axis, ref in freed.items()}


@pytest.fixture(scope="module")
def trained():
    return spawn(worker_training, WORLD, timeout=240)


def one_step(model, grid, sync, accum=2, amp=False):
    rows = batches(model.args)[0].chunk(grid.dp)[grid.dp_rank][:ACC_BATCH * accum]
    for i, micro in enumerate(rows.chunk(accum)):
        with sync.no_sync() if i < accum - 1 else nullcontext(), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = P.loss_fn(model(micro[:, :-1]), micro[:, 1:], grid) / accum
        loss.backward()
    sync.finish()
    P.clip_grad_norm(model, CLIP, grid)


def worker_accounting_and_checkpoints():
    world = P.init_distributed(device="cpu")
    try:
        grids = {tp: P.make_grid(world, tp=tp) for tp in (1, 2, 4)}
        out = {"activations": {}, "comm": {}}
        tokens = batches(tiny(2))[0][:ACC_BATCH, :-1]
        for config in ACTIVATION_CONFIGS:
            for amp in (False, True):
                torch.manual_seed(0)
                model = P.parallelize(M.Transformer(tiny(config.kv_heads)), grids[config.tp],
                                      sp=config.sp, tp_overlap=config.tp_overlap)
                P.apply_recompute(model, config.recompute)
                out["activations"][config.name, amp] = saved_bytes_of_layer(model, tokens, amp=amp)
        for config in COMM_CONFIGS:
            grid = grids[config.tp]
            torch.manual_seed(0)
            model = P.parallelize(M.Transformer(tiny(config.kv_heads)), grid, sp=config.sp,
                                  tp_overlap=config.tp_overlap)
            P.apply_recompute(model, config.recompute)
            sync = P.GradSync(model, grid, bucket_mb=0.05, overlap=config.overlap)
            with record_collectives(grid) as calls:
                one_step(model, grid, sync, amp=config.bf16)
            out["comm"][config.name] = tally(calls)

        # checkpoints: save at tp 2 (Meta's split, one shard per tp rank), load at tp 4
        grid = grids[2]
        saved = P.parallelize(perturbed_model(tiny(4)), grid, sp=True)
        out["shard"] = P.shard_state_dict(saved, grid)
        out["full"] = P.full_state_dict(saved, grid)
        shards = [None] * grid.tp
        dist.all_gather_object(shards, out["shard"], group=grid.tp_group)
        merged = C.merge_state_dicts(shards)
        loaded = P.parallelize(M.Transformer(tiny(4)), grids[4], sp=False)
        P.load_sharded(loaded, merged, grids[4])
        with torch.no_grad():
            out["logits at tp 4"] = P.all_gather(loaded(tokens), 2, grids[4].tp_group)
            out["logits at tp 2"] = P.all_gather(saved(tokens), 2, grid.tp_group)
        out["merged"] = merged
        return out
    finally:
        P.destroy(world)


@pytest.fixture(scope="module")
def accounted():
    return spawn(worker_accounting_and_checkpoints, WORLD, timeout=240)
