"""LLaVA-1.5-7B (LoRA) with the published hyperparameters: the reference recipe for GPU users.

CLIP ViT-L/14-336 + Vicuna-7B-v1.5 with an mlp2x_gelu projector. Stage 1 trains the projector
on LCS-558K (lr 1e-3, batch 256, 1 epoch); the LoRA stage tunes on llava_v1_5_mix665k
(r 128, alpha 256, lr 2e-4, projector lr 2e-5, batch 128, 1 epoch); both use a cosine
schedule with 3% warmup, bf16 and a 2048-token context. LLaVA-1.5 has no separate adapter
stage, so it is off here. Point the paths at your copies (converters in `llava_lite/data/converters.py`):

    llava-lite train --recipe llava15-7b --stage all \
        align.data.0.path=/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json ...

Multi-GPU: `accelerate launch --num_processes 8 -m llava_lite.cli train --recipe llava15-7b`;
add a DeepSpeed ZeRO-2/3 config through `accelerate config` (see README).
"""

from llava_lite.config import LlavaLiteConfig, LLMConfig, LoraConfig, ProjectorConfig, VisionConfig
from llava_lite.train.recipe import DataSpec, StageConfig, TrainRecipe


def recipe() -> TrainRecipe:
    return TrainRecipe(
        name="llava15-7b",
        model=LlavaLiteConfig(
            vision=VisionConfig(name="clip", model_id="openai/clip-vit-large-patch14-336",
                                feature_layer=-2, feature_strategy="patch"),
            projector=ProjectorConfig(name="mlp2x_gelu"),
            llm=LLMConfig(model_id="lmsys/vicuna-7b-v1.5"),
            lora=LoraConfig(r=128, alpha=256, dropout=0.05),
            max_length=2048,
        ),
        precision="bf16",
        gradient_checkpointing=True,
        align=StageConfig(
            data=[DataSpec(path="LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", image_root="LLaVA-Pretrain/images")],
            train_projector=True, lora=False, epochs=1, batch_size=256, micro_batch_size=32,
            projector_lr=1e-3, warmup_ratio=0.03, weight_decay=0.0,
        ),
        adapter=StageConfig(enabled=False, lora=True),
        instruct=StageConfig(
            data=[DataSpec(path="LLaVA-Instruct/llava_v1_5_mix665k.json", image_root="LLaVA-Instruct/images")],
            train_projector=True, lora=True, epochs=1, batch_size=128, micro_batch_size=16,
            lr=2e-4, projector_lr=2e-5, warmup_ratio=0.03, weight_decay=0.0,
        ),
        save_every=1000,
        keep_last=1,
        skip_bad=True,
    )
