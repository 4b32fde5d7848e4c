"""What CI runs: the default parts on a handful of generated scenes, every stage in seconds."""

from llava_lite.config import LlavaLiteConfig, LoraConfig
from llava_lite.train.recipe import DataSpec, EvalSpec, StageConfig, TrainRecipe

SCENES = {"n": 16}


def _stage(data: str, lora: bool) -> StageConfig:
    return StageConfig(
        data=[DataSpec(name=data, args=SCENES)], train_projector=True, lora=lora,
        max_steps=4, batch_size=4, micro_batch_size=2, lr=1e-3, projector_lr=1e-3, warmup_ratio=0.25,
        eval=[EvalSpec(name="scenes-test", args={"n": 2, "limit": 4}, batch_size=4)],
    )


def recipe() -> TrainRecipe:
    align = _stage("scenes-captions", lora=False)
    align.contrastive_weight = 0.1
    adapter = _stage("scenes-vqa", lora=True)
    adapter.pack_shared_prefix = True
    return TrainRecipe(
        name="tiny",
        model=LlavaLiteConfig(lora=LoraConfig(r=4, alpha=8, dropout=0.0), max_length=512),
        precision="fp32",
        align=align,
        adapter=adapter,
        instruct=_stage("scenes-dialogues", lora=True),
        save_every=2,
        keep_last=2,
        feature_batch_size=8,
    )
