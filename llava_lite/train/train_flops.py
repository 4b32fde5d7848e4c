"""Model FLOPs of one LLaVA training sample, and the bf16 peak of known GPUs, for MFU.

The count (PaLM's convention, Chowdhery et al. 2022, appendix B): a matmul of an n-parameter
weight over T tokens is 2nT in the forward pass. The backward pass computes the gradient of
the input (another 2nT) everywhere the gradient must flow, and the gradient of the weight
(2nT) only for trained weights. Attention scores and their weighting add 4LT^2d forward, in
full rather than causally halved, with the same again backward where gradients flow.
Recomputation under gradient checkpointing is not counted (it is not model work).
- tower (frozen, no gradient): forward only;
- projector (trained): 6 n T over the image tokens;
- LLM (frozen, but the gradient flows through it to the projector): 4 n T plus 8 L T^2 d;
  the LM head runs only on the supervised tokens (as llava-lite's loss does), 4 d V each;
- LoRA weights (trained): 6 n T.
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s), by the exact name
# torch.cuda.get_device_name() reports. Others: pass --peak-tflops.
GPU_BF16_PEAK_TFLOPS = {
    "NVIDIA H200": 989.4,
    "NVIDIA H100 80GB HBM3": 989.4,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L40S": 362.1,
    "NVIDIA GeForce RTX 4090": 165.2,
}


@dataclass
class Shape:
    """The sizes the FLOP count needs."""

    vision_linear: int  # weights in the tower's per-token matmuls (patch convolution included)
    vision_layers: int
    vision_hidden: int
    vision_tokens: int  # patches (+ CLS) the tower attends over
    image_tokens: int  # tokens the projector emits into the LLM
    projector: int  # projector parameters
    llm_linear: int  # parameters in the LLM's decoder matmuls (not embeddings or head)
    llm_layers: int
    llm_hidden: int
    vocab: int


def linear_params(module) -> int:
    """Weights of the matmuls inside `module` applied once per token (linear layers and patch
    convolutions), leaving out LoRA's (counted apart) and the LM head (which runs on fewer tokens)."""
    from torch import nn

    return sum(m.weight.numel() for name, m in module.named_modules()
               if isinstance(m, nn.Linear | nn.Conv2d) and "lora_" not in name and not name.endswith("lm_head"))


def sample_flops(shape: Shape, text_tokens: int, supervised: int, lora_params: int = 0) -> float:
    """Model FLOPs of one training sample of `text_tokens` text tokens beside the image."""
    s = shape
    tower = 2 * s.vision_linear * s.vision_tokens + 4 * s.vision_layers * s.vision_tokens ** 2 * s.vision_hidden
    projector = 6 * s.projector * s.image_tokens
    t = s.image_tokens + text_tokens
    llm = 4 * s.llm_linear * t + 8 * s.llm_layers * t ** 2 * s.llm_hidden + 4 * s.llm_hidden * s.vocab * supervised
    return float(tower + projector + llm + 6 * lora_params * t)


def peak_tflops(device_name: str, override: float | None) -> float | None:
    return override if override is not None else GPU_BF16_PEAK_TFLOPS.get(device_name)
