"""CLIP-style alignment: the contrastive loss by hand, the clamped temperature, the dual
encoder on tiny parts built in code, prompt ensembling, zero-shot and retrieval, also on a
tiny transformers CLIPModel."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llava_lite.contrastive import MAX_LOGIT_SCALE, LogitScale, clip_loss
from llava_lite.zero_shot import class_embeddings, retrieve, zero_shot_classify


def _ce_row(logits_row: torch.Tensor, positives: list[int]) -> float:
    logp = logits_row.log_softmax(-1)
    return -sum(logp[j].item() for j in positives) / len(positives)


def test_multi_positive_loss_by_hand():
    torch.manual_seed(0)
    img, txt = torch.randn(4, 3), torch.randn(4, 3)
    scale = torch.tensor(5.0)
    labels = torch.tensor([0, 0, 1, 2])  # rows 0 and 1 share a caption: both are positives
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    pos = [[0, 1], [0, 1], [2], [3]]
    i2t = sum(_ce_row(logits[i], pos[i]) for i in range(4)) / 4
    t2i = sum(_ce_row(logits.T[i], pos[i]) for i in range(4)) / 4
    assert clip_loss(img, txt, scale, labels=labels).item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)
    # distinct labels give exactly the plain loss
    assert clip_loss(img, txt, scale, labels=torch.arange(4)).item() == pytest.approx(
        clip_loss(img, txt, scale).item(), rel=1e-6)


def test_hard_negative_mining_keeps_the_k_hardest():
    torch.manual_seed(1)
    img, txt = torch.randn(5, 4), torch.randn(5, 4)
    scale = torch.tensor(3.0)
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T

    def side(lg):
        total = 0.0
        for i in range(5):
            negs = sorted((j for j in range(5) if j != i), key=lambda j: -lg[i, j].item())[:2]
            keep = [i, *negs]
            total += -(lg[i, i] - torch.logsumexp(lg[i, keep], 0)).item()
        return total / 5

    expected = (side(logits) + side(logits.T)) / 2
    assert clip_loss(img, txt, scale, hard_negatives=2).item() == pytest.approx(expected, rel=1e-5)
    # keeping every negative is the plain loss
    assert clip_loss(img, txt, scale, hard_negatives=4).item() == pytest.approx(clip_loss(img, txt, scale).item(),
                                                                                rel=1e-6)


def test_temperature_is_clamped_at_100():
    scale = LogitScale(init=math.log(1000.0))
    assert scale().item() == pytest.approx(100.0)
    assert MAX_LOGIT_SCALE == pytest.approx(math.log(100.0))


@pytest.fixture
def tiny_dual(tiny_clip_dir, tiny_text_dir):
    from llava_lite.config import VisionConfig
    from llava_lite.dual_encoder import DualEncoder, DualEncoderConfig, TextEncoderConfig

    torch.manual_seed(0)
    return DualEncoder(DualEncoderConfig(vision=VisionConfig(name="clip", model_id=str(tiny_clip_dir)),
                                         text=TextEncoderConfig(name="minilm", model_id=str(tiny_text_dir)),
                                         embed_dim=16))


def test_prompt_ensembling_averages_normalised_text_embeddings(tiny_dual):
    templates = ["a photo of a {}.", "a {} here", "{}!"]
    got = class_embeddings(tiny_dual, ["cat", "dog"], templates)
    for row, name in enumerate(["cat", "dog"]):
        each = F.normalize(tiny_dual.encode_texts([t.format(name) for t in templates]), dim=-1)
        assert torch.allclose(got[row], F.normalize(each.mean(0), dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="needs a"):
        class_embeddings(tiny_dual, ["cat"], ["no slot"])


def test_lit_training_step_moves_text_side_only_and_round_trips(tiny_dual, images, tmp_path):
    from llava_lite.dual_encoder import DualEncoder

    pixels = tiny_dual.tower.preprocess(images[:4])
    pooled = tiny_dual.image_features(pixels)
    tower_before = [p.clone() for p in tiny_dual.tower.parameters()]
    text_before = next(tiny_dual.text_model.parameters()).clone()
    opt = torch.optim.SGD([p for p in tiny_dual.parameters() if p.requires_grad], lr=0.5)
    captions = ["a red one", "a blue one", "a green one", "a dark one"]
    loss0 = tiny_dual.loss(pooled, captions)
    for _ in range(5):
        opt.zero_grad()
        tiny_dual.loss(pooled, captions).backward()
        opt.step()
    assert tiny_dual.loss(pooled, captions).item() < loss0.item()
    assert all(torch.equal(a, b) for a, b in zip(tower_before, tiny_dual.tower.parameters(), strict=True))
    assert not torch.equal(text_before, next(tiny_dual.text_model.parameters()))
    tiny_dual.save_pretrained(tmp_path / "de")
    again = DualEncoder.from_pretrained(tmp_path / "de")
    assert torch.allclose(again.encode_images(images[:2]), tiny_dual.encode_images(images[:2]), atol=1e-6)
    assert torch.allclose(again.encode_texts(captions), tiny_dual.encode_texts(captions), atol=1e-6)


def test_zero_shot_and_retrieval_on_a_tiny_transformers_clip(tmp_path, images):
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    from llava_lite.dual_encoder import HFCLIP, load_dual_encoder
    from llava_lite.packaged import minilm_folder

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={"vocab_size": 30522, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 64, "eos_token_id": 102,
                     "bos_token_id": 101, "pad_token_id": 0},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16)
    model = CLIPModel(cfg)
    model.save_pretrained(tmp_path / "clip")

    AutoTokenizer.from_pretrained(minilm_folder()).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip")
    clip = load_dual_encoder(tmp_path / "clip")
    assert isinstance(clip, HFCLIP)
    names = ["cat", "dog", "car"]
    result = zero_shot_classify(clip, images[:3], names, templates=["a photo of a {}."])
    assert result.probs.shape == (3, 3)
    assert torch.allclose(result.probs.sum(-1), torch.ones(3), atol=1e-5)
    # the same numbers by hand from transformers' own outputs
    inputs = clip.tokenizer(["a photo of a cat.", "a photo of a dog.", "a photo of a car."], padding=True,
                            return_tensors="pt")
    pix = clip.image_processor(images=images[:3], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pix)
    assert torch.allclose(result.probs, out.logits_per_image.softmax(-1), atol=1e-4)
    hits = retrieve(clip, ["a photo of a cat."], images[:3], k=2)
    assert len(hits[0]) == 2 and hits[0][0][1] >= hits[0][1][1]
    back = retrieve(clip, images[:1], names, k=3)
    assert sorted(i for i, _ in back[0]) == [0, 1, 2]


def test_clip_recipe_trains_saves_and_serves_the_cli(tiny_clip_dir, tiny_text_dir, tmp_path, capsys):
    """The clip runner end to end on tiny parts and generated scene captions (no Fashion-MNIST,
    which needs a Debian download), then `llava-lite zeroshot` and `retrieve` on its output."""
    import json

    from llava_lite.cli import main
    from llava_lite.config import VisionConfig
    from llava_lite.dual_encoder import DualEncoderConfig, TextEncoderConfig
    from llava_lite.settings import apply_overrides
    from llava_lite.train.clip_recipe import ClipRecipe
    from llava_lite.train.clip_stage import run_clip_recipe

    recipe = ClipRecipe(
        name="clip-tiny",
        model=DualEncoderConfig(vision=VisionConfig(name="clip", model_id=str(tiny_clip_dir)),
                                text=TextEncoderConfig(name="minilm", model_id=str(tiny_text_dir)), embed_dim=16),
        caption_sets=[{"name": "scenes-captions", "args": {"n": 12}}],
        steps=6, batch_size=6, eval_zero_shot=False, retrieval_set=None,
    ).validate()
    recipe = apply_overrides(recipe, ["steps=8", "hard_negatives=3"])
    assert recipe.steps == 8 and recipe.hard_negatives == 3
    summary = run_clip_recipe(recipe, tmp_path / "run", progress=False)
    assert summary["steps"] == 8 and summary["data"] == {"scenes-captions": 12}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert (tmp_path / "run" / "loss.png").is_file() and (tmp_path / "run" / "recipe.json").is_file()
    from llava_lite.packaged import cache_dir

    imgs = [str(p) for p in sorted((cache_dir() / "data" / "scenes" / "train-0").glob("*.png"))[:3]]
    assert len(imgs) == 3
    capsys.readouterr()
    assert main(["zeroshot", *imgs, "--model", str(tmp_path / "run" / "model"), "--classes", "circle,square,triangle",
                 "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all(abs(sum(x["probs"].values()) - 1) < 1e-4 for x in lines)
    assert main(["retrieve", "--model", str(tmp_path / "run" / "model"), "--query", "a red circle",
                 "--gallery", *imgs, "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("  1. ") == 1 and out.count("  2. ") == 1


def _tiny_clip_recipe(tiny_clip_dir, tiny_text_dir, **kw):
    from llava_lite.config import VisionConfig
    from llava_lite.dual_encoder import DualEncoderConfig, TextEncoderConfig
    from llava_lite.train.clip_recipe import ClipRecipe

    model = DualEncoderConfig(vision=VisionConfig(name="clip", model_id=str(tiny_clip_dir)),
                              text=TextEncoderConfig(name="minilm", model_id=str(tiny_text_dir)), embed_dim=16,
                              lock_image=kw.pop("lock_image", True))
    return ClipRecipe(name="clip-tiny", model=model, caption_sets=[{"name": "scenes-captions", "args": {"n": 12}}],
                      eval_zero_shot=False, retrieval_set=None, **kw).validate()


def test_unlocked_tower_trains_inside_the_loop(tiny_clip_dir, tiny_text_dir, tmp_path):
    """lock_image=false runs the tower in each step (no feature cache) and its weights move;
    a locked tower's weights are not even saved."""
    from safetensors.torch import load_file

    from llava_lite.dual_encoder import DualEncoder
    from llava_lite.train.clip_stage import run_clip_recipe

    recipe = _tiny_clip_recipe(tiny_clip_dir, tiny_text_dir, lock_image=False, steps=3, batch_size=6,
                               tower_lr=1e-2)
    run_clip_recipe(recipe, tmp_path / "unlocked", progress=False)
    saved = load_file(str(tmp_path / "unlocked" / "model" / "dual_encoder.safetensors"))
    fresh = DualEncoder(recipe.model).state_dict()
    tower = [k for k in saved if k.startswith("tower.")]
    assert tower and sum(not torch.equal(saved[k], fresh[k]) for k in tower) > len(tower) // 2
    locked = _tiny_clip_recipe(tiny_clip_dir, tiny_text_dir, steps=2, batch_size=6)
    run_clip_recipe(locked, tmp_path / "locked", progress=False)
    assert not any(k.startswith("tower.") for k in load_file(str(tmp_path / "locked" / "model" /
                                                                  "dual_encoder.safetensors")))


def test_clip_run_is_not_overwritten_and_resume_skips_a_finished_one(tiny_clip_dir, tiny_text_dir, tmp_path, capsys):
    from llava_lite.config import ConfigError
    from llava_lite.train.clip_stage import run_clip_recipe

    recipe = _tiny_clip_recipe(tiny_clip_dir, tiny_text_dir, steps=2, batch_size=6, save_every=1, keep_last=1)
    first = run_clip_recipe(recipe, tmp_path / "run", progress=False)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000002"]
    with pytest.raises(ConfigError, match="already finished"):
        run_clip_recipe(recipe, tmp_path / "run", progress=False)
    again = run_clip_recipe(recipe, tmp_path / "run", progress=False, resume=True)
    assert again["final_loss"] == first["final_loss"] and "skipping" in capsys.readouterr().out


def test_clip_cli_refuses_what_a_dual_encoder_has_not(capsys):
    from llava_lite.cli import main

    assert main(["train", "--recipe", "clip-demo", "--stage", "align"]) == 2
    assert main(["train", "--recipe", "clip-demo", "--publish", "x"]) == 2
    assert "do(es) not apply" in capsys.readouterr().err


def test_clip_recipe_rejects_bad_settings():
    from llava_lite.config import ConfigError
    from llava_lite.train.clip_recipe import ClipRecipe

    with pytest.raises(ConfigError, match="not Fashion-MNIST classes"):
        ClipRecipe(fashion_per_class=10, held_out_classes=["spaceship"]).validate()
    with pytest.raises(ConfigError, match="no training data"):
        ClipRecipe().validate()
    with pytest.raises(ConfigError, match="unknown key"):
        ClipRecipe.from_dict({"stepz": 3})


# -- the label-space bridge (ConSE), no training ------------------------------------------------
@pytest.fixture(scope="module")
def label_space():
    from llava_lite.dual_encoder import load_dual_encoder

    return load_dual_encoder("label-space")


def test_label_space_embeds_an_image_as_the_weighted_mean_of_its_top_class_names(label_space):
    names = label_space.name_embeddings()
    assert names.shape == (1000, 384)
    probs = torch.zeros(1, 1000)
    probs[0, 285], probs[0, 281], probs[0, 7] = 0.6, 0.2, 0.2  # Egyptian Mau, tabby cat, cock
    label_space.top_t = 2  # the top 2, renormalised: 0.75 and 0.25
    try:
        got = label_space.embed_probs(probs)
    finally:
        label_space.top_t = 10
    expected = F.normalize(0.75 * names[285] + 0.25 * names[281], dim=-1)
    assert torch.allclose(got[0], expected, atol=1e-6)


def test_label_space_zero_shot_names_real_photos_without_training(label_space):
    from llava_lite.eval.photos import PHOTOS, photo_path

    photos = {p.name: str(photo_path(p)) for p in PHOTOS}
    classes = ["cat", "cup of coffee", "motorcycle", "military uniform", "temple"]
    images = [photos[n] for n in ("chelsea", "coffee", "motorcycle", "grace_hopper", "china")]
    result = zero_shot_classify(label_space, images, classes)
    assert result.labels == classes
    hits = retrieve(label_space, ["a cat"], images, k=1)
    assert hits[0][0][0] == 0


def test_label_space_needs_a_tower_with_a_classifier_head(tiny_clip_dir):
    from llava_lite.config import ConfigError, VisionConfig
    from llava_lite.label_space import LabelSpaceEncoder

    with pytest.raises(ConfigError, match="no classifier head"):
        LabelSpaceEncoder(VisionConfig(name="clip", model_id=str(tiny_clip_dir)))


def test_zero_shot_table_renders_rows_with_different_measures():
    from llava_lite.eval.zero_shot_table import markdown_table

    md = markdown_table({"a": {"zero-shot": 0.175, "n_test": 10000.0},
                         "b": {"zero-shot": 0.1, "dual encoder zero-shot": 0.5, "n_test": 899.0}})
    assert "| a | 17.50% | 10000 |  |" in md and "| b | 10.00% | 899 | 50.00% |" in md


def test_the_zero_shot_and_probe_evaluation_runs_on_fashion_like_data(tiny_clip_dir, tiny_text_dir, tmp_path,
                                                                      monkeypatch):
    """clip-demo's end-of-run evaluation (held-out zero-shot, the linear probes beside it, the
    confusion plot) on a small synthetic stand-in for Fashion-MNIST: each class a brightness."""
    import numpy as np

    from llava_lite.data import fashion_mnist
    from llava_lite.train.clip_stage import run_clip_recipe

    def fake_load(split, root):
        n = 12 if split == "train" else 6
        labels = np.repeat(np.arange(10), n)
        images = (labels[:, None, None] * 25 + np.zeros((len(labels), 28, 28))).astype(np.uint8)
        return images, labels.astype(np.int64)

    monkeypatch.setenv("LLAVA_LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fashion_mnist, "load", fake_load)
    recipe = _tiny_clip_recipe(tiny_clip_dir, tiny_text_dir, steps=2, batch_size=6, fashion_per_class=4,
                               held_out_classes=["sneaker", "bag", "trouser"], probe_shots=[4, 0])
    recipe.eval_zero_shot = True
    summary = run_clip_recipe(recipe, tmp_path / "run", progress=False)
    ev = summary["eval"]
    assert ev["test_images_heldout"] == 18 and ev["held_out_classes"] == ["sneaker", "bag", "trouser"]
    assert 0 <= ev["zero_shot_heldout_acc"] <= 1 and ev["chance_heldout"] == 1 / 3
    assert {"linear_probe_4_per_class_acc", "linear_probe_1000_per_class_acc"} <= set(ev)
    assert ev["linear_probe_1000_per_class_acc"] == 1.0  # three brightness levels: a probe separates them
    assert (tmp_path / "run" / "eval" / "confusion.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_dual_encoder_starts_from_the_label_space_and_trains_from_there(label_space, tiny_clip_dir, tmp_path):
    """image_prior='label-space': before training it is the ConSE encoder (same embeddings);
    the heads learn residuals from zero; saved and loaded, the embeddings are the same."""
    from llava_lite.config import ConfigError, VisionConfig
    from llava_lite.dual_encoder import DualEncoder, DualEncoderConfig
    from llava_lite.eval.photos import PHOTOS, photo_path
    from llava_lite.train.clip_recipe import ClipRecipe
    from llava_lite.train.clip_stage import run_clip_recipe

    photos = {p.name: str(photo_path(p)) for p in PHOTOS}
    images = [photos[n] for n in ("chelsea", "coffee", "motorcycle")]
    texts = ["a cat", "a cup of coffee", "a motorcycle"]
    config = DualEncoderConfig(image_prior="label-space", embed_dim=384, lock_text=True)
    model = DualEncoder(config).eval()
    assert torch.allclose(model.encode_images(images), label_space.encode_images(images), atol=1e-5)
    assert torch.allclose(model.encode_texts(texts), label_space.encode_texts(texts), atol=1e-5)
    recipe = ClipRecipe(name="clip-prior", model=config, caption_sets=[{"name": "scenes-captions", "args": {"n": 12}}],
                        steps=3, batch_size=6, lr=1e-2, eval_zero_shot=False, retrieval_set=None).validate()
    run_clip_recipe(recipe, tmp_path / "run", progress=False)
    trained = DualEncoder.from_pretrained(tmp_path / "run" / "model")
    assert trained.image_head.weight.abs().sum() > 0 and trained.text_head.weight.abs().sum() > 0
    again = DualEncoder.from_pretrained(tmp_path / "run" / "model")
    assert torch.equal(trained.encode_images(images), again.encode_images(images))
    with pytest.raises(ConfigError, match="needs lock_text"):
        DualEncoderConfig(image_prior="label-space", embed_dim=384).validate()
    with pytest.raises(ConfigError, match="set embed_dim=384"):
        DualEncoder(DualEncoderConfig(image_prior="label-space", embed_dim=256, lock_text=True))
    with pytest.raises(ConfigError, match="classifier head"):
        DualEncoder(DualEncoderConfig(vision=VisionConfig(name="clip", model_id=str(tiny_clip_dir)),
                                      image_prior="label-space", embed_dim=384, lock_text=True))
    with pytest.raises(ConfigError, match="image_prior="):
        DualEncoderConfig(image_prior="conse").validate()
