"""CUDA paths: xformers and sdpa against the `math` reference in bf16, and the hand-written SwiGLU
backward under autocast. Skipped without CUDA. On a GPU machine:

    python -m pytest -q tests/test_gpu.py        # the checks
    PYTHONPATH=. python tests/test_gpu.py        # forward+backward time per backend, 1b, seq 2048
"""

import time

import pytest
import torch

import model as M

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def backends():
    names = ["sdpa", "math"]
    if M.xformers_ops():
        names.insert(0, "xformers")
    return names


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("T,S", [(64, 64), (1, 40), (8, 40)])
def test_backends_agree_in_bf16(T, S):
    torch.manual_seed(0)
    q = torch.randn(2, T, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, S, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, S, 2, 64, device="cuda", dtype=torch.bfloat16)
    ref = M.attend(q, k, v, "math")
    for name in backends():
        assert rel_err(M.attend(q, k, v, name), ref) < 1e-2, name


@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_model_backends_agree_in_bf16_forward_backward(n_kv_heads):
    # n_kv_heads = n_heads: k is not repeated, and the math backend's gradient of k reaches the
    # rotation transposed (model.rotate_complex copies it).
    args = M.ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=512,
                       multiple_of=64, max_seq_len=128)
    torch.manual_seed(0)
    model = M.Transformer(args).cuda()
    tokens = torch.randint(0, 512, (2, 128), device="cuda")
    outs = {}
    for name in backends():
        model.set_attention_backend(name)
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens)
        logits.logsumexp(-1).mean().backward()
        outs[name] = (logits.detach(), model.layers[0].attention.wq.weight.grad.clone())
    for name, (logits, grad) in outs.items():
        assert rel_err(logits, outs["math"][0]) < 1e-2, name
        assert rel_err(grad, outs["math"][1]) < 5e-2, name


def test_manual_swiglu_backward_under_autocast():
    args = M.ModelArgs(dim=256, n_layers=1, n_heads=4, vocab_size=64, multiple_of=64)
    torch.manual_seed(0)
    ffn = M.FeedForward(args).cuda()
    x = torch.randn(4, 64, 256, device="cuda")
    grads = []
    for manual in (False, True):
        ffn.manual_backward = manual
        ffn.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = ffn(x)
        y.float().pow(2).mean().backward()
        assert ffn.w1.weight.grad.dtype == torch.float32
        grads.append([p.grad.clone() for p in ffn.parameters()])
    for a, b in zip(*grads):
        assert rel_err(b, a) < 2e-2


@pytest.mark.parametrize("cuda_graph,compile,fused", [(False, False, False), (True, False, False),
                                                     (True, True, False), (True, True, True)])
def test_static_decoder_matches_the_forward_step_by_step_in_bf16(cuda_graph, compile, fused):
    """The same tokens, teacher-forced, through generate.static_decoder and through the eager
    decode (int positions, the cache sliced) and the cache-free forward: every step's logits
    agree to bf16's rounding. Greedy sequences would be no test: with random weights the top two
    logits are often closer than that rounding, so equal decoders part after a few tokens.
    fused: the static decoder runs on the model after fuse_projections, the references before."""
    import generate as G
    args = M.ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                       multiple_of=64, max_seq_len=64)
    torch.manual_seed(0)
    model = M.Transformer(args).cuda().to(torch.bfloat16).eval().requires_grad_(False)
    B, T, prompt = 2, 40, 8
    tokens = torch.randint(0, 512, (B, T), device="cuda")

    def decode(make_step):
        model.setup_cache(B, T)
        step = make_step()                          # before the prefill, as generate_tokens
        rows = [model(tokens[:, :prompt], 0)[:, -1]]                  # position prompt - 1
        for cur in range(prompt, T):
            rows.append(step(tokens[:, cur:cur + 1], cur)[:, -1].clone())
        model.clear_cache()
        return torch.stack(rows, 1)                                   # (B, T - prompt + 1, V)

    with torch.inference_mode():
        full = model(tokens)[:, prompt - 1:]
        eager = decode(lambda: model)
        if fused:
            model.fuse_projections()
        static = decode(lambda: G.static_decoder(model, B, cuda_graph, compile))
    for t in range(full.shape[1]):
        assert rel_err(eager[:, t], full[:, t]) < 2e-2, t
        assert rel_err(static[:, t], eager[:, t]) < 2e-2, t


def report_forward_backward_time_per_backend_1b():
    """Prints ms per forward+backward of the ~1B preset at sequence 2048, batch 1, bf16."""
    args = M.preset("1b")
    torch.manual_seed(0)
    model = M.Transformer(args).cuda()
    for layer in model.layers:          # the hand-written SwiGLU backward, as "selective" runs it
        layer.feed_forward.manual_backward = True
    tokens = torch.randint(0, args.vocab_size, (1, 2048), device="cuda")
    for name in backends():
        model.set_attention_backend(name)
        times = []
        for i in range(5):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(tokens).logsumexp(-1).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t)
        ms = 1000 * sum(times) / len(times)
        flops = M.flops_per_token(args, 2048) * 2048             # 6N + 12 L D T per token
        print(f"1b seq 2048 {name:>8}: {ms:7.1f} ms fwd+bwd, {flops / (ms / 1000) / 1e12:6.1f} "
              "model TFLOP/s")


if __name__ == "__main__":
    report_forward_backward_time_per_backend_1b()
