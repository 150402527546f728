"""Tests for planner.py, in this process, in a second or two.

  1. accounting: sequence parallelism moves the bytes of the all-reduces it replaces; the tp
     bytes parallel.py overlaps are its column linears' backward ones; the 7b activation figures
     the README quotes; the parameter count per GPU equals the parameters of
     a real (meta-device) model split as parallelize() splits it; a pipeline rank's gradients
     come on top of its activations only when it runs more micro-batches than it holds (the
     lower bound train.py checks). The accounting equal to what the code does is measured in
     test_parallel.py and test_pipeline.py, on gloo workers.
  2. published runs: LLaMA-65B and Megatron-1T within 8%, the bubble of PTD-P's formula.
  3. search, serving memory, the command line, and bad layouts refused in one line.
  4. the data-sheet peaks, looked up by the names CUDA gives the GPUs (train.py's MFU).
"""

import json
from dataclasses import replace

import pytest

import model as M
import planner

SEQ = 16


def tiny(kv_heads: int = 2) -> M.ModelArgs:
    return M.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads, vocab_size=256,
                       multiple_of=32, max_seq_len=SEQ)


# --- 1. accounting ------------------------------------------------------------------------------

def test_sequence_parallelism_moves_the_same_bytes_as_all_reduce():
    args, batch, L = tiny(2), 4, tiny(2).n_layers
    plain = planner.comm_per_step(args, batch, SEQ, tp=2)
    sp = planner.comm_per_step(args, batch, SEQ, tp=2, sp=True, tp_overlap=False)
    activation, small = batch * SEQ * args.dim * 4, 3 * batch * SEQ * 4 + 4   # loss and clip
    assert plain["tp all_reduce"] == (2 + 4 * L + 4, (2 + 4 * L) * activation + small)
    all_reduce_wire = planner.wire_bytes("all_reduce", 2, plain["tp all_reduce"][1] - small)
    sp_wire = (planner.wire_bytes("all_gather", 2, sp["tp all_gather"][1])
               + planner.wire_bytes("reduce_scatter", 2, sp["tp reduce_scatter"][1]))
    assert sp_wire == all_reduce_wire == (2 + 4 * L) * activation


@pytest.mark.parametrize("sp", [False, True])
def test_overlapped_tp_bytes_are_the_column_linears_backward(sp):
    """parallel.py overlaps, per pass, the reduction of each region's input gradient in its
    column linears' backward (attention, FFN, output: 2L + 1), and under sp the regather of the
    kept shard: of comm_per_step's tp collectives, without sp the 2L + 1 all-reduces of f's
    backward (of 2 + 4L), with sp a half of the reduce-scatters and a third of the all-gathers."""
    args, batch, tp, L = tiny(2), 4, 2, tiny(2).n_layers
    comm = planner.comm_per_step(args, batch, SEQ, tp=tp, sp=sp)
    wire = {key.split()[1]: planner.wire_bytes(key.split()[1], tp, payload)
            for key, (_, payload) in comm.items()}
    overlapped = planner.tp_overlapped_bytes(args, batch, SEQ, tp, sp)
    activation = planner.wire_bytes("all_reduce", tp, batch * SEQ * args.dim * 4)
    if sp:
        assert overlapped == pytest.approx(wire["reduce_scatter"] / 2 + wire["all_gather"] / 3)
    else:
        assert overlapped == pytest.approx((2 * L + 1) * activation)
        assert comm["tp all_reduce"][0] - 4 == 2 + 4 * L                  # less loss and clip


def test_7b_activation_bytes_per_layer_as_the_readme_quotes():
    """README: at tp 8, micro-batch 1, sequence 2048, bf16, a 7b layer keeps 364 MiB with no
    parallelism, 158 with tp, 45.5 with tp + sp and 34.8 with selective recomputation on top."""
    mib = lambda **kw: planner.activation_bytes_per_layer(M.preset("7b"), 1, 2048,
                                                          bytes_per_el=2, **kw) / 2**20
    assert round(mib()) == 364 and round(mib(tp=8)) == 158
    assert round(mib(tp=8, sp=True), 1) == 45.5
    assert round(mib(tp=8, sp=True, recompute="selective"), 1) == 34.8


@pytest.mark.parametrize("args,tp", [(tiny(2), 2), (tiny(4), 4), (M.preset("7b"), 8)])
def test_parameters_per_gpu_are_the_split_models(args, tp):
    """stage_parameters (from model.count_parameters) against the parameters of a real model,
    built on the meta device, split as parallelize() splits them (local_parameter_numels)."""
    assert planner.stage_parameters(args, tp, pp=1) == sum(planner.local_parameter_numels(args,
                                                                                         tp))
    assert planner.stage_parameters(args, 1, pp=1) == M.count_parameters(args)
    stages = [planner.stage_parameters(args, tp, pp=2, rank=r) for r in (0, 1)]
    assert sum(stages) == planner.stage_parameters(args, tp, pp=1)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("micro_batches", [1, 2, 3])
def test_a_rank_holds_its_gradients_with_its_activations_only_past_what_it_holds(
        rank, micro_batches):
    """stage_step_bytes, the lower bound of a step: a 1F1B rank holds min(m, pp - rank)
    micro-batches at once; its gradients (fp32, from its first backward on) come on top of them
    only when it runs more, after that backward. fp32: weights, m and v are 12 bytes a parameter."""
    args, pp, m = tiny(2), 2, micro_batches
    n = planner.stage_parameters(args, 1, pp, rank)
    state, held = planner.stage_step_bytes(args, 8, SEQ, pp=pp, micro_batches=m, rank=rank)
    assert held == planner.stage_activation_bytes(args, 8, SEQ, pp=pp, micro_batches=m,
                                                  rank=rank)
    assert held == min(m, pp - rank) * planner.chunk_activation_bytes(args, 8, SEQ, pp=pp,
                                                                      rank=rank)[0]
    assert state == 12 * n + (4 * n if m > pp - rank else 0)


@pytest.mark.parametrize("precision,recompute,received", [
    ("bf16", "none", 2), ("bf16", "selective", 2), ("bf16", "full", 0), ("fp32", "none", 0)])
def test_a_chunk_that_receives_its_input_keeps_it_where_autograd_saves_a_copy(
        precision, recompute, received):
    """pipeline_step holds a received input until its backward. Under bf16 autocast RMSNorm
    saves its fp32 copy, not the bf16 input, which comes on top: b x N x D more for chunk 2 of
    rank 0 (interleaved, pp 2, v 2) than for chunk 0, the model's first, which receives token
    ids. In fp32 (x.float() is x) and under full recomputation (the block's input) autograd
    saves the input itself, counted with the layer's."""
    args, batch, el = replace(tiny(2), n_layers=4), 8, planner.PRECISIONS[precision][3]
    first, third = planner.chunk_activation_bytes(args, batch, SEQ, pp=2, virtual_stages=2,
                                                  recompute=recompute, bytes_per_el=el)
    assert third - first == received * batch * SEQ * args.dim


# --- 2. published runs --------------------------------------------------------------------------

def test_planner_reproduces_llama_65b():
    """LLaMA-65B: about 380 tokens/s/GPU on 2048 A100-80GB, 21 days for 1.4T tokens [LLaMA §2.4],
    at our assumed layout, tp overlapped; as parallel.py runs it, slower: it overlaps the column
    linears' backward collectives (2 of the 5 activations each layer sends, under sp) and leaves
    the rest exposed, 15.0 of 25.1 ms of tp per micro-batch."""
    p = planner.plan(M.preset("65b"), 2048, "a100-80gb", seq_len=2048,
                     global_batch_tokens=4 * 2**20, tp=8, pp=4, recompute="selective",
                     train_tokens=1.4e12)
    assert p["memory"]["fits"]
    assert p["tokens_per_s_per_gpu"] == pytest.approx(380, rel=0.08)
    assert p["days"] == pytest.approx(21, rel=0.08)
    assert p["time"]["bubble"] == pytest.approx(3 / 32)
    assert round(p["tokens_per_s_per_gpu"]) == 353                    # the docstring's figures
    assert round(p["this_code"]["tokens_per_s_per_gpu"]) == 323
    tp, overlapped = p["comm_bytes_per_step"]["tp"], p["comm_bytes_per_step"]["tp_overlapped"]
    assert round(overlapped / 1e9, 2) == 77.04 and round(sum(tp.values()) / 1e9, 2) == 192.61
    assert round(p["time"]["tp_per_micro_batch"] * 1e3, 1) == 25.1
    assert round(p["time"]["tp_exposed_per_micro_batch"] * 1e3, 1) == 15.0


def test_plan_counts_the_once_per_step_tp_all_reduces_once_not_per_micro_batch():
    """sp's all-reduce of the norm weights' gradients and the clipping scalar are sent once per
    step: plan()'s tp bytes per step are comm_per_step's for all m micro-batches of the stage,
    and a micro-batch's tp time is its own passes' traffic, without them."""
    args, tp, pp = M.preset("65b"), 8, 4
    p = planner.plan(args, 2048, tp=tp, pp=pp, recompute="selective")
    m, link = p["layout"]["micro_batches"], 300e9 * planner.ASSUMPTIONS["link_efficiency"]
    stage = replace(args, n_layers=args.n_layers // pp)
    step = planner.comm_per_step(stage, 1, 2048, tp=tp, sp=True, recompute="selective",
                                 micro_batches=m, bytes_per_el=2)
    wire = {key: planner.wire_bytes(key.split()[1], tp, payload)
            for key, (_, payload) in step.items()}
    assert p["comm_bytes_per_step"]["tp"] == pytest.approx(wire, rel=1e-12)
    once = planner.wire_bytes("all_reduce", tp, (2 * stage.n_layers + 1) * args.dim * 4 + 4)
    per_micro_batch = (sum(wire.values()) - once) / m
    assert p["time"]["tp_per_micro_batch"] == pytest.approx(per_micro_batch / link, rel=1e-12)


def test_planner_reproduces_megatron_1t():
    """PTD-P Table 1: 1T parameters on 3072 A100s at 502 PFLOP/s, 163 TFLOP/s per GPU, 52%."""
    args = M.ModelArgs(dim=25600, n_layers=128, n_heads=160, vocab_size=51200, max_seq_len=2048)
    p = planner.plan(args, 3072, "a100-80gb", seq_len=2048, global_batch_tokens=3072 * 2048,
                     tp=8, pp=64, virtual_stages=2, recompute="full")
    assert p["megatron_tflops_per_gpu"] == pytest.approx(163, rel=0.08)
    assert p["megatron_tflops_per_gpu"] * 3072 / 1e3 == pytest.approx(502, rel=0.08)  # PFLOP/s
    assert p["megatron_tflops_per_gpu"] / 312 == pytest.approx(0.52, rel=0.08)


# --- 3. search, serving, the command line -------------------------------------------------------

def test_planner_search_and_serve():
    best = planner.search(M.preset("65b"), 2048, top=5, train_tokens=1.4e12)
    speeds = [p["tokens_per_s_per_gpu"] for p in best]
    assert len(best) == 5 and speeds == sorted(speeds, reverse=True)
    assert all(p["memory"]["fits"] for p in best)
    given = planner.plan(M.preset("65b"), 2048, tp=8, pp=4)
    assert speeds[0] >= given["tokens_per_s_per_gpu"]
    # the paper's point: 13B serves from one GPU, 65B needs several
    usable = planner.GPUS["a100-80gb"].memory * planner.ASSUMPTIONS["usable_memory"]
    assert planner.serve_memory(M.preset("13b"), 1, 2048)["total"] < usable
    assert planner.serve_memory(M.preset("65b"), 1, 2048)["total"] > usable
    assert planner.serve_memory(M.preset("65b"), 1, 2048, tp=2)["total"] < usable


@pytest.mark.parametrize("flags,tp,reason", [
    (["--preset", "33b", "--gpu", "a100-40gb"], 8, "tp=8 must divide n_heads=52; use one of 1, "
     "2, 4"),
    (["--preset", "7b", "--n-kv-heads", "4"], 8, "tp=8 must divide n_kv_heads=4; use one of 1, "
     "2, 4"),
])
def test_serve_prints_a_tp_the_model_cannot_split_as_refused_not_as_fitting(capsys, flags, tp,
                                                                             reason):
    """generate.py --tp goes through parallel.check_config: 33b's 52 heads, or 4 KV heads, do not
    split over 8 ranks, so --serve's tp 8 row says why instead of a memory that fits."""
    rows = planner.main([*flags, "--serve"])
    lines = capsys.readouterr().out.splitlines()
    assert f"  tp {tp}: -  {reason}" in lines
    assert not [line for line in lines if line.startswith(f"  tp {tp}: weights")]
    assert rows[tp] == dict(refused=reason) and "total" in rows[4]


def test_search_honours_no_sp_and_the_schedule(capsys):
    """--search ranks layouts of the code the user runs: with --no-sp and --schedule afab every
    layout it prints has sp off and runs afab (so v is 1), tensor-parallel ones among them."""
    plans = planner.main(["--preset", "tiny", "--gpus", "8", "--seq-len", "256",
                          "--global-batch-tokens", "64K", "--search", "--top", "50", "--no-sp",
                          "--schedule", "afab"])
    layouts = [p["layout"] for p in plans]
    assert any(lay["tp"] > 1 for lay in layouts) and any(lay["pp"] > 1 for lay in layouts)
    assert all(not lay["sp"] and lay["schedule"] == "afab" for lay in layouts)
    assert all(lay["virtual_stages"] == 1 for lay in layouts)


def test_planner_cli_prints_and_answers_json(capsys):
    planner.main(["--preset", "65b", "--gpus", "2048", "--gpu", "a100-80gb", "--tp", "8", "--pp",
                  "4", "--seq-len", "2048", "--global-batch-tokens", "4M", "--recompute",
                  "selective", "--train-tokens", "1.4T"])
    text = capsys.readouterr().out
    for expected in ("tp 8 x pp 4 x dp 64", "fits", "bubble (pp-1)/(v m) = 9.4%", "tokens/s/GPU",
                     "MFU", "days", "assumptions:",
                     "323 tokens/s/GPU; MFU 42.1% as parallel.py runs",
                     "tp, as parallel.py   115.57 GB  exposed; 77.04 GB overlapped"):
        assert expected in text, expected
    planner.main(["--preset", "7b", "--gpus", "64", "--tp", "2", "--pp", "2", "--json"])
    assert json.loads(capsys.readouterr().out)["layout"]["dp"] == 16
    with pytest.raises(SystemExit):
        planner.main(["--preset", "65b", "--gpus", "100", "--tp", "8"])
    assert "does not divide 100 GPUs" in capsys.readouterr().err
    planner.main(["--check"])                                    # the published runs
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(planner.PUBLISHED) and all("published" in line for line in lines)
    planner.main(["--accounting"])                              # `python parallel.py`'s tables
    text = capsys.readouterr().out
    assert "7b: micro-batch 1, seq 2048, tp 8" in text and "364.27" in text


def test_check_and_accounting_answer_json_with_the_tables_figures(capsys):
    """--json answers every question: --check gives each published run's figures, predicted and
    published; --accounting the bytes its tables print in MiB, by preset, mode and collective."""
    planner.main(["--check", "--json"])
    runs = json.loads(capsys.readouterr().out)
    assert runs.keys() == planner.PUBLISHED.keys()
    llama = runs["LLaMA-65B on 2048 A100-80GB [LLaMA §2.4]"]
    assert llama["tokens_per_s_per_gpu"]["published"] == 380 and llama["days"]["published"] == 21
    assert round(llama["tokens_per_s_per_gpu"]["predicted"], 1) == 352.7
    assert round(llama["days"]["predicted"], 1) == 22.4
    planner.main(["--accounting", "--json"])
    seven = json.loads(capsys.readouterr().out)["7b"]
    assert (seven["micro_batch"], seven["seq_len"], seven["tp"], seven["dp"]) == (1, 2048, 8, 2)
    assert round(seven["activation_bytes_per_layer"]["none"]["bf16"] / 2**20, 2) == 364.27
    gathers = seven["collectives_per_step"]["tp+sp"]["tp all_gather"]
    assert gathers["calls"] == 195 and gathers["payload_bytes"] == 6240 * 2**20
    assert gathers["sent_bytes"] == 5460 * 2**20


def test_serve_answers_for_the_precision_asked(capsys):
    """generate.py serves fp32 weights on CPU: --serve --precision fp32 counts 4 bytes per weight
    and per cached value, twice bf16's, and says so."""
    bf16 = planner.main(["--preset", "13b", "--serve"])
    assert "parameters in bf16, batch 1" in capsys.readouterr().out
    fp32 = planner.main(["--preset", "13b", "--serve", "--precision", "fp32"])
    assert capsys.readouterr().out.splitlines()[0] == (
        "serving 13.0B parameters in fp32, batch 1 x context 2048, per a100-80gb GPU (GiB):")
    assert fp32[1]["weights"] == 4 * M.count_parameters(M.preset("13b"))
    assert fp32[1] == {key: 2 * value for key, value in bf16[1].items()}


def test_search_that_finds_no_layout_says_so(capsys):
    """7b's 18 bytes per parameter need 113 GiB: no layout fits one A100. As a plan that does
    not fit, the answer is printed (exit 0), and said in words, not as an empty table."""
    assert planner.main(["--preset", "7b", "--gpus", "1", "--search"]) == []
    assert capsys.readouterr().out == (
        "no layout fits: 6.7B parameters on 1 x a100-80gb (72.0 usable GiB each); use more "
        "--gpus, a --gpu with more memory, or a shorter --seq-len\n")


@pytest.mark.parametrize("call,message", [
    (lambda: planner.plan(M.preset("65b"), 2048, tp=8, pp=3), "does not divide 2048 GPUs"),
    (lambda: planner.plan(M.preset("65b"), 2048, tp=8, pp=4, virtual_stages=3),
     "n_layers=80 cannot be cut"),
])
def test_bad_layouts_are_refused_in_one_line(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


# --- 4. data-sheet peaks ------------------------------------------------------------------------

@pytest.mark.parametrize("name,family,peak", [
    ("NVIDIA A100-SXM4-80GB", "A100", 312e12), ("NVIDIA A100-PCIE-40GB", "A100", 312e12),
    ("NVIDIA H100 80GB HBM3", "H100", 989e12), ("NVIDIA H200", "H200", 989e12),
    ("NVIDIA H100 PCIe", "H100 PCIE", 756e12), ("NVIDIA H100 NVL", "H100 NVL", 835e12),
    ("NVIDIA H200 NVL", "H200 NVL", 835e12)])           # slower cards of a family: their own
def test_data_sheet_peaks_by_device_name(name, family, peak):
    assert M.data_sheet_peak(name) == (family, peak)


def test_unknown_gpu_has_no_data_sheet_peak():
    assert M.data_sheet_peak("NVIDIA GeForce RTX 4090") is None
