"""Training recipes: plain dataclasses, saved as JSON with every run, overridable as key=value
(`llava_lite.settings`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llava_lite.config import ConfigError, LlavaLiteConfig
from llava_lite.settings import Settings

STAGES = ("align", "adapter", "instruct", "bridge")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PACK_ATTENTION = ("prefix", "mask")
REPORT_TO = ("none", "tensorboard", "wandb")


@dataclass
class DataSpec:
    """One training source: a named builder from `llava_lite.data.builders` or a LLaVA JSON/JSONL file
    (or `datasets.save_to_disk` folder) with its image root."""

    name: str | None = None
    path: str | None = None
    image_root: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None


@dataclass
class EvalSpec:
    """An exact-match evaluation set from `llava_lite.data.builders.EVAL_SETS`, run at a stage's end."""

    name: str = "easyvqa-test"
    args: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 16


@dataclass
class StageConfig:
    """One stage. `batch_size` is the global batch per optimizer step; each process runs
    micro-batches of `micro_batch_size` and gradients accumulate over the rest.

    `distill_text` trains text-only rows towards the base LLM's next-token distribution (KL
    to the same LLM with the LoRA adapter disabled) instead of their answer text; it needs `lora`.

    `fit_domain_gate` fits the label bridge's domain gate (`llava_lite.domain_gate`) on the
    tower features of every image the stage trains on and turns `model.label_bridge` on in
    the saved model; it needs cached features and `model.label_bridge.enabled` in the recipe.

    `pack_shared_prefix` packs rows about the same image (up to `max_pack`) into one sequence
    that holds their shared prefix once, and the beginnings their questions share (an
    answer-format instruction) once more (stems, see `llava_lite.train.packing`); batch sizes
    then count packs.

    `compile_layers` runs each LLM decoder layer through torch.compile for the stage's steps
    (`llava_lite.train.compiled_layers`; a C++ compiler is needed on a CPU). The compile costs
    15-50 s at the stage's start, so it pays off on long stages.
    """

    data: list[DataSpec] = field(default_factory=list)
    train_projector: bool = True
    lora: bool = False
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    micro_batch_size: int = 8
    lr: float = 2e-4
    projector_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    contrastive_weight: float = 0.0
    pack_shared_prefix: bool = False
    max_pack: int = 16
    distill_text: bool = False
    fit_domain_gate: bool = False
    compile_layers: bool = False
    eval: list[EvalSpec] = field(default_factory=list)
    enabled: bool = True


@dataclass
class TrainRecipe(Settings):
    name: str = "custom"
    model: LlavaLiteConfig = field(default_factory=LlavaLiteConfig)
    align: StageConfig = field(default_factory=StageConfig)
    adapter: StageConfig = field(default_factory=lambda: StageConfig(lora=True))
    instruct: StageConfig = field(default_factory=lambda: StageConfig(lora=True))
    # The label bridge's stage (llava_lite.label_bridge); off unless a recipe fills it in.
    bridge: StageConfig = field(default_factory=lambda: StageConfig(lora=True, enabled=False))
    precision: str = "auto"  # bf16 where the hardware runs it natively, else fp32 (train/precision.py)
    seed: int = 0
    cache_features: bool = True
    gradient_checkpointing: bool = False
    group_by_length: bool = True
    # How a packed batch attends: "prefix" as dense prefix and suffix attentions
    # (train/prefix_attention.py), "mask" as one attention under a block mask (the reference, and
    # for an LLM whose attention does not dispatch through transformers' AttentionInterface).
    pack_attention: str = "prefix"
    save_every: int = 50
    keep_last: int = 2
    skip_bad: bool = False
    feature_batch_size: int = 32
    num_threads: int | None = None
    # Experiment tracking through accelerate's trackers, beside metrics.jsonl: "tensorboard"
    # writes event files to OUTPUT/STAGE/tensorboard, "wandb" needs the wandb package.
    report_to: str = "none"

    def stage(self, name: str) -> StageConfig:
        if name not in STAGES:
            raise ConfigError(f"stage {name!r}; use one of {STAGES}")
        return getattr(self, name)

    def validate(self) -> TrainRecipe:
        self.model.validate()
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}; use one of {PRECISIONS}")
        if self.report_to not in REPORT_TO:
            raise ConfigError(f"report_to={self.report_to!r}; use one of {REPORT_TO}")
        if self.pack_attention not in PACK_ATTENTION:
            raise ConfigError(f"pack_attention={self.pack_attention!r}; use one of {PACK_ATTENTION}")
        if self.save_every <= 0 or self.keep_last <= 0:
            raise ConfigError("save_every and keep_last must be positive")
        self._validate_set_by_training()
        for name in STAGES:
            self._validate_stage(name, self.stage(name))
        return self

    def _validate_set_by_training(self) -> None:
        """Fields of `model` that the stages decide, so a recipe value would be overwritten."""
        if self.model.lora.enabled:
            raise ConfigError("model.lora.enabled is set by training (each stage's `lora` says whether it adds "
                              "and trains the adapter); leave it false and set e.g. adapter.lora=true")
        gated = [s for s in STAGES if self.stage(s).enabled and self.stage(s).fit_domain_gate]
        if self.model.label_bridge.enabled and not gated:
            raise ConfigError("model.label_bridge.enabled needs an enabled stage with fit_domain_gate=true, "
                              "which fits the gate and turns the bridge on in the saved model")

    def _validate_stage(self, name: str, st: StageConfig) -> None:
        if st.batch_size <= 0 or st.micro_batch_size <= 0 or st.batch_size % st.micro_batch_size:
            raise ConfigError(
                f"{name}: batch_size={st.batch_size} must be a positive multiple of "
                f"micro_batch_size={st.micro_batch_size}"
            )
        if st.enabled and not st.data:
            raise ConfigError(f"{name}: no data sources")
        if not st.train_projector and not st.lora:
            raise ConfigError(f"{name}: nothing to train (train_projector and lora are both off)")
        if st.lr <= 0 or st.projector_lr <= 0 or not 0 <= st.warmup_ratio < 1:
            raise ConfigError(f"{name}: learning rates must be > 0 and 0 <= warmup_ratio < 1")
        if st.distill_text and not st.lora:
            raise ConfigError(f"{name}: distill_text needs lora (the base model is the LLM without its adapter)")
        if st.fit_domain_gate and not (self.model.label_bridge.enabled and self.cache_features):
            raise ConfigError(f"{name}: fit_domain_gate needs model.label_bridge.enabled and cache_features")
        if st.max_steps is None and st.epochs <= 0:
            raise ConfigError(f"{name}: give epochs > 0 or max_steps")
        for spec in st.data:
            if (spec.name is None) == (spec.path is None):
                raise ConfigError(f"{name}: each data source needs exactly one of name or path; got {spec}")
