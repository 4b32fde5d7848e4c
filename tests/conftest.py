"""Shared fixtures: tiny models built in code from configs, saved as ordinary folders, so the
tests run the same loading code a user with Hub access runs. Nothing touches the network."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
# The converted SmolLM2 folder is reused between runs; everything else goes to tmp dirs.
os.environ.setdefault("LLAVA_LITE_CACHE", str(REPO / ".cache"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The real SmolLM2-135M-Instruct folder (converted once from the packaged GGUF)."""
    from llava_lite.packaged import smollm2_folder

    return smollm2_folder()


@pytest.fixture(scope="session")
def smol_tokenizer_dir(smol_dir, tmp_path_factory) -> Path:
    """Only the tokenizer files of SmolLM2 (real vocabulary and chat template)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smol-tokenizer")
    AutoTokenizer.from_pretrained(smol_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llm_dir(smol_tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, saved as a transformers folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, initializer_range=0.2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP vision model with its (PIL) image processor config."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
    torch.manual_seed(1)
    model = CLIPVisionModel(cfg)
    out = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory):
    """A tiny random BERT with MiniLM's real tokenizer, as a transformers folder. Without
    dropout, so several processes train it exactly like one."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from llava_lite.packaged import minilm_folder

    tok = AutoTokenizer.from_pretrained(minilm_folder())
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    out = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def tiny_config(tiny_clip_dir, tiny_llm_dir):
    from llava_lite.config import LlavaLiteConfig, LLMConfig, LoraConfig, ProjectorConfig, VisionConfig

    def make(lora: bool = False, projector: str = "mlp2x_gelu", strategy: str = "patch", **kw):
        return LlavaLiteConfig(
            vision=VisionConfig(name="clip", model_id=str(tiny_clip_dir), feature_strategy=strategy),
            projector=ProjectorConfig(name=projector),
            llm=LLMConfig(model_id=str(tiny_llm_dir)),
            lora=LoraConfig(enabled=lora, r=4, alpha=8, dropout=0.0),
            max_length=256,
            **kw,
        )

    return make


@pytest.fixture
def tiny_lite(tiny_config):
    """A tiny LlavaLite with a randomised projector and a non-trivial LoRA delta."""
    from llava_lite import LlavaLite
    from llava_lite.checkpoint import build_model

    def make(lora: bool = True, seed: int = 0, **kw):
        model, processor = build_model(tiny_config(lora=lora, **kw), seed=seed)
        if lora:
            randomize_lora(model.llm, seed)
        return LlavaLite(model, processor, source="tiny")

    return make


def prompt_inputs(lite, images, question: str):
    """(input_ids, pixel_values) for one user turn asking `question` about `images`."""
    ids = torch.tensor([lite.processor.encode_prompt([lite.user_message(question, len(images))])])
    return ids, lite.processor.pixel_values(images)


def randomize_lora(llm, seed: int = 0) -> None:
    """peft starts LoRA B at zero (a no-op adapter); give it real weights so tests can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in llm.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


@pytest.fixture
def images():
    """A few distinct small RGB images made in code."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 48, 3), dtype=np.uint8)) for i in range(4)]
