"""`llava-lite bench-train`: training and decode speed at LLaVA-1.5's shapes, no Hub needed.

    llava-lite bench-train                      # on a GPU: LLaVA-1.5-7B shapes, bf16, ~5 minutes
    llava-lite bench-train --shapes tiny        # anywhere, in seconds (what CI runs)

The parts are built from configs with random weights: a CLIP ViT-L/14-336 tower (576 patch
tokens from the penultimate layer, as LLaVA-1.5), a Llama-2-7B-shaped LLM (Vicuna-7B's shape)
and the mlp2x_gelu projector, assembled into llava-lite's own model and trained with its own
loss. Two stages are timed, each at the largest micro-batch that fits (powers of two):
- align: only the projector trains (LLaVA-1.5's pretraining);
- lora: LoRA r=128, alpha=256 on every LLM linear layer plus the projector (LLaVA-1.5's LoRA
  recipe; its published 10 h are for full fine-tuning).
Each prints samples/s, tokens/s, peak memory, MFU (FLOPs counted as train_flops.py explains)
and the hours one epoch of LLaVA-1.5's data would take on 1 and on 8 such GPUs (linear scaling
assumed), beside the paper's 8xA100 hours. Then bf16 and 8-bit decode speed of the LLM.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llava_lite.train.train_flops import Shape, linear_params, peak_tflops, sample_flops

# LLaVA-1.5 (Liu et al. 2023): 558K alignment and 665K instruction samples, one epoch each;
# about 3.5 h and 10 h on 8xA100 for the 7B model.
LLAVA15_SAMPLES = {"align": 558_000, "lora": 665_000}
LLAVA15_HOURS_8XA100 = {"align": 3.5, "lora": 10.0}


@dataclass
class Parts:
    """Config sizes of one benchmark shape."""

    vision: dict[str, Any]
    llm: dict[str, Any]
    text_tokens: dict[str, int]  # text tokens per sample beside the image, per stage
    supervised: dict[str, int]  # supervised (answer) tokens among them
    lora_r: int
    lora_alpha: int
    project_llava15: bool = False  # whether hours for LLaVA-1.5's data mean anything at this shape


SHAPES = {
    "llava15-7b": Parts(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768),
        llm=dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
        # captions are short; instruction conversations are long (LLaVA-1.5 pads to at most 2048)
        text_tokens={"align": 64, "lora": 1024}, supervised={"align": 32, "lora": 512}, lora_r=128, lora_alpha=256,
        project_llava15=True),
    "tiny": Parts(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    image_size=56, patch_size=14, projection_dim=32),
        llm=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256),
        text_tokens={"align": 16, "lora": 32}, supervised={"align": 8, "lora": 16}, lora_r=8, lora_alpha=16),
}


def build(parts: Parts, device: torch.device, dtype: torch.dtype, attention: str = "sdpa"):
    """llava-lite's model from random-weight parts: frozen tower and LLM in `dtype`, fp32 projector."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from llava_lite.config import LlavaLiteConfig, ProjectorConfig
    from llava_lite.modeling import LlavaLiteModel
    from llava_lite.registry import PROJECTORS
    from llava_lite.vision.clip import CLIPTower

    # Built directly in `dtype` on the device: a 7B LLM made in fp32 first would need 27 GB.
    with torch.device(device):
        vision = CLIPVisionModel._from_config(CLIPVisionConfig(**parts.vision, attn_implementation=attention),
                                              dtype=dtype)
        llm = LlamaForCausalLM._from_config(LlamaConfig(**parts.llm, attn_implementation=attention), dtype=dtype)
        size = parts.vision["image_size"]
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        tower = CLIPTower(vision, processor, feature_layer=-2, strategy="patch")
        projector = PROJECTORS.get("mlp2x_gelu")(tower.hidden_size, parts.llm["hidden_size"])
    llm.requires_grad_(False)
    config = LlavaLiteConfig(projector=ProjectorConfig(name="mlp2x_gelu"))
    return LlavaLiteModel(config, tower, projector, llm, image_token_id=parts.llm["vocab_size"])


def flop_shape(model) -> Shape:
    vcfg, lcfg = model.vision_tower.model.config, model.llm.config
    patches = (vcfg.image_size // vcfg.patch_size) ** 2
    return Shape(vision_linear=linear_params(model.vision_tower), vision_layers=vcfg.num_hidden_layers,
                 vision_hidden=vcfg.hidden_size, vision_tokens=patches + 1, image_tokens=model.vision_tower.num_tokens,
                 projector=sum(p.numel() for p in model.projector.parameters()),
                 llm_linear=linear_params(model.llm), llm_layers=lcfg.num_hidden_layers,
                 llm_hidden=lcfg.hidden_size, vocab=lcfg.vocab_size)


def batch(model, parts: Parts, stage: str, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random pixels and text: the image placeholders, then the text, the answer supervised."""
    n_img, text = model.vision_tower.num_tokens, parts.text_tokens[stage]
    ids = torch.randint(0, parts.llm["vocab_size"], (size, n_img + text), device=device)
    ids[:, :n_img] = model.image_token_id
    labels = ids.clone()
    labels[:, :n_img + text - parts.supervised[stage]] = -100
    pixels = torch.randn(size, 3, parts.vision["image_size"], parts.vision["image_size"], device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": pixels}


def train_step(model, optimizer, data: dict[str, torch.Tensor], autocast: bool) -> float:
    from llava_lite.train.distill import token_losses

    device_type = data["input_ids"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        image_embeds = model.encode_images(pixel_values=data["pixel_values"])
        loss_sum = token_losses(model, data["input_ids"], data["attention_mask"], data["labels"], image_embeds,
                                distill=False)
    loss = loss_sum.float() / (data["labels"] != -100).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fits(model, optimizer, parts, stage, size, device, autocast) -> bool:
    try:
        train_step(model, optimizer, batch(model, parts, stage, size, device), autocast)
        _sync(device)
        return True
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return False


def largest_micro_batch(model, optimizer, parts, stage, device, autocast, limit: int = 256) -> int:
    """The largest power of two that trains without running out of GPU memory."""
    best, size = 0, 1
    while size <= limit and fits(model, optimizer, parts, stage, size, device, autocast):
        best, size = size, size * 2
    if best == 0:
        raise RuntimeError(f"{stage}: even a micro-batch of 1 does not fit on {device}")
    return best


def _peak_memory(device: torch.device) -> float:
    """GiB: the GPU's peak allocation since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def prepare_stage(model, parts: Parts, stage: str, gradient_checkpointing: bool):
    """Trainable weights and the optimizer of `stage` (LoRA added for "lora")."""
    from llava_lite.config import LoraConfig
    from llava_lite.lora import add_lora, is_peft

    if stage == "lora" and not is_peft(model.llm):
        # peft keeps the LoRA weights in fp32 beside a bf16 base (autocast_adapter_dtype)
        model.llm = add_lora(model.llm, LoraConfig(r=parts.lora_r, alpha=parts.lora_alpha, dropout=0.05))
    if gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = list(model.projector.parameters())
    trainable += [p for n, p in model.llm.named_parameters() if "lora_" in n]
    for p in trainable:
        p.requires_grad_(True)
    lora = sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" in n)
    return torch.optim.AdamW(trainable, lr=1e-5), lora


def time_stage(model, parts: Parts, stage: str, device: torch.device, steps: int, micro_batch: int | None,
               gradient_checkpointing: bool, peak: float | None) -> dict[str, Any]:
    """Median step time at the largest micro-batch that fits (or `micro_batch`), and what follows."""
    autocast = device.type == "cuda" or model.llm.dtype == torch.bfloat16
    optimizer, lora = prepare_stage(model, parts, stage, gradient_checkpointing)
    size = micro_batch
    if size is None:  # a CPU never runs out of memory quickly enough to search
        size = largest_micro_batch(model, optimizer, parts, stage, device, autocast) if device.type == "cuda" else 2
    data = batch(model, parts, stage, size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps + 1):  # the first is warm-up
        t = time.perf_counter()
        loss = train_step(model, optimizer, data, autocast)
        _sync(device)
        times.append(time.perf_counter() - t)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    tokens = size * (model.vision_tower.num_tokens + parts.text_tokens[stage])
    flops = sample_flops(flop_shape(model), parts.text_tokens[stage], parts.supervised[stage], lora) * size
    sps = size / step_s
    result = {"stage": stage, "micro_batch": size, "step_s": round(step_s, 4), "samples_per_s": round(sps, 3),
              "tokens_per_s": round(tokens / step_s, 1), "peak_memory_gib": round(_peak_memory(device), 2),
              "model_tflops_per_s": round(flops / step_s / 1e12, 3), "loss": round(loss, 4),
              "trainable_params": lora + sum(p.numel() for p in model.projector.parameters())}
    result["mfu"] = None if peak is None else round(flops / step_s / (peak * 1e12), 4)
    if parts.project_llava15:
        hours = LLAVA15_SAMPLES[stage] / sps / 3600
        result.update(hours_1_gpu=round(hours, 2), hours_8_gpus=round(hours / 8, 2),
                      llava15_hours_8xa100=LLAVA15_HOURS_8XA100[stage])
    return result


def _bnb_8bit(llm, device: torch.device):
    """LLM.int8() on every decoder linear layer, quantized from the weights in memory."""
    import bitsandbytes as bnb
    from torch import nn

    for parent in list(llm.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head":
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False, threshold=6.0)
                q.weight = bnb.nn.Int8Params(child.weight.data.to(torch.float16).cpu(), requires_grad=False,
                                             has_fp16_weights=False)
                setattr(parent, name, q.to(device))
    return llm


def time_decode(llm, device: torch.device, prompt: int, new_tokens: int = 64) -> dict[str, float]:
    """Greedy decode speed from a `prompt`-token context: (time for new_tokens+1) - (time for 1)."""
    ids = torch.randint(0, llm.config.vocab_size, (1, prompt), device=device)
    kwargs = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}

    def run(n: int) -> float:
        _sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            llm.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        _sync(device)
        return time.perf_counter() - t

    run(2)  # warm-up
    first, full = run(1), run(new_tokens + 1)
    return {"first_token_ms": round(first * 1000, 1), "decode_tok_s": round(new_tokens / max(full - first, 1e-9), 1)}


def decode_figures(parts: Parts, device: torch.device, prompt: int) -> dict[str, Any]:
    """bf16 decode, then 8-bit (bitsandbytes, CUDA only) of the same random LLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device(device):
        llm = LlamaForCausalLM._from_config(LlamaConfig(**parts.llm, attn_implementation="sdpa"),
                                            dtype=torch.bfloat16).eval()
    out: dict[str, Any] = {"bf16": time_decode(llm, device, prompt)}
    if device.type != "cuda":
        out["8bit"] = "skipped: bitsandbytes LLM.int8() decode is timed on CUDA GPUs only"
    else:
        try:
            out["8bit"] = time_decode(_bnb_8bit(llm, device), device, prompt)
        except ImportError:
            out["8bit"] = "skipped: bitsandbytes is not installed"
    return out


def run_bench(shapes: str = "llava15-7b", device: str = "auto", steps: int = 3, micro_batch: int | None = None,
              stages: tuple[str, ...] = ("align", "lora"), gradient_checkpointing: bool = False,
              peak_tflops_override: float | None = None, decode: bool = True) -> dict[str, Any]:
    """Every figure of one bench-train run, as a dict (what --out writes as JSON)."""
    parts = SHAPES[shapes]
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = peak_tflops(name, peak_tflops_override)
    torch.manual_seed(0)
    model = build(parts, dev, torch.bfloat16)
    report: dict[str, Any] = {"shapes": shapes, "device": name, "peak_bf16_tflops": peak,
                              "gradient_checkpointing": gradient_checkpointing, "parts": asdict(parts), "stages": []}
    for stage in stages:
        report["stages"].append(time_stage(model, parts, stage, dev, steps, micro_batch, gradient_checkpointing, peak))
        print(format_stage(report["stages"][-1]), flush=True)
    del model
    if decode:
        prompt = SHAPES[shapes].text_tokens["align"] + (parts.vision["image_size"] // parts.vision["patch_size"]) ** 2
        report["decode"] = decode_figures(parts, dev, prompt)
        print(f"decode from a {prompt}-token prompt: {json.dumps(report['decode'])}", flush=True)
    return report


def format_stage(r: dict[str, Any]) -> str:
    mfu = "MFU n/a (unknown peak; --peak-tflops)" if r["mfu"] is None else f"MFU {100 * r['mfu']:.1f}%"
    line = (f"{r['stage']:6s} micro-batch {r['micro_batch']:3d}  {r['samples_per_s']:.2f} samples/s  "
            f"{r['tokens_per_s']:.0f} tokens/s  peak {r['peak_memory_gib']:.1f} GiB  "
            f"{r['model_tflops_per_s']:.1f} TFLOP/s  {mfu}")
    if "hours_1_gpu" in r:
        line += (f"\n       one epoch of LLaVA-1.5's {LLAVA15_SAMPLES[r['stage']]:,} samples: {r['hours_1_gpu']:.1f} h "
                 f"on 1 GPU, {r['hours_8_gpus']:.2f} h on 8 (paper: {r['llava15_hours_8xa100']} h on 8xA100)")
    return line


def cmd_bench_train(args) -> int:
    unknown = set(args.stages.split(",")) - set(LLAVA15_SAMPLES)
    if unknown:
        print(f"llava-lite bench-train: error: --stages {sorted(unknown)}; use align and/or lora", file=sys.stderr)
        return 2
    report = run_bench(args.shapes, args.device, args.steps, args.micro_batch, tuple(args.stages.split(",")),
                       args.gradient_checkpointing, args.peak_tflops, not args.no_decode)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-train.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out / 'bench-train.json'}")
    return 0 if all(math.isfinite(s["loss"]) for s in report["stages"]) else 1


def register(sub) -> None:
    p = sub.add_parser("bench-train", help="training/decode throughput and MFU at LLaVA-1.5-7B shapes (random weights)",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=_raw())
    p.add_argument("--shapes", default="llava15-7b", choices=sorted(SHAPES),
                   help="part sizes: llava15-7b (a GPU with >= 40 GB) or tiny (CPU, seconds)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cuda:1 or cpu")
    p.add_argument("--steps", type=int, default=3, help="timed steps per stage after one warm-up (median reported)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="fixed micro-batch (default: the largest power of two that fits on the GPU)")
    p.add_argument("--stages", default="align,lora", help="comma-separated: align, lora")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute LLM activations in backward")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak for MFU, if it is not in the built-in table")
    p.add_argument("--no-decode", action="store_true", help="skip the bf16/8-bit decode timing")
    p.add_argument("--out", default=None, help="also write bench-train.json here")
    p.set_defaults(func=cmd_bench_train)


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter
