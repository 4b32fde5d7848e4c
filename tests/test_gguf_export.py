"""export-gguf: files llama.cpp loads as they are, checked in llama.cpp itself through
llama-cpp-python (built from PyPI by `make test`; the llama.cpp tests are marked slow)."""

from __future__ import annotations

import base64
import ctypes
import io
import json

import numpy as np
import pytest
import torch
from conftest import prompt_inputs

from llava_lite.config import ConfigError
from llava_lite.gguf_export import export_gguf
from llava_lite.gguf_llm import llama_permute, pre_tokenizer_name

QUESTION = "What is in the picture?"
F32 = 0  # GGML_TYPE_F32: llama.cpp's KV cache is f16 unless told otherwise


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory):
    """A tiny random SigLIP vision model (no CLS token) with its image processor config."""
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(2)
    out = tmp_path_factory.mktemp("tiny-siglip")
    SiglipVisionModel(cfg).save_pretrained(out)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture
def siglip_lite(tiny_config, tiny_siglip_dir):
    from conftest import randomize_lora

    from llava_lite import LlavaLite
    from llava_lite.checkpoint import build_model

    config = tiny_config(lora=True)
    config.vision.model_id = str(tiny_siglip_dir)
    torch.manual_seed(5)  # peft draws LoRA A from the global generator: fix it, whatever ran before
    model, processor = build_model(config, seed=5)
    randomize_lora(model.llm, 5)
    with torch.no_grad():  # a projector strong enough that the image decides the reply
        for p in model.projector.parameters():
            p.normal_(0, 0.6)
    return LlavaLite(model, processor, source="tiny-siglip")


@pytest.fixture
def photo():
    """A 32x32 image: the towers' own size, so neither side resamples it."""
    from PIL import Image

    return Image.fromarray(np.random.default_rng(3).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _read(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def test_llama_permute_is_a_row_reordering_within_each_head():
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(4 * 8, 3)  # 4 heads of dim 8
    p = llama_permute(w, 4)
    assert sorted(p[:, 0].tolist()) == sorted(w[:, 0].tolist())
    # head 1's rows stay in head 1; pairs (i, i + 4) of the halves become adjacent rows
    assert p[8:16, 0].tolist() == [w[8 + i // 2 + 4 * (i % 2), 0].item() for i in range(8)]


def test_export_writes_named_tensors_and_q8_0_on_request(tiny_lite, tmp_path):
    import gguf

    lite = tiny_lite(lora=True, seed=3)
    paths = export_gguf(lite.model, lite.processor, tmp_path, type_name="q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llm-q8_0.gguf", "mmproj-q8_0.gguf"]
    reader, tensors = _read(paths["llm"])
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd
    assert "<image>" not in [bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode()
                             for i in reader.fields["tokenizer.ggml.tokens"].data[-3:]]
    template = reader.fields["tokenizer.chat_template"].contents()
    assert "<__media__>" in template
    _, vision = _read(paths["mmproj"])
    assert {"mm.0.weight", "mm.2.bias", "v.class_embd", "v.patch_embd.weight", "v.blk.2.ffn_down.weight"} <= set(vision)
    assert not any(name.startswith("v.post_ln") for name in vision)  # features precede it
    assert vision["v.patch_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16


@pytest.mark.parametrize("kw, match", [
    ({"projector": "linear"}, "mlp2x_gelu"),
    ({"strategy": "cls_patch"}, "drops CLS"),
])
def test_export_refuses_what_the_mmproj_graph_cannot_compute(tiny_lite, tmp_path, kw, match):
    lite = tiny_lite(lora=False, **kw)
    with pytest.raises(ConfigError, match=match):
        export_gguf(lite.model, lite.processor, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # checked before anything is written
    paths = export_gguf(lite.model, lite.processor, tmp_path / "y", llm_only=True)
    assert list(paths) == ["llm"] and paths["llm"].is_file()


def test_unknown_pre_tokenizer_is_refused_by_name():
    tok = {"model": {"type": "BPE"}, "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}}
    with pytest.raises(ConfigError, match="Whitespace"):
        pre_tokenizer_name(tok)
    with pytest.raises(ConfigError, match="Unigram"):
        pre_tokenizer_name({"model": {"type": "Unigram"}})


# ---- in llama.cpp -------------------------------------------------------------------------

def _llama(path, **kw):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, type_k=F32, type_v=F32, **kw)


def _image_embeddings(paths, llama, image) -> np.ndarray:
    """The projected image embeddings llama.cpp's libmtmd computes for `image`."""
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings = False, 2, False
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # its CPU kernel rounds K/V to f16
    ctx = mtmd.mtmd_init_from_file(str(paths["mmproj"]).encode(), llama.model, params)
    assert ctx, "libmtmd could not load the mmproj"
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
    chunks = mtmd.mtmd_input_chunks_init()
    text = mtmd.mtmd_input_text()
    raw = mtmd.mtmd_default_marker()
    text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), False, True
    try:
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        chunk = next(mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))
                     if mtmd.mtmd_input_chunk_get_type(mtmd.mtmd_input_chunks_get(chunks, i))
                     == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE)
        assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
        n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        width = llama.n_embd()
        return np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * width,)).reshape(n, width).copy()
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)


def _chat(paths, image, question: str, max_tokens: int) -> dict:
    """A greedy reply through llama-cpp-python's MTMDChatHandler: the GGUF's own chat template."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    llama = _llama(paths["llm"], chat_handler=MTMDChatHandler(clip_model_path=str(paths["mmproj"]), verbose=False,
                                                              use_gpu=False))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": question}]}]
    return llama.create_chat_completion(messages=messages, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                        repeat_penalty=1.0, max_tokens=max_tokens)


@pytest.mark.slow
def test_llm_gguf_gives_transformers_logits_and_tokens(tiny_lite, tmp_path):
    from llava_lite.lora import merged_copy

    lite = tiny_lite(lora=True, seed=7)
    paths = export_gguf(lite.model, lite.processor, tmp_path, type_name="f32")
    text = "Hello there, it's 2026: how're you doing?  Ünïcode 12345\n"
    ids = lite.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    llama = _llama(paths["llm"], logits_all=True)
    assert llama.tokenize(text.encode(), add_bos=False, special=True) == ids
    llama.eval(ids)
    with torch.no_grad():
        ours = merged_copy(lite.model.llm).eval()(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(np.asarray(llama.scores[: len(ids)]) - ours).max() < 1e-3


@pytest.mark.slow
def test_smollm_digit_pre_tokenizer_matches_in_llama_cpp(tiny_lite, tmp_path):
    """The second known pre-tokenizer (SmolLM's digits-apart split): llama.cpp accepts the name
    and tokenizes as transformers does. SmolLM2's vocabulary has no multi-digit tokens, so
    here the two splits agree; what this checks is the entry, not a difference."""
    from transformers import PreTrainedTokenizerFast

    lite = tiny_lite(lora=False)
    text = "Call 0800 123456 at 9:45, not 10:30 - it's 2x faster."
    tok_dir = tmp_path / "tok"
    lite.processor.tokenizer.save_pretrained(tok_dir)
    data = json.loads((tok_dir / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    (tok_dir / "tokenizer.json").write_text(json.dumps(data))
    lite.processor.tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    paths = export_gguf(lite.model, lite.processor, tmp_path / "out", type_name="f32", llm_only=True)
    ids = lite.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert _llama(paths["llm"]).tokenize(text.encode(), add_bos=False, special=True) == ids


@pytest.mark.slow
# ggml's GELU reads an f16 table, so even f32 files agree to ~1e-3 of the embeddings' scale
# q8_0 is checked on the embeddings and the first word: on random tiny weights the logits lie so
# close that 8-bit rounding changes later greedy picks
@pytest.mark.parametrize("type_name, tol", [("f32", 2e-3), ("f16", 2e-2), ("q8_0", 5e-2)])
def test_siglip_export_answers_in_llama_cpp_as_in_llava_lite(siglip_lite, photo, tmp_path, type_name, tol):
    lite = siglip_lite
    paths = export_gguf(lite.model, lite.processor, tmp_path, type_name=type_name)
    ids, pixels = prompt_inputs(lite, [photo], QUESTION)
    with torch.no_grad():
        ours_embeds = lite.model.encode_images(pixels)[0].numpy()
    theirs_embeds = _image_embeddings(paths, _llama(paths["llm"]), photo)
    assert theirs_embeds.shape == ours_embeds.shape
    assert np.abs(theirs_embeds - ours_embeds).max() < tol * max(1.0, np.abs(ours_embeds).max())
    reply = _chat(paths, photo, QUESTION, max_tokens=12)
    assert reply["usage"]["prompt_tokens"] == ids.shape[1]  # same prompt, image tokens included
    with torch.no_grad():
        tokens = lite.model.generate(ids, image_embeds=lite.model.encode_images(pixels), max_new_tokens=12,
                                     do_sample=False, pad_token_id=lite.processor.pad_token_id)[0]
    other = lite.model.generate(ids, image_embeds=lite.model.encode_images(pixels.flip(-1)), max_new_tokens=12,
                                do_sample=False, pad_token_id=lite.processor.pad_token_id)[0]
    assert other.tolist() != tokens.tolist()  # the image decides the reply, so this compares vision too
    text = reply["choices"][0]["message"]["content"]
    if type_name == "q8_0":
        assert text.startswith(lite.processor.tokenizer.decode(tokens[:1]))
        return
    assert reply["usage"]["completion_tokens"] == len(tokens)
    assert text == lite.processor.tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.slow
def test_clip_export_computes_what_llama_cpp_llava_graph_computes(tiny_lite, photo, tmp_path):
    """CLIP has a CLS token, which llama.cpp's llava graph misplaces (ggml-org/llama.cpp#25814):
    CLS goes after the patches but positions are read CLS-first, and rows 1..n are kept. The
    exported weights must reproduce exactly that computation; when llama.cpp is fixed this
    test fails and should then require equality with llava-lite's own embeddings."""
    lite = tiny_lite(lora=True, seed=9)
    paths = export_gguf(lite.model, lite.processor, tmp_path, type_name="f32")
    theirs = _image_embeddings(paths, _llama(paths["llm"]), photo)
    tower = lite.model.vision_tower
    vm = getattr(tower.model, "vision_model", tower.model)
    with torch.no_grad():
        pixels = lite.processor.pixel_values([photo])
        patches = vm.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = vm.embeddings.class_embedding[None, None]
        h = vm.pre_layrnorm(torch.cat([patches, cls], 1) + vm.embeddings.position_embedding.weight[None])
        layers = len(vm.encoder.layers) + 1 + tower.feature_layer
        for layer in vm.encoder.layers[:layers]:
            out = layer(h, None)
            h = out[0] if isinstance(out, tuple) else out
        defect = lite.model.projector(h[:, 1:])[0].numpy()
        ours = lite.model.encode_images(pixels)[0].numpy()
    assert np.abs(theirs - defect).max() < 2e-3 * max(1.0, np.abs(defect).max())
    assert np.abs(theirs - ours).max() > 1e-2  # the defect is real, not a no-op
