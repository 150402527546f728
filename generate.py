"""
generate.py -- sample from any LLaMA checkpoint (ours, Meta's, Hugging Face's), fast.

Two jobs live here: turning a folder of weights into a `Transformer` plus its `Tokenizer` on a
device (load_model, which eval.py uses; train.py's `--init-from` reads its folder through
checkpoint.read_checkpoint, as load_model does), and decoding text from it with the preallocated KV
cache of model.py. Reading a folder in any of the three layouts, and writing the Hugging Face
export, are checkpoint.py's. It does not train and does not score benchmarks (eval.py does).

    python generate.py --ckpt out/demo/checkpoints/latest --prompt "The capital of France is"
    python generate.py --ckpt llama/7B --prompt "Hi" --prompt "A longer prompt" --temperature 0
    python generate.py --ckpt llama/7B --export-hf hf/7B     # a folder transformers can load
    torchrun --nproc_per_node 2 generate.py --tp 2 --ckpt llama/7B --prompt "Hi"

Reading order
  1. load_model            checkpoint -> Transformer on a device, in fp32 (CPU) or bf16 (CUDA),
                           sliced over tensor-parallel ranks by parallel.py when tp > 1; on
                           CUDA at tp 1 with wq|wk|wv and w1|w3 fused (fuse_projections)
  2. Sampling              greedy, temperature, top-k, top-p (nucleus)
  3. Decoding              static_decoder: one step, compiled and replayed from a CUDA graph if
                           asked; generate_tokens: batched prompts of different lengths over
                           one KV cache; generate: text in, text out
  4. The weight-read bound tokens/s <= memory bandwidth / bytes of weights read per step
  ---------------------------------------------------------------------------- (the banner)
  5. Command line          Streamer (one prompt printed as it decodes), the flag rules, main

How prompts of different lengths share one cache (what Meta's reference does): prompts are
left-aligned in a (B, T_total) grid. The first forward covers the columns every prompt fills;
after that one column is decoded per step, and where a row still has prompt tokens in that
column the prompt token is kept instead of the sample. Every row thus sees its own tokens at
their true positions, so no attention mask or position offset is needed:

    position   0  1  2  3  4  5  6
    row 0     <s> A  B  C  .  .  .      prefill columns 0-1 in one forward, then
    row 1     <s> D  .  .  .  .  .      step 2: row 0 keeps B, row 1 samples; step 3 ...

Shape legend: B batch, T sequence, S cache positions, D model width, H query heads, K key/value
heads, E head dim, V vocab.

What this file leaves out: Llama 3's tiktoken tokenizer; CUDA graphs and compilation under
tensor parallelism (the eager forward is used there); speculative decoding and continuous
batching. (The layouts it cannot read are listed in checkpoint.py.)
"""

import os
import sys
import tempfile
import time
from dataclasses import replace

import torch

import checkpoint as C
import parallel as P
import cli
from cli import OneLineParser, check, finite
from model import Transformer, plan_free_attention
from tokenizer import Tokenizer


# ---------------------------------------------------------------------------------------------
# 1. load_model
# ---------------------------------------------------------------------------------------------

def load_model(ckpt: str, device="cpu", dtype=None, max_seq_len=None, grid=None):
    """Any LLaMA checkpoint folder -> (Transformer in eval mode on `device`, Tokenizer).

    grid: a parallel.Grid with tp > 1 slices the model over its tensor-parallel group
    (parallel.parallelize); every rank of it calls load_model and keeps its slice. Without one,
    on CUDA, the projections are fused for inference (model.Transformer.fuse_projections).
    """
    with C.reading(ckpt) as folder:         # held: a run's --keep leaves it until it is read
        args, state, tok_path = C.read_checkpoint(folder)
        tokenizer = Tokenizer(tok_path)
    if max_seq_len:
        args = replace(args, max_seq_len=max_seq_len)
    # fp32 on CPU (its bf16 matmuls are slow and inexact), bf16 on CUDA as Meta serves it.
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    # NOTE: under tp the full model is sliced on the CPU: it may not fit on one GPU.
    where = device if grid is None else "cpu"
    # PERF: build on the meta device and adopt the checkpoint's tensors (assign=True) instead
    # of initializing 7B random weights first only to overwrite them.
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict({k: v.to(device=where, dtype=dtype) for k, v in state.items()},
                          strict=True, assign=True)
    model.reset_rotary(torch.device(where))   # not in the state dict: computed, in fp32
    if grid is not None:
        P.parallelize(model, grid)      # every rank held the full weights: each keeps its slice
    model = model.to(device).eval().requires_grad_(False)
    # PERF: on CUDA, one product for wq|wk|wv and one for w1|w3 decode a 7b model at 208 tokens/s
    # against 186 compiled, 150 against 140 in a CUDA graph (tests/gpu_check.py on an H200). On
    # CPU the compiled step reads the fused matrices slower (44 tokens/s against 50, bench_cpu
    # decode), and eager it is the same: there they stay apart. Under tp, parallel.py's hooks sit
    # on each projection.
    if grid is None and torch.device(device).type == "cuda":
        model.fuse_projections()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# 2. Sampling
# ---------------------------------------------------------------------------------------------

def sample(logits, temperature: float = 0.8, top_p: float = 0.95, top_k: int = 0,
           generator=None):
    """Next token per row from logits (B, V) -> (B,). temperature <= 0 means greedy.

    top-k keeps the k most probable tokens; top-p keeps the smallest set of most probable
    tokens whose probabilities sum to at least p (the "nucleus"); both then renormalize.
    The defaults are those of Meta's release (temperature 0.8, top-p 0.95, no top-k).
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    # NOTE: the largest logit is subtracted first: a tiny temperature then sends the others to
    # -inf, not every logit to inf (which softmax would make nan).
    logits = logits.float()
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)  # (B, V)
    if top_k > 0:
        kth = probs.topk(min(top_k, probs.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        probs = probs.masked_fill(probs < kth, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # A token is dropped when the tokens before it already reach p; the first always stays.
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)   # renormalizes itself


# ---------------------------------------------------------------------------------------------
# 3. Decoding
# ---------------------------------------------------------------------------------------------

def static_decoder(model: Transformer, batch: int, cuda_graph: bool, compile: bool = False):
    """step(tok (B, 1), pos int) -> logits (B, 1, V): model.forward, its position a tensor.

    With start_pos a 0-d tensor, model.forward has the same shapes at every step (model.py), so
    that it is compiled once, and captured once in a CUDA graph whose replays read each step's
    token and position from the same two input tensors. Same forward, so tested equal.
    compile: torch.compile it first (once per call of generate_tokens: seconds to a minute).
    main decodes this way on CUDA (bf16), replayed from a CUDA graph, and on CPU (fp32) with
    --compile; else the eager forward.
    PERF: a replay is one launch per token instead of ~15 kernel launches per layer, whose
    CPU-side overhead would otherwise dominate a step of a small model. Inductor fuses the
    elementwise work of each norm, rotation and SwiGLU product into single kernels, so the graph
    replays far fewer launches; the eager forward is the simpler version. On CPU at batch 1,
    model.Linear then reads each weight in a fused product and sum.
    """
    device = model.output.weight.device
    forward = torch.compile(model, fullgraph=True, dynamic=False) if compile else model
    pos_t = torch.zeros((), dtype=torch.long, device=device)
    tok_t = torch.zeros(batch, 1, dtype=torch.long, device=device)
    # NOTE: the warm-up runs write garbage at cache position 0; the caller makes the decoder
    # before the prefill, which overwrites it. Compiling here keeps it out of the timed decode.
    if compile:
        forward(tok_t, pos_t)
    if not cuda_graph:
        return lambda tok, pos: forward(tok_t.copy_(tok), pos_t.fill_(pos))   # same strides
    # Warm-up on a side stream is what torch.cuda.graph requires.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            forward(tok_t, pos_t)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = forward(tok_t, pos_t)

    def replay(tok, pos):
        tok_t.copy_(tok)
        pos_t.fill_(pos)
        graph.replay()            # PERF: one launch for the whole step instead of ~15 per layer
        return logits
    return replay


@torch.inference_mode()
def generate_tokens(model: Transformer, prompts: list, max_new_tokens: int,
                    temperature: float = 0.8, top_p: float = 0.95, top_k: int = 0, eos_id=None,
                    seed=None, static: bool = False, cuda_graph: bool = False,
                    compile: bool = False, on_token=None, stats=None) -> list:
    """Token-id prompts (lists, each starting with BOS) -> the new tokens of each, EOS excluded.

    Each row stops at `eos_id` or after max_new_tokens. `static` decodes with a position tensor
    (static_decoder: `cuda_graph` replays it, `compile` compiles it); `on_token(new)` is called
    every step with a list holding each row's new token, or None where the row is still reading
    its prompt or has finished. `stats`, a dict if given, receives prefill_s, decode_s and
    decode_steps.

    Under tensor parallelism (a model parallel.parallelize sliced) each rank computes its slice
    of the vocabulary; the logits are gathered so that every rank samples the same token from
    the same seeded generator.
    """
    lens = [len(p) for p in prompts]
    check_request(lens, max_new_tokens, model.args.max_seq_len)      # below the banner
    B, total = len(prompts), max(lens) + max_new_tokens
    device = model.output.weight.device
    grid = getattr(model, "grid", None)                     # set by parallel.parallelize
    tp_group = grid.tp_group if grid is not None and grid.tp > 1 else None
    # NOTE: under tp the eager forward: capturing or compiling the collectives of parallel.py's
    # hooks is left out (see the module docstring).
    static = static and tp_group is None
    tokens = torch.full((B, total), -1, dtype=torch.long, device=device)   # (B, T_total)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    is_prompt = tokens >= 0                                                 # (B, T_total)
    last = torch.tensor(lens, device=device) + max_new_tokens - 1          # (B,) last position
    done = torch.zeros(B, dtype=torch.bool, device=device)
    eos_id = -1 if eos_id is None else eos_id
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    model.setup_cache(B, total)        # PERF: only as many positions as this call can reach
    step = static_decoder(model, B, cuda_graph, compile) if static else None
    t0, prev = time.perf_counter(), 0
    try:
        for cur in range(min(lens), total):
            forward = model if step is None or prev == 0 else step     # the prefill: eager
            logits = forward(tokens[:, prev:cur], prev)                     # (B, cur-prev, V)
            if tp_group is not None:  # vocab-parallel output: every rank samples from all of V
                logits = P.all_gather(logits[:, -1:], -1, tp_group)         # COMM: tp all-gather
            nxt = sample(logits[:, -1], temperature, top_p, top_k, generator)   # (B,)
            nxt = torch.where(is_prompt[:, cur], tokens[:, cur], nxt)       # keep prompt tokens
            tokens[:, cur] = nxt
            new = ~is_prompt[:, cur] & ~done
            if on_token is not None:
                on_token([t if n else None for t, n in zip(nxt.tolist(), new.tolist())])
            done |= (new & (nxt == eos_id)) | (cur >= last)
            if prev == 0:
                t1 = time.perf_counter()
            prev = cur
            if done.all():                    # NOTE: a host sync per step, as Meta's loop has
                break
    finally:
        model.clear_cache()
    if stats is not None:
        t2 = time.perf_counter()
        stats.update(prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=cur - min(lens))
    out = []
    for i, n in enumerate(lens):
        new = tokens[i, n:int(last[i]) + 1].tolist()
        out.append(new[:new.index(eos_id)] if eos_id in new else new)
    return out


def generate(model: Transformer, tokenizer: Tokenizer, prompts: list, max_new_tokens: int = 64,
             temperature: float = 0.8, top_p: float = 0.95, top_k: int = 0, seed=None,
             **options) -> list:
    """Text prompts -> the text each continues with (its leading space kept), stopping at EOS.

    `options` go to generate_tokens (static, cuda_graph, on_token, stats).
    """
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    outs = generate_tokens(model, ids, max_new_tokens, temperature, top_p, top_k,
                           eos_id=tokenizer.eos_id, seed=seed, **options)
    # NOTE: decoding the new ids alone would drop the space their first piece starts with.
    return [tokenizer.decode(p + o)[len(tokenizer.decode(p)):] for p, o in zip(ids, outs)]


# ---------------------------------------------------------------------------------------------
# 4. The weight-read bound
# ---------------------------------------------------------------------------------------------

def weight_bytes(model: Transformer) -> int:
    """Bytes read per decoding step: every weight except the embedding table, of which a step
    reads only B rows.

    At batch 1 a decoding step multiplies one vector by every weight matrix, so it is bound by
    reading the weights once: tokens/s <= memory bandwidth / weight_bytes. main prints the rate
    at which a run read them, to set against the device's bandwidth (tests/bench_cpu.py decode
    measures the bandwidth and the bound)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if not n.startswith("tok_embeddings"))


# =============================================================================================
# Below: what running this file as a script needs -- printing one prompt as it decodes, the
# flags and their one-line refusals, and main.
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# 5. Command line
# ---------------------------------------------------------------------------------------------

def check_request(lens: list, max_new_tokens: int, max_seq_len: int):
    """generate_tokens' prompt lengths and budget, each refused with what to do."""
    shortest, longest = min(lens, default=0), max(lens, default=0)
    check([(shortest > 0, "every prompt needs at least one token; encode with bos=True"),
           (max_new_tokens > 0, f"max_new_tokens={max_new_tokens}: ask for at least one new token"),
           (longest + max_new_tokens <= max_seq_len,
            f"the longest prompt ({longest} tokens) + max_new_tokens={max_new_tokens} exceeds "
            f"max_seq_len={max_seq_len}; shorten one or the other")])


class Streamer:
    """on_token callback that prints a single prompt's continuation as it is decoded."""

    def __init__(self, tok: Tokenizer, prompt: list):
        self.tok, self.prompt, self.new = tok, prompt, []
        self.shown = tok.decode(prompt)

    def __call__(self, new: list):
        if new[0] is not None and new[0] != self.tok.eos_id:
            self.new.append(new[0])
            self.show()

    def show(self, final: bool = False):
        """Print what is new since the last call; `final`: all the rest, and end the line."""
        # Decode prompt + new tokens together: a lone piece loses its leading space, and a
        # byte-fallback character is incomplete ("\ufffd") until its last byte arrives.
        text = self.tok.decode(self.prompt + self.new)
        if final or not text.endswith("\ufffd"):
            print(text[len(self.shown):], end="\n" if final else "", flush=True)
            self.shown = text


def device_of(name: str) -> torch.device:
    """--device as a torch.device, or a one-line error (generate.py's and eval.py's flag)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu")
    return device


def check_options(a):
    """Every flag on its own, and the output folder, before any weights are read."""
    check([("max_new_tokens", a.max_new_tokens, a.max_new_tokens >= 1, "1 or more"),
           ("temperature", a.temperature, finite(a.temperature) and a.temperature >= 0,
            "0 (greedy) or more"),
           ("top_p", a.top_p, 0 < a.top_p <= 1, "in (0, 1]; 1 turns it off"),
           ("top_k", a.top_k, a.top_k >= 0, "0 (off) or more"),
           ("seed", a.seed, 0 <= a.seed < 2**64, "0 to 2**64 - 1"),
           ("tp", a.tp, a.tp >= 1, "1 or more"),
           ("max_seq_len", a.max_seq_len, a.max_seq_len is None or a.max_seq_len >= 1,
            "1 or more")])
    device_of(a.device)
    for text in a.prompt:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:           # bytes that are not UTF-8 arrive as surrogates
            raise ValueError(f"--prompt {text!r} is not valid UTF-8 text; give it as UTF-8") \
                from None
    if a.export_hf:
        C.check_outputs([("--export-hf", a.export_hf)], C.checkpoint_paths("--ckpt", a.ckpt))
        if os.path.exists(a.export_hf) and (not os.path.isdir(a.export_hf)
                                            or os.listdir(a.export_hf)):
            raise ValueError(f"--export-hf {a.export_hf} exists and is not an empty folder; give "
                             "a new folder (nothing is overwritten)")
        if os.path.isdir(folder := C.checkpoint_folder(a.ckpt)):  # a tokenizer.json it would get
            C.check_exportable(C.find_tokenizer(folder))           # wrong: before any write
        where = os.path.abspath(a.export_hf)   # the export is built beside it, made by then
        while not os.path.exists(where):       # nothing is created before the checkpoint is read
            where = os.path.dirname(where)
        try:
            tempfile.TemporaryFile(dir=where).close()           # a file can be made there
        except OSError as e:
            raise ValueError(f"--export-hf {a.export_hf} cannot be written ({e.strerror}); "
                             "choose a writable folder") from None


def main(argv=None):
    p = OneLineParser(prog="generate.py", status=1,    # status 1: as every other refusal here
                      description="Sample from a LLaMA checkpoint (ours, Meta's, HF's).")
    p.add_argument("--ckpt", required=True, help="checkpoint folder (ours, Meta's or HF's)")
    p.add_argument("--prompt", action="append", default=[], help="repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens added to each prompt at most; default %(default)s")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy; default %(default)s")
    p.add_argument("--top-p", type=float, default=0.95, help="1 turns it off; default %(default)s")
    p.add_argument("--top-k", type=int, default=0, help="0 to disable; default %(default)s")
    p.add_argument("--seed", type=int, default=0, help="of the sampling; default %(default)s")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda; default %(default)s here")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--max-seq-len", type=int, help="override the checkpoint's")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel degree (under torchrun); default %(default)s")
    p.add_argument("--no-cuda-graph", action="store_true", help="on CUDA, plain forward()")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step (on CUDA before the graph captures it): "
                        "faster decoding after a compilation of up to a minute")
    p.add_argument("--export-hf", metavar="DIR", help="write a Hugging Face Llama folder")
    a = p.parse_args(argv)
    if not a.prompt and not a.export_hf:
        p.error("nothing to do: give --prompt TEXT and/or --export-hf DIR")
    world, grid, device = None, None, a.device
    try:
        check_options(a)
        # PERF: cuDNN's attention plans anew for each shape, and each prefill and eager step has
        # a new one: it is left out (model.plan_free_attention).
        plan_free_attention()
        if a.tp > 1:
            world = P.init_distributed(a.device)  # reads torchrun's RANK, WORLD_SIZE, ...
            grid, device = P.make_grid(world, tp=a.tp), world.device    # collective: all ranks
        is_main = world is None or world.is_main
        say = print if world is None else world.say
        if a.export_hf and is_main:
            with C.reading(a.ckpt) as folder:       # the tokenizer is read again by the export
                C.export_hf(*C.read_checkpoint(folder), a.export_hf)
            say(f"wrote {a.export_hf} (Hugging Face LlamaForCausalLM layout)")
        if not a.prompt:
            return
        model, tok = load_model(a.ckpt, device, a.dtype and getattr(torch, a.dtype),
                                a.max_seq_len, grid)
        prompts = [tok.encode(text, bos=True) for text in a.prompt]
        check_request([len(p) for p in prompts], a.max_new_tokens, model.args.max_seq_len)
        stream = Streamer(tok, prompts[0]) if len(prompts) == 1 and is_main else None
        say(a.prompt[0] if stream else "", end="", flush=True)
        stats, cuda = {}, torch.device(device).type == "cuda"
        outs = generate_tokens(model, prompts, a.max_new_tokens, a.temperature, a.top_p,
                               a.top_k, tok.eos_id, a.seed, static=cuda or a.compile,
                               cuda_graph=cuda and not a.no_cuda_graph, compile=a.compile,
                               on_token=stream, stats=stats)
        if stream:
            stream.show(final=True)
        else:
            for i, (prompt, out) in enumerate(zip(prompts, outs)):
                say(f"[{i}] {tok.decode(prompt + out)}")
        steps, B = stats["decode_steps"], len(prompts)
        rate = steps / max(stats["decode_s"], 1e-9)
        wb = weight_bytes(model)                                  # this rank's share
        say(f"prefill {stats['prefill_s']:.3f} s; decode {steps} steps x {B} sequences in "
            f"{stats['decode_s']:.3f} s = {rate:.1f} steps/s, {rate * B:.1f} tokens/s")
        say(f"each step reads the {wb / 1e6:.1f} MB of weights: {rate * wb / 1e9:.1f} GB/s, to "
            "set against the device's memory bandwidth (tests/bench_cpu.py decode measures it)")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except RuntimeError as e:
        if world is None and (line := cli.port_in_use(e, P.launcher()["master"])):
            sys.exit(line)                   # the rendezvous could not start: nothing ran
        raise
    finally:
        if world is not None:
            P.destroy(world)


if __name__ == "__main__":
    main()
