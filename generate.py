"""
generate.py -- load any LLaMA checkpoint (ours, Meta's, Hugging Face's) and sample from it fast.

Two jobs live here, because eval.py and train.py's `--init-from` need the first and everybody
needs the second: turning a folder of weights into a `Transformer` plus its `Tokenizer`, and
decoding text from it with the preallocated KV cache of model.py. It does not train and does not
score benchmarks (eval.py does).

    python generate.py --ckpt out/tiny --prompt "The capital of France is" --max-new-tokens 32
    python generate.py --ckpt llama/7B --prompt "Hi" --prompt "A longer prompt" --temperature 0
    python generate.py --ckpt llama/7B --export-hf hf/7B     # a folder transformers can load

Reading order
  1. Reading checkpoints   which layout a folder holds; ours and Meta's (params.json +
                           consolidated.NN.pth), Hugging Face's (config.json + safetensors)
  2. Hugging Face layout   key names, the q/k row permutation, reading and writing
  3. load_model            checkpoint -> Transformer on a device, in fp32 (CPU) or bf16 (CUDA)
  4. Sampling              greedy, temperature, top-k, top-p (nucleus)
  5. Decoding              batched prompts of different lengths over one KV cache; a
                           static-shape step that CUDA graphs can replay
  6. The weight-read bound measured memory bandwidth / bytes of weights
  7. main                  the command line

How prompts of different lengths share one cache (what Meta's reference does): prompts are
left-aligned in a (B, T_total) grid. The first forward covers the columns every prompt fills;
after that one column is decoded per step, and where a row still has prompt tokens in that
column the prompt token is kept instead of the sample. Every row thus sees its own tokens at
their true positions, so no attention mask or position offset is needed:

    position   0  1  2  3  4  5  6
    row 0     <s> A  B  C  .  .  .      prefill columns 0-1 in one forward, then
    row 1     <s> D  .  .  .  .  .      step 2: row 0 keeps B, row 1 samples; step 3 ...

Loading never executes code from a file: `torch.load(weights_only=True)` and safetensors only.

Shape legend: B batch, T sequence, S cache positions, D model width, H query heads, K key/value
heads, E head dim, V vocab.

What this file leaves out: tensor parallelism is delegated to parallel.py (load_model calls its
`apply_tensor_parallel(model, tp_rank, tp_size)` when tp_size > 1; generation under torchrun is
not wired up here); HF checkpoints with `rope_scaling` (Llama 3.1) or biases; speculative
decoding and continuous batching.
"""

import argparse
import glob
import json
import os
import re
import shutil
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from model import ModelArgs, Transformer, apply_rope, merge_state_dicts, rope_tables
from tokenizer import Tokenizer


# ---------------------------------------------------------------------------------------------
# 1. Reading checkpoints
# ---------------------------------------------------------------------------------------------

def find_tokenizer(folder: str) -> str:
    """tokenizer.model in the folder, or in its parent (where Meta's release puts it)."""
    for where in (folder, os.path.dirname(os.path.abspath(folder))):
        path = os.path.join(where, "tokenizer.model")
        if os.path.isfile(path):
            return path
    hint = (" (it has only tokenizer.json, which is not read here)"
            if os.path.isfile(os.path.join(folder, "tokenizer.json")) else "")
    raise FileNotFoundError(f"no tokenizer.model in {folder} or its parent{hint}; copy there the "
                            "SentencePiece model this checkpoint was trained with")


def _meta_shards(folder: str) -> list:
    """consolidated.00.pth ... consolidated.{N-1}.pth, checked to be complete."""
    paths = glob.glob(os.path.join(folder, "consolidated.*.pth"))
    if not paths:
        raise FileNotFoundError(f"{folder} has params.json but no consolidated.*.pth weight files")
    numbered = {int(re.search(r"consolidated\.(\d+)\.pth$", p).group(1)): p for p in paths}
    if sorted(numbered) != list(range(len(numbered))):
        raise FileNotFoundError(f"{folder} has shards {sorted(numbered)}: consolidated.00 .. "
                                f"{len(numbered) - 1:02d} must all be present; re-download them")
    return [numbered[i] for i in range(len(numbered))]


def _check_shapes(args: ModelArgs, state: dict, source: str, config: str):
    """Every tensor the architecture needs, with the shape it implies, and nothing else."""
    with torch.device("meta"):                  # shapes only: no memory, no initialization
        expected = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{source} lacks {missing[0]} ({len(missing)} tensors missing): not a "
                         "complete LLaMA checkpoint; re-download or re-export it")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ValueError(f"{source} has unexpected tensor {extra[0]}: not a plain LLaMA model")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{key} in {source} has shape {tuple(state[key].shape)} but {config} "
                             f"(dim={args.dim}, n_layers={args.n_layers}, n_heads={args.n_heads}, "
                             f"n_kv_heads={args.n_kv_heads}) implies {shape}: the weights and "
                             f"{config} come from different models")


def read_checkpoint(ckpt: str):
    """(ModelArgs, full Meta-named state dict on CPU, tokenizer path), validated, no model built.

    The layout is recognized by its files: `config.json` + `*.safetensors` is Hugging Face's;
    `params.json` + `consolidated.NN.pth` is Meta's and ours. Shards of any count are merged.
    """
    if not os.path.isdir(ckpt):
        raise FileNotFoundError(f"checkpoint folder {ckpt} does not exist")
    if os.path.isfile(os.path.join(ckpt, "config.json")):
        args, state = read_hf(ckpt)
        source, config = ckpt, "config.json"
    elif os.path.isfile(os.path.join(ckpt, "params.json")):
        shards = _meta_shards(ckpt)
        with open(os.path.join(ckpt, "params.json")) as f:
            params = json.load(f)
        # PERF: mmap maps the files instead of reading them; only the tensors used get paged in.
        state = merge_state_dicts([torch.load(p, map_location="cpu", weights_only=True, mmap=True)
                                   for p in shards])
        args, source, config = params, shards[0], "params.json"
    else:
        raise FileNotFoundError(f"{ckpt} holds neither params.json + consolidated.*.pth (Meta's "
                                "or ours) nor config.json + *.safetensors (Hugging Face's)")
    tok_path = find_tokenizer(ckpt)
    n_words = Tokenizer(tok_path).n_words
    if isinstance(args, dict):  # NOTE: Meta writes vocab_size -1: "take it from the tokenizer"
        args = ModelArgs.from_dict(args, **({"vocab_size": n_words}
                                            if args.get("vocab_size", -1) <= 0 else {}))
    rows = state.get("tok_embeddings.weight", torch.empty(n_words, 0)).shape[0]
    if rows != n_words:
        raise ValueError(f"tokenizer {tok_path} has {n_words} pieces but the model embeds {rows} "
                         "tokens: it belongs to another model; use the model's own tokenizer.model")
    _check_shapes(args, state, source, config)
    return args, state, tok_path


# ---------------------------------------------------------------------------------------------
# 2. Hugging Face layout
# ---------------------------------------------------------------------------------------------

# Meta's name inside a layer -> Hugging Face's (LlamaForCausalLM), and the top-level ones.
HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
HF_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def hf_name(meta_key: str) -> str:
    """layers.3.attention.wq.weight -> model.layers.3.self_attn.q_proj.weight"""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", meta_key)
    if m:
        return f"model.layers.{m.group(1)}.{HF_LAYER_NAMES[m.group(2)]}.weight"
    return HF_TOP_NAMES[meta_key[:-len(".weight")]] + ".weight"


def permute_rows(w, n_heads: int, to_hf: bool):
    """Reorder each head's rows of wq / wk between Meta's rotary layout and Hugging Face's.

    Meta rotates consecutive pairs of features (0,1), (2,3), ...; HF rotates feature i with
    feature i + E/2 ("rotate half"). Reading each head's E rows as a (E/2, 2) grid, Meta's order
    is row-major and HF's column-major, so the conversion is a transpose of that grid:
        Meta rows 0 1 2 3 4 5  <->  HF rows 0 2 4 1 3 5      (E = 6, one head)
    q.k products are unchanged because q and k are permuted alike.
    """
    E, D = w.shape[0] // n_heads, w.shape[1]
    grid = (n_heads, E // 2, 2, D) if to_hf else (n_heads, 2, E // 2, D)
    return w.reshape(grid).transpose(1, 2).reshape(n_heads * E, D)


def _ffn_args(dim: int, hidden: int) -> dict:
    """multiple_of / ffn_dim_multiplier for which ModelArgs.ffn_hidden == HF's intermediate_size."""
    if ModelArgs(dim=dim, n_heads=1, n_layers=1, vocab_size=1).ffn_hidden == hidden:
        return {}                                    # LLaMA's own rounding (multiple_of=256)
    base = int(2 * 4 * dim / 3)                      # what ffn_hidden starts from, see model.py
    return dict(multiple_of=hidden, ffn_dim_multiplier=None if base <= hidden else hidden / base)


def read_hf(folder: str):
    """config.json + *.safetensors (or pytorch_model*.bin) -> (ModelArgs, Meta-named state)."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("model_type", "llama") != "llama" or cfg.get("rope_scaling"):
        raise ValueError(f"{folder}/config.json describes model_type={cfg.get('model_type')!r} "
                         f"rope_scaling={cfg.get('rope_scaling')}: only plain Llama is supported")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    n_kv_heads = cfg.get("num_key_value_heads") or n_heads
    args = ModelArgs(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                     n_kv_heads=n_kv_heads, vocab_size=cfg["vocab_size"],
                     norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=cfg.get("rope_theta", 1e4),
                     max_seq_len=cfg.get("max_position_embeddings", 2048),
                     **_ffn_args(dim, cfg["intermediate_size"]))
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    hf = {}
    if files:
        from safetensors.torch import load_file
        for path in files:
            hf.update(load_file(path))
    else:
        files = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
        if not files:
            raise FileNotFoundError(f"{folder} has config.json but no *.safetensors weight files")
        for path in files:
            hf.update(torch.load(path, map_location="cpu", weights_only=True))
    if "lm_head.weight" not in hf and cfg.get("tie_word_embeddings"):
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    to_meta = {hf_name(k): k for k in _meta_keys(args)}
    state = {}
    for name, w in hf.items():
        if name.endswith("rotary_emb.inv_freq"):     # a derived buffer some exports carry
            continue
        key = to_meta.get(name, name)                # unknown names are reported by _check_shapes
        if key.endswith(("wq.weight", "wk.weight")):
            w = permute_rows(w, n_heads if "wq" in key else n_kv_heads, to_hf=False)
        state[key] = w
    return args, state


def _meta_keys(args: ModelArgs) -> list:
    with torch.device("meta"):
        return list(Transformer(args).state_dict())


def export_hf(args: ModelArgs, state: dict, tokenizer_path: str, out: str,
              max_shard_bytes: int = 5 << 30):
    """Write a folder that `LlamaForCausalLM.from_pretrained(out)` loads with the same logits."""
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    dtype = next(iter(state.values())).dtype
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": str(dtype).split(".")[-1],
    }
    tensors = {}
    for key, w in state.items():
        if key.endswith(("wq.weight", "wk.weight")):
            w = permute_rows(w, args.n_heads if "wq" in key else args.n_kv_heads, to_hf=True)
        tensors[hf_name(key)] = w.contiguous()
    # Files of at most max_shard_bytes, plus the index that maps each tensor to its file.
    files, size = [{}], 0
    for name, w in tensors.items():
        nbytes = w.numel() * w.element_size()
        if files[-1] and size + nbytes > max_shard_bytes:
            files, size = files + [{}], 0
        files[-1][name], size = w, size + nbytes
    names = (["model.safetensors"] if len(files) == 1 else
             [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    for name, part in zip(names, files):
        save_file(part, os.path.join(out, name), metadata={"format": "pt"})
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(w.numel() * w.element_size() for w in tensors.values())},
                 "weight_map": {t: n for n, part in zip(names, files) for t in part}}
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                   "model_max_length": args.max_seq_len}, f, indent=2)
    shutil.copyfile(tokenizer_path, os.path.join(out, "tokenizer.model"))


# ---------------------------------------------------------------------------------------------
# 3. load_model
# ---------------------------------------------------------------------------------------------

def default_dtype(device) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls there are slow and inexact); bf16 on CUDA, as Meta serves."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_model(ckpt: str, device="cpu", dtype=None, tp_rank: int = 0, tp_size: int = 1,
               max_seq_len=None):
    """Any LLaMA checkpoint folder -> (Transformer in eval mode on `device`, Tokenizer)."""
    args, state, tok_path = read_checkpoint(ckpt)
    if max_seq_len:
        args = replace(args, max_seq_len=max_seq_len)
    dtype = dtype or default_dtype(device)
    # PERF: build on the meta device and adopt the checkpoint's tensors (assign=True) instead
    # of initializing 7B random weights first only to overwrite them.
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()},
                          strict=True, assign=True)
    # The rotary tables are not in the state dict: compute them for real, and keep them in fp32.
    model.rope_cos, model.rope_sin = (t.to(device) for t in rope_tables(
        args.head_dim, args.max_seq_len, args.rope_theta))
    model.eval().requires_grad_(False)
    if tp_size > 1:
        try:
            import parallel
        except ImportError:
            raise ValueError(f"tp_size={tp_size} needs parallel.py, which this checkout lacks; "
                             "load with tp_size=1") from None
        if not hasattr(parallel, "apply_tensor_parallel"):
            raise ValueError("parallel.py has no apply_tensor_parallel(model, tp_rank, tp_size); "
                             "load with tp_size=1")
        model = parallel.apply_tensor_parallel(model, tp_rank, tp_size) or model
    return model, Tokenizer(tok_path)


# ---------------------------------------------------------------------------------------------
# 4. Sampling
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
    probs = torch.softmax(logits.float() / temperature, dim=-1)            # (B, V)
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
# 5. Decoding
# ---------------------------------------------------------------------------------------------

def static_step(model: Transformer, tok, pos):
    """One decoding step whose tensor shapes never change: tok (B, 1), pos a 0-d long tensor.

    model.forward attends over `cache[:, :start_pos + 1]`, a shape that grows every step, and
    takes start_pos as a Python int; a CUDA graph can replay neither. Here the position is a
    tensor, the new key/value is written with index_copy_, and attention runs over the whole
    cache with a mask `position <= pos`. Same weights, same math; tested equal to model.forward.
    """
    B = tok.shape[0]
    h = model.tok_embeddings(tok)                                         # (B, 1, D)
    cos = model.rope_cos.index_select(0, pos.view(1))                     # (1, E/2)
    sin = model.rope_sin.index_select(0, pos.view(1))
    S = model.layers[0].attention.cache_k.shape[1]
    visible = (torch.arange(S, device=tok.device) <= pos).view(1, 1, 1, S)  # (1, 1, 1, S)
    for layer in model.layers:
        attn = layer.attention
        x = layer.attention_norm(h)
        q = attn.wq(x).view(B, 1, -1, attn.head_dim)                      # (B, 1, H, E)
        k = attn.wk(x).view(B, 1, -1, attn.head_dim)                      # (B, 1, K, E)
        v = attn.wv(x).view(B, 1, -1, attn.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn.cache_k[:B].index_copy_(1, pos.view(1), k)
        attn.cache_v[:B].index_copy_(1, pos.view(1), v)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), attn.cache_k[:B].transpose(1, 2), attn.cache_v[:B].transpose(1, 2),
            attn_mask=visible, enable_gqa=True)                           # (B, H, 1, E)
        h = h + attn.wo(out.transpose(1, 2).flatten(2))                   # (B, 1, D)
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h)).float()                            # (B, 1, V)


def _static_decoder(model: Transformer, batch: int, cuda_graph: bool):
    """step(tok (B, 1), pos int) -> logits (B, 1, V), replayed from a CUDA graph if asked."""
    device = model.output.weight.device
    pos_t = torch.zeros((), dtype=torch.long, device=device)
    tok_t = torch.zeros(batch, 1, dtype=torch.long, device=device)
    if not cuda_graph:
        return lambda tok, pos: static_step(model, tok, pos_t.fill_(pos))
    # NOTE: the warm-up runs write garbage at cache position 0; the caller captures before the
    # prefill, which overwrites it. Warm-up on a side stream is what torch.cuda.graph requires.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            static_step(model, tok_t, pos_t)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = static_step(model, tok_t, pos_t)

    def replay(tok, pos):
        tok_t.copy_(tok)
        pos_t.fill_(pos)
        graph.replay()            # PERF: one launch for the whole step instead of ~15 per layer
        return logits
    return replay


@torch.inference_mode()
def generate_tokens(model: Transformer, prompts: list, max_new_tokens: int,
                    temperature: float = 0.8, top_p: float = 0.95, top_k: int = 0, eos_id=None,
                    seed=None, static: bool = False, cuda_graph: bool = False, on_token=None,
                    stats=None) -> list:
    """Token-id prompts (lists, each starting with BOS) -> the new tokens of each, EOS excluded.

    Each row stops at `eos_id` or after max_new_tokens. `static` decodes with static_step (and
    `cuda_graph` replays it); `on_token(new)` is called every step with a list holding each row's
    new token, or None where the row is still reading its prompt or has finished. `stats`, a
    dict if given, receives prefill_s, decode_s and decode_steps.
    """
    lens = [len(p) for p in prompts]
    if not prompts or min(lens) == 0:
        raise ValueError("every prompt needs at least one token; encode with bos=True")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: ask for at least one new token")
    B, total = len(prompts), max(lens) + max_new_tokens
    if total > model.args.max_seq_len:
        raise ValueError(f"the longest prompt ({max(lens)} tokens) + max_new_tokens="
                         f"{max_new_tokens} exceeds max_seq_len={model.args.max_seq_len}; "
                         "shorten one or the other")
    device = model.output.weight.device
    tokens = torch.full((B, total), -1, dtype=torch.long, device=device)   # (B, T_total)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    is_prompt = tokens >= 0                                                 # (B, T_total)
    last = torch.tensor(lens, device=device) + max_new_tokens - 1          # (B,) last position
    done = torch.zeros(B, dtype=torch.bool, device=device)
    eos_id = -1 if eos_id is None else eos_id
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    model.setup_cache(B, total)        # PERF: only as many positions as this call can reach
    step = _static_decoder(model, B, cuda_graph) if static else None
    t0, prev = time.perf_counter(), 0
    try:
        for cur in range(min(lens), total):
            if step is None or prev == 0:
                logits = model(tokens[:, prev:cur], prev)                   # (B, cur-prev, V)
            else:
                logits = step(tokens[:, prev:cur], prev)                    # (B, 1, V)
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
# 6. The weight-read bound
# ---------------------------------------------------------------------------------------------

def memory_bandwidth(device, nbytes=None, reps: int = 5) -> float:
    """Bytes per second of a large tensor copy (each byte read once and written once)."""
    device = torch.device(device)
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 256 << 20)  # far beyond the caches
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)                                      # warm-up: page faults, allocator
    best = float("inf")
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def weight_bytes(model: Transformer) -> int:
    """Bytes read per decoding step: every weight except the embedding table, of which a step
    reads only B rows."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if not n.startswith("tok_embeddings"))


# ---------------------------------------------------------------------------------------------
# 7. Command line
# ---------------------------------------------------------------------------------------------

class Streamer:
    """on_token callback that prints a single prompt's continuation as it is decoded."""

    def __init__(self, tok: Tokenizer, prompt: list):
        self.tok, self.prompt, self.new = tok, prompt, []
        self.shown = tok.decode(prompt)

    def __call__(self, new: list):
        if new[0] is not None and new[0] != self.tok.eos_id:
            self.new.append(new[0])
            self.show(final=False)

    def show(self, final: bool):
        # Decode prompt + new tokens together: a lone piece loses its leading space, and a
        # byte-fallback character is incomplete ("\ufffd") until its last byte arrives.
        text = self.tok.decode(self.prompt + self.new)
        if final or not text.endswith("\ufffd"):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def finish(self):
        self.show(final=True)
        print()


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample from a LLaMA checkpoint (ours, Meta's or HF's).")
    p.add_argument("--ckpt", required=True, help="checkpoint folder")
    p.add_argument("--prompt", action="append", default=[], help="repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0 to disable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--max-seq-len", type=int, default=None, help="override params.json")
    p.add_argument("--no-cuda-graph", action="store_true", help="on CUDA, use plain forward()")
    p.add_argument("--export-hf", metavar="DIR", help="write a Hugging Face Llama folder")
    a = p.parse_args(argv)
    if not a.prompt and not a.export_hf:
        p.error("nothing to do: give --prompt TEXT and/or --export-hf DIR")
    try:
        if a.export_hf:
            export_hf(*read_checkpoint(a.ckpt), a.export_hf)
            print(f"wrote {a.export_hf} (Hugging Face LlamaForCausalLM layout)")
        if not a.prompt:
            return
        dtype = getattr(torch, a.dtype) if a.dtype else None
        model, tok = load_model(a.ckpt, a.device, dtype, max_seq_len=a.max_seq_len)
        prompts = [tok.encode(text, bos=True) for text in a.prompt]
        stream = Streamer(tok, prompts[0]) if len(prompts) == 1 else None
        if stream:
            print(a.prompt[0], end="", flush=True)
        stats, fast = {}, torch.device(a.device).type == "cuda"
        outs = generate_tokens(model, prompts, a.max_new_tokens, a.temperature, a.top_p,
                               a.top_k, eos_id=tok.eos_id, seed=a.seed, static=fast,
                               cuda_graph=fast and not a.no_cuda_graph, on_token=stream,
                               stats=stats)
        if stream:
            stream.finish()
        else:
            for i, (prompt, out) in enumerate(zip(prompts, outs)):
                print(f"[{i}] {tok.decode(prompt + out)}")
        steps, B = stats["decode_steps"], len(prompts)
        rate = steps / max(stats["decode_s"], 1e-9)
        bw, wb = memory_bandwidth(a.device), weight_bytes(model)
        print(f"prefill {stats['prefill_s']:.3f} s; decode {steps} steps x {B} sequences in "
              f"{stats['decode_s']:.3f} s = {rate:.1f} steps/s, {rate * B:.1f} tokens/s")
        print(f"weight-read bound at batch 1: tokens/s <= memory bandwidth / weight bytes = "
              f"{bw / 1e9:.1f} GB/s / {wb / 1e6:.1f} MB = {bw / wb:.1f} tokens/s "
              f"(decoding ran at {100 * rate * wb / bw:.0f}% of it)")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
