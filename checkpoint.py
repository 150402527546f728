"""
checkpoint.py -- everything the project keeps on disk, and the one way it is written.

A LLaMA checkpoint is a folder. Meta released theirs as `params.json` (ModelArgs), one
`consolidated.NN.pth` per tensor-parallel rank (the state dict, Meta's key names, split as
Megatron splits it) and `tokenizer.model`; ours are that layout (its names, its split) plus the
training state. Hugging Face's are `config.json` + `*.safetensors` under other names, with the
rows of wq and wk permuted. This file reads all three, writes ours and Hugging Face's, and owns
every other file a run leaves behind: train.py, generate.py, eval.py and data.py call it; no
other file renames a file into place or takes a lock.

NOTE: Meta's layout, not a Meta release: readers of that layout read a step folder, but Meta's
own example.py would need the consolidated files alone (it counts every *.pth as a shard) and
params.json's Meta keys alone (ours adds max_seq_len, which it passes itself, and rope_theta;
LLaMA-1's ModelArgs also lacks n_kv_heads and ffn_dim_multiplier).

    OUT/                                  a training run (train.py --out OUT)
      metrics.jsonl                       one JSON line per step and per validation
      train.lock                          held while a run uses OUT
      checkpoints/latest                  names the newest complete step folder
      checkpoints/step-000600/            Meta's layout (its three files above), plus:
        train_state.00.pth                optimizer, step, sampler, RNG (per tp rank; under pp
                                          train_state.00.stage01.pth per stage)
        train_config.json                 the run's options, which --resume restores
        dataset.json                      what it read: --resume refuses data changed since

Reading map
  1. Meta's layout      which dimension each tensor is split along; split and merge; reading a
                        folder (ours, Meta's) or Hugging Face's into one state dict
  2. Hugging Face       key names, the q/k row permutation, export with a tokenizer.json
  3. A training run     step folders, `latest`, the training state, saved options, metrics
  ---------------------------------------------------------------------------- (the banner)
  4. Checks             shard files that belong together; every tensor present with its
                        shape, before a model is built; a `latest` that leads elsewhere; an
                        output that would overwrite an input; a tokenizer the export cannot
                        write exactly (its .model's settings)
  5. Writing safely     one atomic write, one lock, build-in-a-temporary-folder-then-rename
  6. Reading safely     one bounded reader; a checkpoint held while it is read

Loading never executes code from a file: `torch.load(weights_only=True)` and safetensors only.

What this file leaves out: HF checkpoints with a scaled rotary embedding (Llama 3.1's:
`rope_scaling`, or in transformers 5 a `rope_parameters` rope_type not "default"), a hidden_act
other than SiLU, a head_dim other than dim / n_heads, biases, `.bin` weights (convert them to
safetensors); an embedding with tokens added beyond tokenizer.model (added tokens, a padded
vocabulary); sharded HF export (one file); exporting a SentencePiece model not of LLaMA's kind
(refused: unigram, normalizing, ...); loading only one rank's shard file (each rank reads all of
them and keeps its slice).
"""

import contextlib
import errno
import fcntl
import glob
import json
import math
import os
import re
import shutil
import socket
import stat
import tempfile
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from cli import first_line
from model import ModelArgs, Transformer
from tokenizer import Tokenizer


# ---------------------------------------------------------------------------------------------
# 1. Meta's layout
# ---------------------------------------------------------------------------------------------

def shard_dim(key: str) -> Optional[int]:
    """The dimension along which Meta splits `key` across consolidated.NN.pth files.

    Meta's files are exactly Megatron's tensor-parallel shards [PTD-P §2.3]: the matrices that
    fan out (wq wk wv w1 w3, and output over the vocabulary) are split by output rows, dim 0;
    the ones that fan in (wo w2) by input columns, dim 1; the embedding by its width, dim 1;
    norms are replicated (None).
    """
    name = key.split(".")[-2] if "." in key else key     # "layers.3.attention.wq.weight" -> "wq"
    return {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
            "wo": 1, "w2": 1, "tok_embeddings": 1}.get(name)


def shard_file(i: int) -> str:
    """The name of Meta's i-th weight file: consolidated.00.pth, consolidated.01.pth, ..."""
    return f"consolidated.{i:02d}.pth"


def piece(tensor: torch.Tensor, dim: Optional[int], n: int, i: int) -> torch.Tensor:
    """The i-th of n equal slices of `tensor` along `dim` (all of it when dim is None): how a
    state dict is split into Meta's files, and how parallel.py gives each tp rank its part."""
    if dim is None or n == 1:
        return tensor
    if tensor.shape[dim] % n:
        raise ValueError(f"a tensor of shape {tuple(tensor.shape)} cannot be split in {n} along "
                         f"dim {dim}; choose a count that divides it")
    return tensor.chunk(n, dim)[i]


def split_state_dict(state: dict, n: int) -> list:
    """One full state dict -> n shards in Meta's split (replicated tensors copied to each)."""
    return [{key: piece(t, shard_dim(key), n, i).clone() for key, t in state.items()}
            for i in range(n)]


def merge_state_dicts(shards: list) -> dict:
    """n shards in Meta's split -> one full state dict (the inverse of split_state_dict)."""
    merged = {}
    for key in meta_weights(shards[0]):
        dim = shard_dim(key)
        merged[key] = shards[0][key] if dim is None else torch.cat([s[key] for s in shards], dim)
    return merged


def meta_weights(state: dict) -> dict:
    """A Meta state dict without `rope.freqs`, a stray buffer in some of Meta's files (derived
    from the architecture, not learned: Transformer computes its rotary tables itself)."""
    return {k: v for k, v in state.items() if k != "rope.freqs"}


def read_checkpoint(ckpt: str):
    """(ModelArgs, full Meta-named state dict on CPU, tokenizer path), validated, no model built.

    The layout is recognized by its files: `config.json` + `*.safetensors` is Hugging Face's;
    `params.json` + `consolidated.NN.pth` is Meta's and ours. Shards of any count are merged.
    """
    with reading(ckpt) as ckpt:        # held: a run's --keep passes over it (section 6)
        if os.path.isfile(ckpt):              # e.g. its consolidated.00.pth
            raise NotADirectoryError(f"checkpoint {ckpt} is a file; give the folder that holds "
                                     f"it, {os.path.dirname(os.path.abspath(ckpt))}")
        if not os.path.isdir(ckpt):
            raise FileNotFoundError(f"checkpoint folder {ckpt} does not exist")
        if os.path.isfile(os.path.join(ckpt, "config.json")):
            args, state = read_hf(ckpt)
            source, config = ckpt, "config.json"
        elif os.path.isfile(os.path.join(ckpt, "params.json")):
            paths = meta_shards(ckpt)
            shards = [load_weights(p) for p in paths]
            check_shards(paths, shards)                         # below the banner
            state = merge_state_dicts(shards)
            args, source, config = read_params(ckpt), paths[0], "params.json"
        else:
            raise FileNotFoundError(f"{ckpt} holds neither params.json + consolidated.*.pth "
                                    "(Meta's or ours) nor config.json + *.safetensors (Hugging "
                                    "Face's)")
        tok_path = find_tokenizer(ckpt)
        check_state(args, state, tok_path, source, config)
    return args, state, tok_path


def read_params(ckpt: str) -> ModelArgs:
    """params.json of a Meta-layout folder (ours, Meta's) as ModelArgs, validated; Meta's
    vocab_size -1 ("take it from the tokenizer") is read off the folder's tokenizer."""
    path = os.path.join(ckpt, "params.json")
    # A run's step folder (its options beside it, or in older ones its training state) has no
    # release to restore the file from; every checkpoint of the run holds the same one.
    in_run = os.path.isfile(os.path.join(ckpt, "train_config.json")) or glob.glob(
        os.path.join(glob.escape(ckpt), "train_state.*.pth"))
    params = read_json(path, "copy it from another checkpoint of the run" if in_run else
                       "restore it from the release")
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a JSON object of ModelArgs fields")
    if params.get("vocab_size", -1) == -1:
        params = {**params, "vocab_size": Tokenizer(find_tokenizer(ckpt)).n_words}
    try:
        return ModelArgs.from_dict(params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


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


def checkpoint_folder(path: str) -> str:
    """`path`, or for a run's OUT/checkpoints/latest (a file that names the newest complete
    checkpoint) the folder it names: `--ckpt out/demo/checkpoints/latest` reads the newest."""
    if os.path.isfile(path) and os.path.basename(path) == "latest":
        return os.path.join(os.path.dirname(path), pointed_step(path))    # checked: section 4
    return path


# ---------------------------------------------------------------------------------------------
# 2. Hugging Face's layout
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
        HF's rows 0..5 are Meta's rows 0 2 4 1 3 5      (E = 6, one head)
    Each pair thus keeps its rotation angle, and q.k is unchanged: q and k are permuted alike.
    """
    E, D = w.shape[0] // n_heads, w.shape[1]
    grid = (n_heads, E // 2, 2, D) if to_hf else (n_heads, 2, E // 2, D)
    return w.reshape(grid).transpose(1, 2).reshape(n_heads * E, D)


def hf_rows(key: str, w, args: ModelArgs, to_hf: bool):
    """The weight `key`, its rows permuted (permute_rows) if it is a wq or a wk: the two whose
    outputs are rotated; any other as it is."""
    if key.endswith(("wq.weight", "wk.weight")):
        return permute_rows(w, args.n_heads if "wq" in key else args.n_kv_heads, to_hf)
    return w


def ffn_args(dim: int, hidden: int) -> dict:
    """multiple_of / ffn_dim_multiplier for which ModelArgs.ffn_hidden == HF's intermediate_size."""
    def width(**kw):
        return ModelArgs(dim=dim, n_heads=1, n_layers=1, vocab_size=1, **kw).ffn_hidden
    if width() == hidden:
        return {}                                    # LLaMA's own rounding (multiple_of=256)
    base = width(multiple_of=1)                      # 2/3 of 4 dim, before any rounding
    return dict(multiple_of=hidden, ffn_dim_multiplier=None if base <= hidden else hidden / base)


def read_hf(folder: str):
    """config.json + *.safetensors (one file or several) -> (ModelArgs, Meta-named state)."""
    path = os.path.join(folder, "config.json")
    try:
        cfg = read_json(path, "download it again")
        if cfg.get("model_type", "llama") != "llama" or cfg.get("rope_scaling"):
            raise ValueError(f"it describes model_type={cfg.get('model_type')!r} rope_scaling="
                             f"{cfg.get('rope_scaling')}: only plain Llama is supported")
        # NOTE: transformers 5 writes the rotary settings inside rope_parameters (theta, and the
        # scaling rope_scaling held in 4); a rope_theta at the top level is 4's.
        rope = cfg.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"it describes rope_type={rope['rope_type']!r}, a scaled rotary "
                             "embedding (Llama 3.1's and later): not read here; only plain Llama "
                             "is supported")
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        n_kv_heads = cfg.get("num_key_value_heads") or n_heads
        # The two that Llama's architecture fixes and a config may still change: model.py has
        # SiLU ("swish" is transformers' other name for it), and heads of width dim / n_heads.
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"it describes hidden_act={cfg['hidden_act']!r}, not silu: only "
                             "plain Llama is supported")
        if cfg.get("head_dim") not in (None, dim // n_heads):
            raise ValueError(f"it describes head_dim={cfg['head_dim']}, not hidden_size / "
                             f"num_attention_heads = {dim // n_heads}: only plain Llama is "
                             "supported")
        args = ModelArgs(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                         n_kv_heads=n_kv_heads, vocab_size=cfg["vocab_size"],
                         norm_eps=cfg.get("rms_norm_eps", 1e-6),
                         rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 1e4)),
                         max_seq_len=cfg.get("max_position_embeddings", 2048),
                         **ffn_args(dim, cfg["intermediate_size"]))
    except KeyError as e:
        raise ValueError(f"{path} lacks the field {e}; it is not a Llama config.json") from None
    except (TypeError, ValueError, AttributeError) as e:     # JSON's own errors are ValueErrors
        raise ValueError(f"{path}: {first_line(e, 200)}") from None
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{folder} has config.json but no *.safetensors weight files")
    hf = {name: w for path in files for name, w in load_weights(path).items()}
    if "lm_head.weight" not in hf and cfg.get("tie_word_embeddings"):
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    to_meta = {hf_name(k): k for k in expected_shapes(args)}
    state = {}
    for name, w in hf.items():
        if not name.endswith("rotary_emb.inv_freq"):     # a derived buffer some exports carry
            key = to_meta.get(name, name)            # unknown names are reported by check_state
            state[key] = hf_rows(key, w, args, to_hf=False)
    return args, state


def hf_tokenizer_json(tokenizer_path: str) -> dict:
    """The SentencePiece model as a `tokenizers` file (tokenizer.json) that encodes as it does.

    SentencePiece's BPE merges the adjacent pair whose joined piece scores best; a `tokenizers`
    BPE merges the pair of lowest rank; so each way of splitting a piece into two known pieces
    is a merge, ranked by the piece's score. In front of it, the normalizer writes what
    SentencePiece does: a "▁" before any non-empty text (the dummy prefix), every space a "▁".
    NOTE: transformers 5's own LlamaTokenizer adds that "▁" only to a text that does not start
    with one, so " the" would lose a token; hence this file, loaded as written (see export_hf).
    NOTE: "<s>" spelled inside a text is text to SentencePiece; `tokenizers` matches it as the
    control piece unless told not to (encode_special_tokens; export_hf tells transformers).
    """
    sp = Tokenizer(tokenizer_path).sp
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    ids = {piece: i for i, piece in enumerate(pieces)}
    special = [i for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i)]
    merges = []                                  # (rank key, "left right")
    for i, piece in enumerate(pieces):
        if i in special or sp.is_byte(i):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                merges.append(((-sp.get_score(i), i, cut), f"{left} {right}"))
    bos = {"SpecialToken": {"id": sp.id_to_piece(sp.bos_id()), "type_id": 0}}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [dict(id=i, content=pieces[i], single_word=False, lstrip=False,
                              rstrip=False, normalized=False, special=True) for i in special],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,       # SentencePiece's pieces never span a word boundary anyway
        "post_processor": {"type": "TemplateProcessing",
                           "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                                    bos, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {pieces[sp.bos_id()]: {
                               "id": pieces[sp.bos_id()], "ids": [sp.bos_id()],
                               "tokens": [pieces[sp.bos_id()]]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},   # the dummy prefix
        "model": {"type": "BPE", "dropout": None, "unk_token": pieces[sp.unk_id()],
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": True, "vocab": ids,
                  "merges": [merge for _, merge in sorted(merges)]},
    }


def export_hf(args: ModelArgs, state: dict, tokenizer_path: str, out: str):
    """Write a folder that transformers loads as this model: `LlamaForCausalLM.from_pretrained`
    with the same logits, `AutoTokenizer` with SentencePiece's ids, `generate` with its <s>, </s>.
    Built in a temporary folder and renamed (building): `out` appears whole or not at all. A
    tokenizer that tokenizer.json cannot reproduce is refused first (check_exportable).
    """
    check_exportable(tokenizer_path)                            # below the banner
    tok = Tokenizer(tokenizer_path)
    # NOTE: LLaMA has no pad token; <unk> pads (as in Hugging Face's own LLaMA conversion), on
    # the left, so that a padded batch generates without transformers' warnings.
    pad = tok.pad_id if tok.pad_id >= 0 else tok.sp.unk_id()
    dtype = next(iter(state.values())).dtype
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
        "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": pad,
        "torch_dtype": str(dtype).split(".")[-1],
    }
    tensors = {hf_name(key): hf_rows(key, w, args, to_hf=True).contiguous()
               for key, w in state.items()}
    # NOTE: a tied HF model (tie_word_embeddings) is read with one tensor as both embedding and
    # output; safetensors refuses one tensor under two names, so lm_head is written as a copy.
    head, embedding = tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]
    if head.untyped_storage().data_ptr() == embedding.untyped_storage().data_ptr():
        tensors["lm_head.weight"] = head.clone()
    files = {
        "config.json": config,
        # generate()'s own defaults: <s> first, stop at </s>, pad with <unk>.
        "generation_config.json": {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                                   "pad_token_id": pad},
        "tokenizer.json": hf_tokenizer_json(tokenizer_path),
        # NOTE: the generic class loads tokenizer.json as written, in transformers 4 and 5;
        # naming LlamaTokenizer would let transformers 5 rebuild it with its own pre-tokenizer.
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tok.sp.id_to_piece(tok.bos_id),
            "eos_token": tok.sp.id_to_piece(tok.eos_id),
            "unk_token": tok.sp.id_to_piece(tok.sp.unk_id()),
            "pad_token": tok.sp.id_to_piece(pad), "padding_side": "left", "add_bos_token": True,
            "add_eos_token": False, "model_max_length": args.max_seq_len,
            # NOTE: no token_type_ids, which transformers 4's generate() refuses for Llama.
            "model_input_names": ["input_ids", "attention_mask"],
            # "<s>" typed in a text is three characters to SentencePiece, not the control id
            # that tokenizers would match; the post-processor still adds the real <s>.
            "split_special_tokens": True},
    }
    with building(out) as tmp:
        # NOTE: one file of any size; transformers reads it as it reads its own sharded ones.
        save_safetensors(tensors, os.path.join(tmp, "model.safetensors"))
        for name, content in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2, ensure_ascii=False)
        shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.model"))


# ---------------------------------------------------------------------------------------------
# 3. A training run's folder
# ---------------------------------------------------------------------------------------------
# A step folder is written as .tmp-step-NNNNNN by every rank that holds a part of it, renamed
# when complete (start_build, then finish_build on the main rank), and only then named by
# `latest`: a kill at any moment leaves at worst a `.tmp-` folder that nothing reads.

def step_folder(out: str, step: int) -> str:
    return os.path.join(out, "checkpoints", f"step-{step:06d}")


def step_of(path: str) -> int:
    """The step of a checkpoint folder `.../step-000600`; -1 for any other name."""
    name = os.path.basename(path)
    return int(name[len("step-"):]) if re.fullmatch(r"step-\d+", name) else -1


def latest(out: str) -> Optional[str]:
    """The folder that OUT/checkpoints/latest names, or None. Only complete folders are named."""
    pointer = os.path.join(out, "checkpoints", "latest")
    try:
        path = checkpoint_folder(pointer) if os.path.isfile(pointer) else None
    except ValueError:                   # it names no step folder: damaged, ignored
        return None
    return path if path and os.path.isdir(path) else None


def checkpoints(out: str) -> list:
    """Every complete checkpoint folder of a run, the one to resume from first: the folder
    `latest` names, then the others, newest step first (a kill between a folder's rename and the
    `latest` update, or a lost `latest`, leaves complete folders that `latest` does not name)."""
    root = os.path.join(out, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    found = sorted((os.path.join(root, n) for n in names if step_of(n) >= 0), key=step_of,
                   reverse=True)
    newest = latest(out)
    return [newest] + [p for p in found if p != newest] if newest in found else found


def holds_a_run(out: str) -> Optional[str]:
    """What in OUT shows that a run was there (metrics, `latest`, a checkpoint), or None."""
    signs = [os.path.join(out, "metrics.jsonl"), os.path.join(out, "checkpoints", "latest")]
    return next((path for path in signs + checkpoints(out) if os.path.exists(path)), None)


def train_state_name(tp_rank: int, pp_rank: int = 0, pp: int = 1) -> str:
    """A rank's optimizer file: one per tp rank, and per pipeline stage under pp."""
    stage = f".stage{pp_rank:02d}" if pp > 1 else ""
    return f"train_state.{tp_rank:02d}{stage}.pth"


def write_model(folder: str, args: ModelArgs, tok_path: str, config: dict, dataset: dict):
    """The files of a step folder that one rank writes: params.json, tokenizer.model, the run's
    options (train_config.json) and what it read (dataset.json: data.dataset_identity)."""
    write_atomic(os.path.join(folder, "params.json"), args.to_json())
    write_atomic(os.path.join(folder, "train_config.json"), json.dumps(config, indent=2))
    write_atomic(os.path.join(folder, "dataset.json"), json.dumps(dataset, indent=2))
    with open(tok_path, "rb") as f:
        write_atomic(os.path.join(folder, "tokenizer.model"), f.read())


def publish(out: str, tmp: str, step: int, keep: int) -> str:
    """The main rank, once every rank wrote its files into tmp: rename it to its step folder,
    name it in `latest`, and delete all but the newest `keep` (never the one `latest` names)."""
    final = step_folder(out, step)
    finish_build(tmp, final, replace=True)
    write_atomic(os.path.join(out, "checkpoints", "latest"), os.path.basename(final))
    for old in checkpoints(out)[keep:]:
        remove_unread(old)               # one being read (generate.py, eval.py) waits: section 6
    return final


def read_train_state(folder: str, tp_rank: int, pp_rank: int = 0, pp: int = 1) -> dict:
    return torch.load(os.path.join(folder, train_state_name(tp_rank, pp_rank, pp)),
                      map_location="cpu", weights_only=True)


def saved_config(folder: str) -> dict:
    """The run's options as its checkpoint recorded them (train_config.json)."""
    path = os.path.join(folder, "train_config.json")
    if os.path.isfile(path):
        config = read_json(path, "copy it from another checkpoint of the run")
        if not isinstance(config, dict):
            raise ValueError(f"{path} must hold a JSON object of the run's options; copy it from "
                             "another checkpoint of the run")
        return config
    first = min(f for f in os.listdir(folder) if f.startswith("train_state."))  # older folders
    return torch.load(os.path.join(folder, first), map_location="cpu", weights_only=True)["config"]


def saved_dataset(folder: str) -> Optional[dict]:
    """What the run read (dataset.json), or None in a folder saved before it was recorded."""
    path = os.path.join(folder, "dataset.json")
    return read_json(path, "copy it from another checkpoint of the run") if os.path.isfile(
        path) else None


def log_metrics(path: str, record: dict):
    """One line of metrics.jsonl: a value that is not finite (a skipped step's loss) is written
    as null, since NaN and Infinity are no JSON."""
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v
              for k, v in record.items()}
    with open(path, "a") as fh:                      # closed (and flushed) at once: a full disk
        fh.write(json.dumps(record) + "\n")          # raises here, not at exit


def truncate_metrics(path: str, last_step: int):
    """Before a run goes on from last_step: drop entries a crashed run logged after its last
    checkpoint (all of them when it saved none), and a last line torn by a kill in the middle
    of its write. A line that is not JSON elsewhere is refused (ValueError)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        lines = f.readlines() if last_step else []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break                                # torn by the kill: dropped
            raise ValueError(f"{path} line {i + 1} is not JSON: the file is damaged; move it "
                             "away and --resume again (a new one is started)") from None
        if row.get("step", 0) <= last_step:
            keep.append(line if line.endswith("\n") else line + "\n")
    write_atomic(path, "".join(keep))


# =============================================================================================
# Below: what reading and writing for real needs -- checks of what is read, and writes that a
# kill or a full disk cannot leave half done.
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# 4. Checks
# ---------------------------------------------------------------------------------------------

def meta_shards(folder: str) -> list:
    """consolidated.00.pth ... consolidated.{N-1}.pth, checked to be complete."""
    n = len(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    paths = [os.path.join(folder, shard_file(i)) for i in range(n)]
    if n == 0:
        raise FileNotFoundError(f"{folder} has params.json but no consolidated.NN.pth weights")
    if not all(os.path.isfile(p) for p in paths):
        raise FileNotFoundError(f"{folder} has {n} consolidated.NN.pth files, not numbered 00 .. "
                                f"{n - 1:02d}: a shard is missing; re-download or re-save them")
    return paths


def check_shards(paths: list, shards: list):
    """Shard files that belong together, before they are merged: Meta's split makes n equal
    slices, so each file holds the first one's tensors, each of the same shape."""
    first = meta_weights(shards[0])
    fix = ("the shard files come from different checkpoints; put back the consolidated.NN.pth "
           "files of one checkpoint (re-download or re-save them)")
    for path, shard in zip(paths[1:], shards[1:]):
        shard = meta_weights(shard)
        odd = sorted(set(first) ^ set(shard))           # in one of the two files only
        if odd:
            held, lacks = (paths[0], path) if odd[0] in first else (path, paths[0])
            raise ValueError(f"{lacks} lacks {odd[0]}, which {held} holds: {fix}")
        for key, t in first.items():
            if shard[key].shape != t.shape:
                raise ValueError(f"{key} in {path} has shape {tuple(shard[key].shape)} but "
                                 f"{tuple(t.shape)} in {paths[0]}: {fix}")


def load_weights(path: str) -> dict:
    """One weights file, torch.save's or safetensors', or a one-line error naming it."""
    hf = path.endswith(".safetensors")
    regular_file(path, "weights file")        # a file we may read: else a message that says so
    try:
        open(path, "rb").close()
    except OSError as e:                      # not "truncated or corrupt": unreadable
        raise unreadable(path, e, "weights file") from None
    try:
        # PERF: mmap maps the file instead of reading it; only the tensors used get paged in.
        state = load_file(path) if hf else torch.load(path, map_location="cpu",
                                                      weights_only=True, mmap=True)
    except Exception as e:   # NOTE: zipfile, pickle, torch and safetensors raise many kinds
        why = first_line(e, 80) or type(e).__name__
        fix = ("truncated or not a safetensors file; download it again" if hf else
               "truncated, corrupt, or not a torch.save zip file; copy or convert it again")
        raise ValueError(f"cannot read {path} ({why}): it is {fix}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds {type(state).__name__}, not a state dict of named "
                         "tensors; copy or convert it again")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{key} in {path} is {type(value).__name__}, not a tensor: not a "
                             "model's weights; re-download or re-save them")
    return state


# What hf_tokenizer_json writes exactly is a SentencePiece model of LLaMA's kind. Its settings
# are read from the .model file itself, a protobuf message (SentencePiece's
# sentencepiece_model.proto; the field numbers below are that file's).
SP_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}      # TrainerSpec.model_type
SP_ODD_PIECES = {4: "user-defined", 5: "unused"}                    # SentencePiece.type


def proto_fields(message: bytes) -> dict:
    """{field number: [values]} of one protobuf message: an int for a varint (a number, an enum,
    a bool), bytes for a length-delimited field (a string, or a message inside), and the raw
    bytes of a fixed-size one (a float). The wire format, plainly."""
    fields, i = {}, 0

    def varint():                  # 7 bits a byte, the lowest first; a top bit set: more follow
        nonlocal i
        value, shift = 0, 0
        while True:
            byte, i = message[i], i + 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value
    while i < len(message):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        else:
            size = varint() if wire == 2 else {1: 8, 5: 4}[wire]
            value, i = message[i:i + size], i + size
        fields.setdefault(field, []).append(value)
    return fields


def check_exportable(tokenizer_path: str):
    """Refuse, in one line, a SentencePiece model that hf_tokenizer_json cannot write exactly.
    That tokenizer.json emulates LLaMA's kind -- BPE; no normalization but the dummy prefix and a
    "▁" for each space, none removed; byte fallback; no piece matched whole -- and any other
    kind would encode differently without a word (a unigram model given BPE merges, say)."""
    model = proto_fields(Tokenizer(tokenizer_path).sp.serialized_model_proto())
    trainer, norm = (proto_fields(model.get(k, [b""])[0]) for k in (2, 3))

    def setting(fields, number, default):           # the last value written, or proto's default
        return fields.get(number, [default])[-1]
    kind = SP_MODEL_TYPES.get(setting(trainer, 3, 1), "unknown")
    odd = [SP_ODD_PIECES[t] for piece in model.get(1, [])
           if (t := setting(proto_fields(piece), 3, 1)) in SP_ODD_PIECES]
    name = setting(norm, 1, b"").decode()
    problems = [why for ok, why in (
        (kind == "bpe", f"its model type is {kind}, not bpe"),
        (not setting(norm, 2, b""), f"it normalizes text ({name})"),
        (setting(norm, 3, 1), "it adds no dummy prefix (add_dummy_prefix false)"),
        (not setting(norm, 4, 1), "it removes extra whitespace (remove_extra_whitespaces)"),
        (setting(norm, 5, 1), "it keeps spaces as spaces (escape_whitespaces false)"),
        (not setting(trainer, 24, 0), "it puts the ▁ after words (treat_whitespace_as_suffix)"),
        (setting(trainer, 35, 0), "it has no byte fallback"),
        (not odd, f"it has {len(odd)} piece(s) of kind {' and '.join(sorted(set(odd)))}"),
    ) if not ok]
    if problems:
        raise ValueError(f"{tokenizer_path} cannot be exported as a tokenizer.json that encodes "
                         f"as it does: {'; '.join(problems)}. The export writes LLaMA's kind "
                         "(BPE, no normalization, spaces kept, byte fallback: tokenizer.py's "
                         "TRAINER_SPEC); convert this one with transformers' own converter")


def expected_shapes(args: ModelArgs) -> dict:
    """Meta's key -> shape, for this architecture, read off a model on the meta device."""
    with torch.device("meta"):                  # shapes only: no memory, no random numbers
        return {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}


def check_state(args: ModelArgs, state: dict, tok_path: str, source: str, config: str):
    """The tokenizer's size against the embedding, then every tensor the architecture needs,
    with the shape it implies, and nothing else."""
    n_words = Tokenizer(tok_path).n_words
    rows = state.get("tok_embeddings.weight", torch.empty(n_words, 0)).shape[0]
    if rows > n_words:                   # rows added in fine-tuning, or padded to a multiple
        raise ValueError(f"tokenizer {tok_path} has {n_words} pieces but the model embeds {rows} "
                         "tokens: tokens added beyond tokenizer.model (added tokens, or a padded "
                         "vocabulary) are not supported; trim the embedding and output rows back "
                         f"to its {n_words} pieces (or, if it is another model's tokenizer, use "
                         "the model's own tokenizer.model)")
    if rows != n_words:
        raise ValueError(f"tokenizer {tok_path} has {n_words} pieces but the model embeds {rows} "
                         "tokens: it belongs to another model; use the model's own tokenizer.model")
    check_shapes(args, {k: tuple(v.shape) for k, v in state.items()}, source, config)


def check_shapes(args: ModelArgs, shapes: dict, source: str, config: str):
    """{key: shape} of the weights against what `config` (params.json, config.json) implies. The
    depth first, from the keys alone: a config that says 10,000 layers is refused before even a
    model on the meta device is built for it."""
    layers = {int(m[1]) for k in shapes if (m := re.match(r"layers\.(\d+)\.", k))}
    if layers and max(layers) + 1 != args.n_layers:
        raise ValueError(f"{source} holds {max(layers) + 1} layers but {config} says n_layers="
                         f"{args.n_layers}: the weights and {config} come from different models; "
                         f"restore {config} beside its weights")
    expected = expected_shapes(args)
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise ValueError(f"{source} lacks {missing[0]} ({len(missing)} tensors missing): not a "
                         "complete LLaMA checkpoint; re-download or re-export it")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise ValueError(f"{source} has unexpected tensor {extra[0]}: not a plain LLaMA model")
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise ValueError(f"{key} in {source} has shape {tuple(shapes[key])} but {config} "
                             f"(dim={args.dim}, n_layers={args.n_layers}, n_heads={args.n_heads}, "
                             f"n_kv_heads={args.n_kv_heads}) implies {shape}: the weights and "
                             f"{config} come from different models")


def merged_shapes(shards: list) -> dict:
    """{key: shape} of the state dict merge_state_dicts would make of these shards, without
    making it: the split dimension summed over the shards."""
    shapes = {}
    for key, t in meta_weights(shards[0]).items():
        shape, dim = list(t.shape), shard_dim(key)
        if dim is not None and dim < len(shape):
            shape[dim] = sum(s[key].shape[dim] for s in shards if key in s)
        shapes[key] = tuple(shape)
    return shapes


def check_params(folder: str, args: ModelArgs):
    """A run's params.json against its weight files' shapes, before a model is built from it
    (the files are mapped, not read: no tensor is loaded). Files that cannot be read are left
    to the caller, which passes over such a checkpoint (train.resume)."""
    try:
        shards = [load_weights(p) for p in meta_shards(folder)]
    except (OSError, ValueError):
        return
    check_shapes(args, merged_shapes(shards), os.path.join(folder, shard_file(0)),
                 os.path.join(folder, "params.json"))


def pointed_step(pointer: str) -> str:
    """The step folder a `latest` file names, refused unless it is a name step-NNNNNN beside it:
    a pointer that leads out of its run's checkpoints/ is damaged, not followed."""
    name = read_file(pointer, 4096, "checkpoint pointer").decode("utf-8", "replace").strip()
    if step_of(name) < 0 or name != os.path.basename(name):
        raise ValueError(f"{pointer} names {name[:80]!r}, not a step-NNNNNN folder beside it: it "
                         "is damaged; write the name of the newest complete step folder into "
                         "it, or give that folder as --ckpt")
    return name


def checkpoint_paths(flag: str, ckpt: str) -> list:
    """(flag, path) pairs of what reading the checkpoint `ckpt` reads, for check_outputs: the
    path given, the folder a `latest` names, and the tokenizer.model of Meta's parent folder."""
    folder = checkpoint_folder(ckpt)
    parent = os.path.join(os.path.dirname(os.path.abspath(folder)), "tokenizer.model")
    return [(flag, ckpt), (flag, folder)] + ([(flag, parent)] if os.path.isfile(parent) else [])


def check_outputs(outputs: list, inputs: list):
    """Refuse, in one line, an output that is an input or lies inside one: a report written over
    its benchmark, an export inside the checkpoint it reads. outputs and inputs are (flag, path)
    pairs; paths are compared as the files they name (symlinks resolved). data.py, train.py,
    generate.py and eval.py call it before any work (tokenizer.py refuses any --out that
    exists)."""
    for out_flag, out in outputs:
        where = os.path.realpath(out)
        for in_flag, source in inputs:
            root = os.path.realpath(source) if source else None
            if root and os.path.commonpath([root, where]) == root:
                raise ValueError(f"{out_flag} {out} {'is' if where == root else 'lies inside'} "
                                 f"{in_flag} {source}: writing it would overwrite what this "
                                 f"command reads; choose an {out_flag} outside it")


# ---------------------------------------------------------------------------------------------
# 5. Writing safely
# ---------------------------------------------------------------------------------------------

def write_atomic(path: str, content):
    """Write text (or bytes) to a new file PATH.XXXXXXXX.tmp beside path, flush it to disk,
    close it, then rename it over path: readers see the old file or the new one, never a part.
    Each write has a temporary file of its own: two processes writing one path (two eval.py
    --out of one report) never write into each other's. A full disk raises here, before the
    rename, and a failed write or rename leaves no .tmp behind. The file keeps the mode of the
    one it replaces (a new one gets the usual 0666 less the umask)."""
    mode = stat.S_IMODE(os.stat(path).st_mode) if os.path.isfile(path) else new_file_mode()
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(path) or ".")
    try:
        with open(fd, "wb" if isinstance(content, bytes) else "w") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)              # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def new_file_mode() -> int:
    """The mode open() gives a new file here: 0666 less the umask (safetensors writes 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def save_safetensors(tensors: dict, path: str):
    """safetensors' save_file, a failed write an OSError (it raises its own SafetensorError,
    "... (os error 28)" on a full disk), the file given the mode of any new file (it writes
    0600). Anything else it refuses (tensors it cannot write) is raised as it is: no disk's."""
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except Exception as e:                   # NOTE: SafetensorError is no OSError
        code = e.errno if isinstance(e, OSError) else os_error(str(e))
        if code is None:
            raise
        full = ": is the disk full?" if code in (errno.ENOSPC, errno.EDQUOT) else ""
        raise OSError(f"could not write {path} ({first_line(e, 80)}){full}") from None
    os.chmod(path, new_file_mode())


def os_error(message: str) -> Optional[int]:
    """The errno in a message of Rust's std::io::Error, "... (os error 28)", or None."""
    m = re.search(r"\(os error (\d+)\)", message)
    return int(m[1]) if m else None


def save_torch(obj, path: str):
    """torch.save, flushed to disk; a failed write is reported as the OSError it is (on a full
    disk torch says only `inline_container.cc ... unexpected pos`)."""
    try:
        torch.save(obj, path)
    except RuntimeError as e:
        raise OSError(f"could not write {path} ({first_line(e, 60)}...): is the disk "
                      "full?") from None
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def lock(path: str) -> Optional[int]:
    """An exclusive lock on `path` (a folder, or a file made if absent), held until the returned
    descriptor is closed; None, at once, while another process holds any lock on it (a reader's
    shared one: reading). The system drops a lock when its process dies, however it dies, so a
    kill never leaves one stuck; forked workers share it."""
    fd = os.open(path, os.O_RDONLY if os.path.isdir(path) else os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def lock_run(out: str) -> int:
    """OUT/train.lock, for one run per --out at a time; it holds its owner's pid and host, for
    the message another run gets. ValueError when another process holds it, saying which, and
    when the lock or checkpoints/latest is a folder (`cp -r step-000004 latest`): a run could
    not replace that `latest`, and would fail at its first save, after each --resume again."""
    path = os.path.join(out, "train.lock")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise ValueError(f"{path} is a folder (or not a file), where a run keeps its lock file; "
                         f"move it out of {out}, then run again")
    # NOTE: only a real folder: a rename replaces a symlink or any other file (write_atomic).
    root = os.path.join(out, "checkpoints")
    pointer = os.path.join(root, "latest")
    if os.path.isdir(pointer) and not os.path.islink(pointer):
        raise ValueError(f"{pointer} is a folder, where a run names its newest checkpoint in a "
                         f"file; move it out of {root}, then run again")
    while True:
        fd = lock(path)
        if fd is None:
            raise ValueError(held_by(out, path))
        # NOTE: the run before may have removed the file (unlock_run) after we opened it: our
        # lock is then on a file no longer in OUT, which the next run would not see. Lock again.
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}".encode())
    return fd


def held_by(out: str, path: str) -> str:
    """Who holds a run's lock, and how to clear it: the pid and host the file names, checked
    against the processes of this machine that have it open (`fuser`'s answer). The pid a file
    names can be gone while a process it started (and that inherited the lock) holds it."""
    owner = read_file(path, 4096, "run lock").decode("utf-8", "replace").split()
    pid, host = owner if len(owner) == 2 else ("", "")
    named = f"pid {pid} on {host}" if pid else "its pid unknown"
    holders = lock_holders(path)
    if host == socket.gethostname() and pid.isdigit() and int(pid) in holders:
        return (f"{out} is in use by another run ({named}); wait for it to end, or choose "
                "another --out")
    if holders:
        return (f"{out} is in use: {path} is held by pid {holders[0]} ({command(holders[0])}), "
                f"though it names {named}; if that process is no run of {out}, end it (kill "
                f"{holders[0]}) and run again, or choose another --out")
    if host and host != socket.gethostname():
        return (f"{out} is in use by a run on {host} (pid {pid}), through a shared filesystem; "
                f"wait for it to end or end it there (the file server releases the lock of a "
                f"machine that went down within minutes), or choose another --out")
    return (f"{out} is in use by another run ({named}); `fuser -v {path}` names the process "
            "that holds it: wait for it to end, or end it; or choose another --out")


def command(pid: int) -> str:
    """The first 60 characters of a process's command line, or "?"."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read(200).replace(b"\0", b" ").decode("utf-8", "replace").strip()[:60]
    except OSError:
        return "?"


def lock_holders(path: str) -> list:
    """The pids of the other processes of this machine that have `path` open, as `fuser PATH`
    finds them in /proc ([] where there is no /proc, or none can be read)."""
    try:
        target = os.stat(path)
    except OSError:
        return []
    found = []
    for link in glob.glob("/proc/[0-9]*/fd/*"):   # folders it may not list are passed over
        pid = int(link.split("/")[2])
        with contextlib.suppress(OSError):        # a descriptor closed meanwhile
            if pid != os.getpid() and pid not in found and os.path.samestat(os.stat(link), target):
                found.append(pid)
    return found


def unlock_run(out: str, fd: int):
    """Remove OUT/train.lock, then release it: removed while still locked, so that a run that
    wins the lock after ours sees that its file was removed (lock_run), and locks the new one."""
    with contextlib.suppress(OSError):
        os.remove(os.path.join(out, "train.lock"))
    os.close(fd)


def start_build(out_dir: str) -> tuple:
    """(.tmp-NAME, its lock): an empty folder beside OUT to build in, locked by this process.
    A leftover of a killed build is removed first; one still being built is refused."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    tmp = os.path.join(parent, ".tmp-" + name)
    os.makedirs(parent, exist_ok=True)
    if os.path.isdir(tmp):                   # a leftover of a killed build, or a build running now
        held = lock(tmp)
        if held is None:
            raise FileExistsError(f"another process is building {tmp!r} right now; wait for it "
                                  "to finish or choose another --out")
        os.close(held)
        shutil.rmtree(tmp)
    os.mkdir(tmp)
    return tmp, lock(tmp)


def abandon_build(tmp: str, fd: int):
    """A build that failed (a full disk): start_build's folder removed, then its lock released,
    so that nothing half-written stays to take the space it needs when it is run again."""
    shutil.rmtree(tmp, ignore_errors=True)
    os.close(fd)


def remove_leftovers(folder: str):
    """Remove the .tmp-NAME folders in `folder` that no build holds: what killed builds, or
    failed ones that could not clean up, left behind (a run's checkpoints/ on a full disk); and
    the NAME.XXXXXXXX.tmp files of writes killed midway (write_atomic's: `latest`'s), which the
    caller, holding the run (lock_run), knows no live process is writing."""
    for path in glob.glob(os.path.join(glob.escape(folder), ".tmp-*")):
        if os.path.isdir(path):
            remove_unread(path)
    for path in glob.glob(os.path.join(glob.escape(folder), "*.????????.tmp")):  # mkstemp's
        if os.path.isfile(path):
            with contextlib.suppress(OSError):
                os.remove(path)


def finish_build(tmp: str, out_dir: str, replace: bool = False):
    """Flush every file of tmp to disk, then rename it to OUT (an existing OUT is replaced only
    if `replace`; an empty one always is). The caller then closes start_build's lock."""
    for folder, _, names in os.walk(tmp):
        for n in names:
            with open(os.path.join(folder, n), "rb") as f:
                os.fsync(f.fileno())
    if replace and os.path.isdir(out_dir) and os.listdir(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)


@contextlib.contextmanager
def building(out_dir: str):
    """Yield an empty folder .tmp-NAME beside OUT to build in; rename it to OUT at the end.

    OUT appears complete or not at all, and nothing is left to undo by hand: a build that
    fails removes its folder; one that is killed leaves .tmp-NAME behind, which the next build
    into OUT removes. The lock tells such a leftover from a build still running, which two
    builds into one OUT would otherwise destroy for each other. Checkpoints, datasets, exports.
    """
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"--out {os.path.abspath(out_dir)!r} exists and is not an empty "
                              "folder; choose a new one (the build never writes among other "
                              "files)")
    tmp, fd = start_build(out_dir)
    try:
        yield tmp
        finish_build(tmp, out_dir)
    except BaseException:                    # Ctrl-C included
        abandon_build(tmp, fd)
        raise
    os.close(fd)


# ---------------------------------------------------------------------------------------------
# 6. Reading safely
# ---------------------------------------------------------------------------------------------
# Every text, record or settings file the project reads whole goes through read_file: a regular
# file of bounded size, or one line that says what it is. A FIFO would block the reader forever,
# /dev/zero never end, and a 50 GB file would be read into memory before anything failed.

TEXT_LIMIT = 1 << 30        # a benchmark, a text to score, a .txt document: 1 GiB at most
JSON_LIMIT = 64 << 20       # params.json, manifest.json, train_config.json, dataset.json...


def regular_file(path: str, what: str = "file") -> os.stat_result:
    """os.stat of `path` (links followed) if it is a regular file, else a one-line error."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        broken = " (a symlink to nothing)" if os.path.islink(path) else ""
        raise FileNotFoundError(f"{what} {path} does not exist{broken}") from None
    except OSError as e:
        raise unreadable(path, e, what) from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{what} {path} is a folder; give a file")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {path} is not a regular file but a FIFO, a device or a socket, "
                         "which cannot be read to an end; give a file")
    return st


def unreadable(path: str, e: OSError, what: str) -> OSError:
    """An OSError met reading `path`, said in one line with what to do."""
    if isinstance(e, PermissionError):
        return PermissionError(f"cannot read {what} {path}: permission denied; give your user "
                               "read access to it (chmod u+r), then run again")
    return OSError(e.errno, f"cannot read {what} {path} ({e.strerror or e})")


def read_file(path: str, limit: Optional[int] = None, what: str = "file",
              advice: str = "split it into smaller files") -> bytes:
    """The bytes of a regular file of at most `limit` bytes (TEXT_LIMIT, read at each call), or
    a one-line error."""
    limit = TEXT_LIMIT if limit is None else limit
    st = regular_file(path, what)
    too_big = ValueError(f"{what} {path} holds {size_text(st.st_size)}, more than the "
                         f"{size_text(limit)} read at once; {advice}")
    if st.st_size > limit:
        raise too_big
    try:
        with open(path, "rb") as f:
            content = f.read(limit + 1)
    except OSError as e:
        raise unreadable(path, e, what) from None
    if len(content) > limit:                 # it grew since os.stat
        raise too_big
    return content


def size_text(n: float) -> str:
    """A size in words: 2,000 bytes, 64 MiB, 1,039.6 GiB."""
    return (f"{n:,.0f} bytes" if n < 2**20 else f"{n / 2**20:,.0f} MiB" if n < 2**30 else
            f"{n / 2**30:,.1f} GiB")


def read_json(path: str, fix: str, what: str = "file"):
    """A JSON file read whole (read_file's bound: JSON_LIMIT), or a one-line error that names
    the file and says `fix`."""
    raw = read_file(path, JSON_LIMIT, what, fix)
    try:
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({first_line(e, 80)}); {fix}") from None


@contextlib.contextmanager
def reading(ckpt: str):
    """Yield the folder `ckpt` names (OUT/checkpoints/latest resolved), held by a shared lock
    while the caller reads it: a run rotating its checkpoints (--keep) then leaves it for its
    next save (remove_unread) instead of deleting it under the reader. When the folder that
    `latest` named was deleted before the lock was taken, `latest` is read again."""
    for _ in range(10):
        folder = checkpoint_folder(ckpt)
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:                          # gone, or no folder: the caller says so
            fd = None
        if fd is None:
            yield folder
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)       # waits while a rotation deletes it
            try:
                alive = os.path.samestat(os.fstat(fd), os.stat(folder))
            except OSError:
                alive = False
            if alive:                            # else deleted meanwhile: the newer `latest`
                yield folder
                return
        finally:
            os.close(fd)
    raise FileNotFoundError(f"{ckpt} kept naming deleted folders while a run rotated its "
                            "checkpoints; run again")


def remove_unread(folder: str):
    """Delete a folder unless a reader holds it (reading) or a build is writing it (building):
    that one stays, and is removed by the next call."""
    held = lock(folder)
    if held is None:
        return
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(held)
