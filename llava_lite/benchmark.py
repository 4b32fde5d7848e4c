"""`llava-lite bench`: speed and memory of a model in several precisions, side by side with
plain transformers generation on the same LLM and the memory-bandwidth bound.

Each variant runs in its own process, so its peak memory is its own.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

VARIANTS = {  # name -> (dtype, quantize)
    "fp32": ("fp32", None),
    "bf16": ("bf16", None),
    "8bit": ("fp32", "8bit"),
    "4bit": ("fp32", "4bit"),
    "int8-w8a8-prefill": ("fp32", "int8-w8a8-prefill"),
    "int8-weight-only": ("fp32", "int8-weight-only"),
    "dynamic-int8": ("fp32", "dynamic-int8"),
    "bnb-8bit": ("fp32", "bnb-8bit"),
    "bnb-4bit": ("fp32", "bnb-4bit"),
    "torchao-int8": ("fp32", "torchao-int8"),
    "torchao-int8-weight-only": ("fp32", "torchao-int8-weight-only"),
    # llama.cpp decodes the same merged LLM (llama-cpp-python; tower and projector in torch)
    "llamacpp-f32": ("fp32", "llamacpp-f32"),
    "llamacpp-q8_0": ("fp32", "llamacpp-q8_0"),
}
QUESTION = "Describe the image in one sentence."
FOLLOW_UP = "What colors do you see?"


@dataclass
class BenchResult:
    variant: str
    backend: str
    device: str
    load_s: float = 0.0
    llm_weight_bytes: int = 0
    image_encode_ms: float = 0.0
    prompt_tokens: int = 0
    prefill_ms: float = 0.0
    first_token_ms: float = 0.0  # a new chat, new image: encode + prefill + first token, shared head cached
    cold_first_token_ms: float = 0.0  # the same with nothing cached (the engine's very first chat)
    second_turn_first_token_ms: float = 0.0  # image features cached
    decode_tok_s: float = 0.0
    ask_decode_tok_s: float = 0.0  # through the public `ask()`: prompt building, caches, generate
    reference: str = ""
    reference_prefill_ms: float = 0.0
    reference_decode_tok_s: float = 0.0
    batch_tok_s: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int = 0
    peak_memory_kind: str = "rss"
    error: str = ""


def state_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's weights as stored (quantized ones included), shared tensors once.

    `parameters()` misses packed int8 weights (they are not Parameters), so walk the state
    dict, which holds every stored tensor, packed tuples included.
    """
    seen: set[int] = set()
    total = 0

    def add(value) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor) and type(value) not in (torch.Tensor, torch.nn.Parameter) \
                and hasattr(value, "__tensor_flatten__"):  # a quantized tensor subclass (torchao)
            names, _ = value.__tensor_flatten__()
            for name in names:
                add(getattr(value, name))
        elif isinstance(value, torch.Tensor):
            key = value.untyped_storage().data_ptr() if value.device.type != "meta" else id(value)
            if key in seen:
                return
            seen.add(key)
            total += value.numel() * value.element_size()
        elif isinstance(value, (tuple, list)):
            for v in value:
                add(v)

    for value in module.state_dict(keep_vars=True).values():
        add(value)
    return total


def memory_bandwidth_gbs(size_mb: int = 512, repeats: int = 5) -> float:
    """Sustained read bandwidth (GB/s): the best of `repeats` sums over a buffer far larger
    than the caches, with torch's threads."""
    x = torch.ones(size_mb * 1024 * 1024 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def _images(n: int) -> list:
    """Distinct scenes from the shape generator (no files needed): in the default model's
    domain, so they reach the LLM as image tokens. Photo-like noise would be turned into a
    line of text by the label bridge and time a shorter prompt."""
    import random

    from llava_lite.data.scenes import make_scene, render

    rng = random.Random(0)
    return [render(make_scene(rng), rng) for _ in range(n)]


def _load_variant(model_path: str | None, variant: str, device: str | None):
    """The model as `from_pretrained` and serving give it (LoRA merged, then quantized), and a llava-hf export of it
    as the reference where it can be exported."""
    from llava_lite.api import LlavaLite
    from llava_lite.hf_interop import export_hf, is_exportable

    dtype, quantize = VARIANTS[variant]
    t = time.perf_counter()
    # The default load path, as users and the server get it: a LoRA adapter is merged on load.
    lite = LlavaLite.from_pretrained(model_path, dtype=dtype, device=device)
    hf_dir = None
    if quantize is None and is_exportable(lite.model):
        hf_dir = Path(tempfile.mkdtemp(prefix="llava-lite-bench-"))
        export_hf(lite.model, lite.processor, hf_dir)
    if quantize:
        lite.quantize(quantize)
    res = BenchResult(variant=variant, backend=lite.quantization if quantize else dtype, device=str(lite.device))
    res.load_s = time.perf_counter() - t
    # what decodes: the GGUF file under llama.cpp, else the torch LLM's stored tensors
    res.llm_weight_bytes = lite.decoder.gguf_path.stat().st_size if lite.decoder else state_bytes(lite.model.llm)
    return lite, hf_dir, res


def _time_encode(lite, images, repeats: int, res: BenchResult) -> None:
    dev = lite.device
    pixels = [lite.processor.image_preprocess([img]) for img in images[:repeats + 1]]
    lite.model.encode_images(pixels[0])  # warm-up
    encode = []
    for px in pixels[1:]:
        _sync(dev)
        t = time.perf_counter()
        lite.model.encode_images(px)
        _sync(dev)
        encode.append(time.perf_counter() - t)
    res.image_encode_ms = 1000 * statistics.median(encode)


def _prefill_and_decode(make, new_tokens: int, repeats: int, dev) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of `make(n)`, a generation of exactly n tokens."""
    make(2)()  # warm-up
    t1 = _best(make(1), repeats, dev)
    tn = _best(make(new_tokens), repeats, dev)
    return t1, (new_tokens - 1) / max(tn - t1, 1e-9)


def _reference(lite, hf_dir: Path | None, ids, image, gen: dict, res: BenchResult):
    """transformers' own generate on the same LLM and prompt length: LlavaForConditionalGeneration
    on the exported model where the model can be exported, else the bare causal LM."""
    dev = lite.device
    if hf_dir is not None:
        from transformers import LlavaForConditionalGeneration

        hf = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=lite.model.dtype).to(dev).eval()
        pix = lite.processor.pixel_values([image]).to(dev, lite.model.dtype)
        res.reference = "LlavaForConditionalGeneration (export-hf)"
        return lambda n: lambda: hf.generate(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids),
                                             max_new_tokens=n, min_new_tokens=n, **gen)
    tok = lite.processor.tokenizer
    ref_ids = torch.randint(100, len(tok) - 100, ids.shape, generator=torch.Generator().manual_seed(0)).to(dev)
    llm = lite.model.llm
    res.reference = "AutoModelForCausalLM.generate (same LLM)"
    return lambda n: lambda: llm.generate(input_ids=ref_ids, attention_mask=torch.ones_like(ref_ids),
                                          max_new_tokens=n, min_new_tokens=n, **gen)


def _time_generation(lite, hf_dir: Path | None, images, new_tokens: int, repeats: int, res: BenchResult) -> None:
    dev = lite.device
    messages = [lite.user_message(QUESTION)]
    ids = torch.tensor([lite.processor.encode_prompt(messages)], device=dev)
    res.prompt_tokens = ids.shape[1]
    embeds = lite.encode_images([images[0]])
    gen = {"do_sample": False, "pad_token_id": lite.processor.pad_token_id}

    def ours(n: int):
        if lite.decoder is not None:
            from llava_lite.llamacpp_chat import tokens

            keys = [f"bench-{i}" for i in range(embeds.shape[0])]
            opts = {"max_new_tokens": n, "min_new_tokens": n, "eos_token_id": lite.processor.tokenizer.eos_token_id}
            return lambda: (lite.decoder.reset(), list(tokens(lite, ids[0].tolist(), embeds, keys, opts)))
        return lambda: lite.model.generate(ids, image_embeds=embeds, max_new_tokens=n, min_new_tokens=n, **gen)

    t1, res.decode_tok_s = _prefill_and_decode(ours, new_tokens, repeats, dev)
    res.prefill_ms = 1000 * t1

    def through_ask(n: int):
        return lambda: lite.ask(images[0], QUESTION, max_new_tokens=n, min_new_tokens=n)

    _, res.ask_decode_tok_s = _prefill_and_decode(through_ask, new_tokens, repeats, dev)
    r1, res.reference_decode_tok_s = _prefill_and_decode(_reference(lite, hf_dir, ids, images[0], gen, res),
                                                         new_tokens, repeats, dev)
    res.reference_prefill_ms = 1000 * r1


def _time_chat_turns(lite, images, new_tokens: int, repeats: int, res: BenchResult) -> None:
    """Chat latency as a user sees it: time to the first token of a first turn (a new image:
    load, encode, template, prefill), on an engine that has served nobody yet (cold) and on one
    that has served another chat (the system prompt's keys and values are then shared, see
    `llava_lite.prompt_cache`), and of a follow-up (image features and the previous turn's KV
    cache reused). A one-token generation times exactly that; each figure is the best of
    `repeats` rounds, each round on two images not seen before."""
    messages = [lite.user_message(QUESTION)]
    lite.chat(messages, images=[images[0]], max_new_tokens=2)  # warm-up (template compile, threads)
    cold, new_chat, follow_up = [], [], []
    for r in range(repeats):
        first, fresh = images[1 + 2 * r], images[2 + 2 * r]
        lite.image_cache.clear()
        lite.prompt_cache.clear()
        if lite.decoder is not None:
            lite.decoder.reset()  # cold, as the torch paths are: no prefix kept from before
        cold.append(_first_token_s(lite, messages, first))
        new_chat.append(_first_token_s(lite, messages, fresh))
        reply = lite.chat(messages, images=[fresh], max_new_tokens=new_tokens)
        turn2 = [*messages, {"role": "assistant", "content": reply or "An image."},
                 {"role": "user", "content": FOLLOW_UP}]
        follow_up.append(_first_token_s(lite, turn2, fresh))
    res.cold_first_token_ms = 1000 * min(cold)
    res.first_token_ms = 1000 * min(new_chat)
    res.second_turn_first_token_ms = 1000 * min(follow_up)


def _first_token_s(lite, messages, image) -> float:
    t = time.perf_counter()
    lite.chat(messages, images=[image], max_new_tokens=1)
    return time.perf_counter() - t


def _time_batches(lite, images, batch_sizes: list[int], repeats: int, res: BenchResult) -> None:
    for b in batch_sizes:
        batch_new = 16
        imgs = images[:b]

        def batch(imgs=imgs, b=b, n=batch_new):
            lite.image_cache.clear()
            lite.ask_batch(imgs, [QUESTION] * b, batch_size=b, max_new_tokens=n, min_new_tokens=n)

        res.batch_tok_s[str(b)] = b * batch_new / _best(batch, max(1, repeats - 1), lite.device)


def run_variant(model_path: str | None, variant: str, new_tokens: int, repeats: int,
                batch_sizes: list[int], device: str | None) -> BenchResult:
    """Every figure of one variant (run in its own process by `run_all`)."""
    lite, hf_dir, res = _load_variant(model_path, variant, device)
    dev = lite.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    images = _images(max(batch_sizes + [2 * repeats + 1]))
    with torch.no_grad():
        _time_encode(lite, images, repeats, res)
        _time_generation(lite, hf_dir, images, new_tokens, repeats, res)
    _time_chat_turns(lite, images, new_tokens, repeats, res)
    if lite.decoder is None:  # batches run in torch; llama.cpp variants would time that, not themselves
        _time_batches(lite, images, batch_sizes, repeats, res)
    if hf_dir is not None:
        shutil.rmtree(hf_dir, ignore_errors=True)
    if dev.type == "cuda":
        res.peak_memory_bytes = torch.cuda.max_memory_allocated(dev)
        res.peak_memory_kind = "cuda"
    else:
        res.peak_memory_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return res


def run_all(model_path: str | None, variants: list[str], new_tokens: int = 64, repeats: int = 3,
            batch_sizes: list[int] | None = None, device: str | None = None) -> dict:
    """Every variant in a fresh process; returns {"bandwidth_gbs", "results": [...]}."""
    from tqdm import tqdm

    batch_sizes = batch_sizes or [1, 4, 8]
    out = {"bandwidth_gbs": memory_bandwidth_gbs(), "threads": torch.get_num_threads(),
           "model": model_path or "default", "new_tokens": new_tokens, "results": []}
    for variant in tqdm(variants, desc="bench", unit="variant"):
        cmd = [sys.executable, "-m", "llava_lite.benchmark", "--variant", variant, "--new-tokens", str(new_tokens),
               "--repeats", str(repeats), "--batch-sizes", ",".join(map(str, batch_sizes))]
        if model_path:
            cmd += ["--model", str(model_path)]
        if device:
            cmd += ["--device", device]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            out["results"].append(asdict(BenchResult(variant, "", device or "cpu", error=tail[0][:300])))
            continue
        out["results"].append(json.loads(lines[-1]))
    return out


def cmd_bench(args) -> int:
    from llava_lite.bench_report import markdown, plot

    """`llava-lite bench` (its arguments are declared in `llava_lite.cli`)."""
    variants = [v.strip() for v in args.quantize.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"llava-lite bench: unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}", file=sys.stderr)
        return 2
    report = run_all(args.model, variants, args.new_tokens, args.repeats,
                     [int(b) for b in args.batch_sizes.split(",")], args.device)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(report, indent=2))
        (out / "bench.md").write_text(markdown(report))
        plot(report, out / "bench.png")
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0 if all(not r.get("error") for r in report["results"]) else 1


def _main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="one bench variant (used by `llava-lite bench`)")
    p.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    p.add_argument("--model", default=None)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--device", default=None)
    a = p.parse_args()
    res = run_variant(a.model, a.variant, a.new_tokens, a.repeats, [int(b) for b in a.batch_sizes.split(",")],
                      a.device)
    print(json.dumps(asdict(res)))


if __name__ == "__main__":
    _main()
