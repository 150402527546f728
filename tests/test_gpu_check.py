"""The GPU check (tests/gpu_check.py) in its dry run: CPU, tiny shapes, every section, so that
the one command a lent GPU runs cannot rot between GPUs."""

import json

import pytest

import gpu_check

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_measures_every_section(tmp_path):
    report = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    assert report.failed == []
    results = json.load(open(tmp_path / "results.json"))
    steps = results["training_step"]["rows"]
    assert [(r["step"], r["compile"]) for r in steps] == [("ours", False), ("ours", False),
                                                          ("plain", False), ("ours", True)]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in steps)
    decoders = results["decoding"]["rows"]
    assert [r["decoder"] for r in decoders] == ["model.forward", "static step",
                                                "compiled static step",
                                                "compiled static step, fused"]
    assert set(results["decoding"]["agree"].values()) == {16}      # fp32: the same greedy tokens
    profile = results["decoding_profile"]
    assert profile["kernels"] and 0 < profile["kernel_us"] <= 1.5 * profile["wall_us"]
    memory = results["memory"]["rows"]
    assert [(r["recompute"], r["micro_batches"]) for r in memory] == [
        (mode, m) for mode in ("none", "selective", "full") for m in (1, 2)]
    acts = [r["predicted"]["acts"] for r in memory[::2]]
    assert acts[0] > acts[1] > acts[2] > 0                         # what recomputation saves
    assert list(results["decoding"]["prefill_ms"]) == ["without cuDNN"]    # no cuDNN on a CPU
    resume = results["kill_and_resume"]
    assert resume["killed_at"] < resume["steps"]                   # really killed mid-run
    assert resume["max_diff_resumed"] == 0.0                       # and resumed exactly
    text = open(tmp_path / "report.md").read()
    assert [r["variant"] for r in results["decoding_experiments"]][0] == "as generate.py --compile runs"
    for title in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6.", "every check passed"):
        assert title in text
