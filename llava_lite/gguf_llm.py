"""A llava-lite language model as a llama.cpp GGUF file (`llava-lite export-gguf`).

Written with the `gguf` package: llama-architecture hyperparameters, the weights under
llama.cpp's tensor names (Q/K rows reordered for its rotary layout), and the tokenizer as a
byte-level BPE vocabulary with its merges, special ids and chat template. Only what this
module can write faithfully is accepted; anything else is refused with the reason.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llava_lite.config import ConfigError

# Exact model_type -> llama.cpp architecture. Other decoders need their own tensor and
# hyperparameter mapping (llama.cpp's convert_hf_to_gguf.py has them; run it on export-hf).
ARCHES = {"llama": "LLAMA"}

# tokenizer.json's pre_tokenizer (as sorted JSON) -> llama.cpp's pre-tokenizer name. Each entry
# is tested by tokenizing the same text in both (tests/test_gguf_export.py).
PRE_TOKENIZERS = {
    json.dumps({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
               sort_keys=True): "gpt-2",
    json.dumps({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ]}, sort_keys=True): "smollm",
}


@dataclass(frozen=True)
class OutType:
    """How 2-D weights are stored; 1-D tensors (norms, biases) always stay f32."""

    name: str
    tensor_type: str  # gguf.GGMLQuantizationType member
    file_type: str  # gguf.LlamaFileType member


OUTTYPES = {
    "f32": OutType("f32", "F32", "ALL_F32"),
    "f16": OutType("f16", "F16", "MOSTLY_F16"),
    "q8_0": OutType("q8_0", "Q8_0", "MOSTLY_Q8_0"),
}


def outtype(name: str) -> OutType:
    if name not in OUTTYPES:
        raise ConfigError(f"unknown GGUF type {name!r}; choose one of {sorted(OUTTYPES)}")
    return OUTTYPES[name]


def encode_tensor(data: np.ndarray, out: OutType, force_float: bool = False) -> tuple[np.ndarray, object]:
    """(array, raw dtype or None) for `GGUFWriter.add_tensor`. Q8_0 needs rows that are whole
    blocks of 32; other tensors fall back to f16 (or f32 for 1-D ones)."""
    import gguf

    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim == 1 or out.name == "f32":
        return data, None
    if out.name == "q8_0" and not force_float:
        qtype = gguf.GGMLQuantizationType.Q8_0
        if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            return gguf.quants.quantize(data, qtype), qtype
    return data.astype(np.float16), None


def llama_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers rotates the two halves of each head; llama.cpp rotates adjacent pairs.
    Reordering each head's rows makes the same weights give the same attention."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def check_llm(llm) -> str:
    """The llama.cpp architecture name for `llm`, or a ConfigError saying why it can't be written."""
    cfg = llm.config
    if cfg.model_type not in ARCHES:
        raise ConfigError(
            f"export-gguf writes {sorted(ARCHES)} language models; this one is {cfg.model_type!r}. "
            "Export it with export-hf and convert that folder with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"export-gguf: rope scaling {rope.get('rope_type')!r} is not supported")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ConfigError("export-gguf: a llama with attention or MLP biases is not supported")
    return ARCHES[cfg.model_type]


def write_llm_gguf(llm, tokenizer, chat_template: str, path: str | Path, out: OutType,
                   name: str = "llava-lite") -> Path:
    """Write a merged (LoRA-free) causal LM and its tokenizer as one GGUF file."""
    import gguf

    arch = getattr(gguf.MODEL_ARCH, check_llm(llm))
    path = Path(path)
    writer = new_writer(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(getattr(gguf.LlamaFileType, out.file_type))
    n_rows = llm.get_input_embeddings().num_embeddings
    _add_hparams(writer, llm.config, n_rows)
    _add_vocab(writer, tokenizer, n_rows, chat_template)
    _add_weights(writer, llm, arch, out)
    finish(writer, path)
    return path


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def new_writer(path: Path, arch_name: str):
    """A GGUFWriter on `<path>.part`; `finish` renames it, so a crash never leaves a half file
    under the real name."""
    import gguf

    return gguf.GGUFWriter(str(_partial(path)), arch_name)


def finish(writer, path: Path) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    _partial(path).replace(path)


def _add_hparams(writer, cfg, n_rows: int) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(n_rows)


def _add_weights(writer, llm, arch, out: OutType) -> None:
    import gguf

    cfg = llm.config
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tied = llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    for hf_name, tensor in llm.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        gg_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            raise ConfigError(f"export-gguf: no llama.cpp name for tensor {hf_name!r}")
        t = tensor.detach().float()
        if hf_name.endswith("q_proj.weight"):
            t = llama_permute(t, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            t = llama_permute(t, cfg.num_key_value_heads)
        data, raw = encode_tensor(t.numpy(), out)
        writer.add_tensor(gg_name, data, raw_dtype=raw)


def vocab_pieces(tokenizer, n_rows: int) -> tuple[list[str], list[int]]:
    """The token strings and llama.cpp token types for ids 0..n_rows-1.

    Ids the tokenizer lacks (embedding rows kept for padding) become unused placeholders. A
    token past the embedding table can only be an image placeholder llava-lite added: images
    reach llama.cpp as embeddings through its media marker, so it is left out.
    """
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    beyond = sorted(i for i in by_id if i >= n_rows)
    special = set(tokenizer.all_special_ids)
    stray = [by_id[i] for i in beyond if i not in special]
    if stray:
        raise ConfigError(f"export-gguf: tokens {stray[:3]} have ids past the embedding table ({n_rows} rows)")
    pieces, types = [], []
    for i in range(n_rows):
        if i not in by_id:
            pieces.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        pieces.append(by_id[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return pieces, [int(t) for t in types]


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for this byte-level BPE tokenizer's pre-tokenizer."""
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConfigError("export-gguf writes byte-level BPE tokenizers only (GPT-2 style); this one is "
                          f"{model.get('type')!r}. Convert the export-hf folder with llama.cpp instead")
    if tokenizer_json.get("normalizer") is not None:
        raise ConfigError("export-gguf: a tokenizer with a normalizer is not supported")
    key = json.dumps(tokenizer_json.get("pre_tokenizer"), sort_keys=True)
    if key not in PRE_TOKENIZERS:
        raise ConfigError(f"export-gguf: no llama.cpp pre-tokenizer is known to match {key}")
    return PRE_TOKENIZERS[key]


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def _add_vocab(writer, tokenizer, n_rows: int, chat_template: str) -> None:
    import gguf

    pieces, types = vocab_pieces(tokenizer, n_rows)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        tok_json = json.loads((Path(tmp) / "tokenizer.json").read_text())
        special = gguf.SpecialVocab(Path(tmp), load_merges=True, n_vocab=n_rows)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tok_json))
    writer.add_token_list(pieces)
    writer.add_token_types(types)
    special.chat_template = chat_template
    special.add_special_token = {"bos": _adds_bos(tokenizer), "eos": False}
    special.add_to_gguf(writer, quiet=True)
