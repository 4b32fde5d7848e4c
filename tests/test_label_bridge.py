"""The label bridge: the domain gate, the uncertainty rule, the message rewrite, its training
rows, and a tiny model with a headed tower that shows a photo to the LLM as the head's guesses."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from llava_lite.config import ConfigError, LabelBridgeConfig
from llava_lite.data import photo_evidence
from llava_lite.domain_gate import GATE_NAME, DomainGate
from llava_lite.label_bridge import bridged_messages, candidates, evidence_text
from llava_lite.vision.base import VisionTower

CFG = LabelBridgeConfig(enabled=True)


def test_domain_gate_keeps_training_images_inside_and_flags_others(tmp_path):
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(4, 64, generator=gen)
    train = torch.randn(300, 4, generator=gen) @ basis + 0.05 * torch.randn(300, 64, generator=gen)
    held_out = torch.randn(50, 4, generator=gen) @ basis + 0.05 * torch.randn(50, 64, generator=gen)
    other = torch.randn(50, 64, generator=gen)  # off the training subspace
    gate = DomainGate.fit(train, dims=4)
    assert not gate.outside(train).any()
    assert not gate.outside(held_out).any()
    assert gate.outside(other).all()
    # token-level features pool to the same decision
    assert not gate.outside(train[:10, None, :].expand(10, 3, 64)).any()
    gate.save(tmp_path / GATE_NAME)
    back = DomainGate.load(tmp_path / GATE_NAME)
    assert back.threshold == pytest.approx(gate.threshold)
    torch.testing.assert_close(back.scores(other), gate.scores(other))
    with pytest.raises(ValueError, match="more than 4 images"):
        DomainGate.fit(train[:4], dims=4)


def test_evidence_text_follows_the_uncertainty_rule():
    sure = [("tripod", 0.95), ("reflex camera", 0.01), ("binoculars", 0.01)]
    unsure = [("moped", 0.50), ("scooter", 0.19), ("crash helmet", 0.05)]
    lost = [("daisy", 0.05), ("soccer ball", 0.03), ("baseball", 0.03)]
    assert evidence_text(sure, CFG) == "[a photo; the image classifier is sure it shows: tripod (95%)]"
    assert evidence_text(unsure, CFG) == "[a photo; the image classifier is unsure; its best guesses: moped (50%)]"
    assert evidence_text(lost, CFG) == "[a photo; the image classifier does not recognise it]"
    # guesses below the floor are never offered, and at most max_candidates are
    assert candidates([("a", 0.3), ("b", 0.25), ("c", 0.22), ("d", 0.21)], CFG) == [("a", 0.3), ("b", 0.25),
                                                                                    ("c", 0.22)]


def test_bridged_messages_replace_only_the_bridged_placeholders():
    msgs = [{"role": "user", "content": "<image>\nfirst <image> second"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and this?"}]}]
    out = bridged_messages(msgs, [None, "[photo A]", "[photo B]"], "<image>")
    assert out[0]["content"] == "<image>\nfirst [photo A] second"
    assert out[1] == msgs[1]
    assert out[2]["content"][0] == {"type": "text", "text": "[photo B]"}
    assert msgs[0]["content"] == "<image>\nfirst <image> second"  # the caller's messages are untouched


def test_photo_evidence_rows_answer_by_the_rule():
    rows = photo_evidence.build(400, seed=3)
    assert rows == photo_evidence.build(400, seed=3)
    kinds = {"sure": 0, "unsure": 0, "lost": 0}
    for row in rows:
        human, gpt = row["conversations"][0]["value"], row["conversations"][1]["value"]
        assert "<image>" not in human
        evidence = human.split("\n")[0]
        if "is sure it shows:" in evidence:
            kinds["sure"] += 1
            name = re.search(r"shows: (.+) \(\d+%\)\]", evidence).group(1)
            assert name in gpt
            assert "can't tell" not in gpt or "details" in gpt
        elif "best guesses" in evidence:
            kinds["unsure"] += 1
            assert "can't tell" in gpt.lower() or gpt.startswith("Maybe")
        else:
            kinds["lost"] += 1
            assert "can't tell" in gpt.lower()
    assert min(kinds.values()) > 30, kinds


class HeadedTower(VisionTower):
    """A tiny tower with a classifier head: the tiny CLIP tower plus a linear head."""

    def __init__(self, inner: VisionTower, names: list[str]) -> None:
        super().__init__()
        self.inner = inner
        self.num_tokens, self.hidden_size = inner.num_tokens, inner.hidden_size
        self.class_names = names
        self.head = nn.Linear(inner.hidden_size, len(names))
        with torch.no_grad():
            self.head.weight.mul_(40.0)  # peaked distributions, like a real head's
        self.freeze()

    def preprocess(self, images):
        return self.inner.preprocess(images)

    def encode(self, pixel_values):
        return self.inner.encode(pixel_values)

    @torch.no_grad()
    def class_probs(self, features):
        return self.head(features.float().mean(1)).softmax(-1)


@pytest.fixture
def bridged_lite(tiny_lite):
    lite = tiny_lite(lora=False)
    torch.manual_seed(0)
    lite.model.vision_tower = HeadedTower(lite.model.vision_tower, ["tabby cat", "espresso", "tripod", "moped"])
    drawing = Image.new("RGB", (32, 32), "white")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    tower = lite.model.vision_tower
    feats = tower(tower.preprocess([drawing, photo]))
    gate = DomainGate.fit(torch.randn(20, tower.hidden_size) * 1e-3 + feats[0].mean(0), dims=2)
    # the unit test above covers fitting; here the threshold just splits the two images
    gate.threshold = float(gate.scores(feats).mean())
    lite.model.domain_gate = gate
    lite.model.config.label_bridge = LabelBridgeConfig(enabled=True)
    return lite, drawing, photo


def test_a_photo_reaches_the_llm_as_the_heads_guesses(bridged_lite):
    lite, drawing, photo = bridged_lite
    ev = lite.evidence(photo)
    assert ev.outside and not lite.evidence(drawing).outside
    assert sum(p for _, p in ev.classes) == pytest.approx(1.0, abs=1e-3)
    tok = lite.processor.tokenizer
    prompt = lite.prepare([lite.user_message("what is this?")], [photo], max_new_tokens=8)
    ids, embeds, keys = prompt.ids, prompt.embeds, prompt.keys
    assert embeds is None and keys == []
    assert lite.processor.image_token_id not in ids
    assert evidence_text(ev.classes, lite.config.label_bridge) in tok.decode(ids)
    prompt = lite.prepare([lite.user_message("what is this?")], [drawing], max_new_tokens=8)
    ids, embeds = prompt.ids, prompt.embeds
    assert embeds.shape[0] == 1 and ids.count(lite.processor.image_token_id) == lite.processor.num_image_tokens
    # a conversation with both: the drawing's tokens stay, the photo becomes text
    msg = {"role": "user", "content": "<image>\n<image>\ncompare them"}
    prompt = lite.prepare([msg], [drawing, photo], max_new_tokens=8)
    ids, embeds = prompt.ids, prompt.embeds
    assert embeds.shape[0] == 1 and evidence_text(ev.classes, lite.config.label_bridge) in tok.decode(ids)
    # every path agrees: ask, ask_batch (mixed rows) and ask_many
    one = lite.ask(photo, "what is this?", max_new_tokens=6)
    assert lite.ask_batch([photo, drawing], ["what is this?"] * 2, max_new_tokens=6)[0] == one
    assert lite.ask_many(photo, ["what is this?", "is it a cat?"], max_new_tokens=6)[0] == one


def test_the_gate_saves_with_the_checkpoint_and_is_required_by_it(bridged_lite, tmp_path):
    from llava_lite.checkpoint import load_checkpoint

    lite, _, _ = bridged_lite
    lite.model.vision_tower = lite.model.vision_tower.inner  # the saved config names the CLIP tower
    lite.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / GATE_NAME).is_file()
    # a CLIP tower has no head: the bridge cannot be on
    with pytest.raises(ConfigError, match="classifier head"):
        load_checkpoint(tmp_path / "m")
    (tmp_path / "m" / GATE_NAME).unlink()
    lite.model.domain_gate = None
    with pytest.raises(ValueError, match="no fitted domain gate"):
        lite.save_pretrained(tmp_path / "n")


def test_fit_domain_gate_needs_the_bridge_on():
    from llava_lite.recipes import get_recipe

    from llava_lite.settings import apply_overrides

    with pytest.raises(ConfigError, match="fit_domain_gate needs"):
        apply_overrides(get_recipe("demo"), ["model.label_bridge.enabled=false"])
    with pytest.raises(ConfigError, match="label_bridge needs"):
        apply_overrides(get_recipe("demo"), ["model.label_bridge.confident=0.1"])


BRIDGE_STAGE = ('bridge={"data": [{"name": "photo-evidence", "args": {"n": 16}}, '
                '{"name": "scenes-vqa", "args": {"n": 40}}], "lora": true, "train_projector": false, '
                '"fit_domain_gate": true, "max_steps": 2, "batch_size": 2, "micro_batch_size": 2}')


def test_the_bridge_stage_fits_the_gate_and_a_real_photo_goes_in_as_words(tiny_llm_dir, tmp_path):
    """The tiny recipe's real headed tower (EfficientNet-Lite0) with a tiny LLM: align, then the
    bridge stage; then again from the align model with --init."""
    import skimage
    from llava_lite.recipes import get_recipe

    from llava_lite import LlavaLite
    from llava_lite.data.builders import generated_scenes
    from llava_lite.packaged import cache_dir
    from llava_lite.settings import apply_overrides
    from llava_lite.train.run import run_recipe

    recipe = apply_overrides(get_recipe("tiny"), [
        f"model.llm.model_id={tiny_llm_dir}", "model.label_bridge.enabled=true", "adapter.enabled=false",
        "instruct.enabled=false", "align.max_steps=1", "align.eval=[]", BRIDGE_STAGE])
    run_recipe(recipe, ["align", "bridge"], tmp_path / "run", progress=False)
    model_dir = tmp_path / "run" / "4-bridge" / "model"
    assert (model_dir / GATE_NAME).is_file()
    assert not (tmp_path / "run" / "1-align" / "model" / GATE_NAME).exists()
    lite = LlavaLite.from_pretrained(model_dir)
    assert lite.config.label_bridge.enabled
    cat = str(Path(skimage.__file__).parent / "data" / "chelsea.png")
    scene = generated_scenes(cache_dir() / "data", "train", 40, 0)[0]["image"]
    assert lite.evidence(cat).outside and not lite.evidence(scene).outside
    prompt = lite.prepare([lite.user_message("what is this?")], [cat], max_new_tokens=8)
    ids, embeds = prompt.ids, prompt.embeds
    assert embeds is None and "[a photo; the image classifier" in lite.processor.tokenizer.decode(ids)
    # the same stage on any checkpoint, with --init
    run_recipe(recipe, ["bridge"], tmp_path / "again", progress=False, init_from=tmp_path / "run" / "1-align" / "model")
    assert (tmp_path / "again" / "4-bridge" / "model" / GATE_NAME).is_file()
    with pytest.raises(ConfigError, match="--init needs"):
        run_recipe(recipe, ["bridge"], tmp_path / "x", progress=False, init_from=tmp_path)


def test_the_chat_page_shows_the_heads_guesses_under_the_reply_for_photos(bridged_lite, tmp_path):
    from llava_lite.serve.app import make_chat_fn
    from llava_lite.serve.engine import ChatEngine
    from llava_lite.serve.gradio_history import EVIDENCE_MARK, history_to_request
    from llava_lite.serve.limits import ServeLimits

    lite, drawing, photo = bridged_lite
    drawing.save(tmp_path / "drawing.png")
    photo.save(tmp_path / "photo.png")
    respond = make_chat_fn(ChatEngine(lite, ServeLimits(max_new_tokens=4)))
    on_photo = list(respond({"text": "what is this?", "files": [str(tmp_path / "photo.png")]}, [], 0.0, 1.0, 4))[-1]
    reply, note = on_photo.split(EVIDENCE_MARK)
    top = lite.evidence(photo).classes[0]
    assert f"{top[0]} {top[1]:.0%}" in note and "not the photo itself" in note
    assert reply == lite.ask(photo, "what is this?", max_new_tokens=4)
    on_drawing = list(respond({"text": "what is this?", "files": [str(tmp_path / "drawing.png")]}, [], 0.0, 1.0, 4))
    assert EVIDENCE_MARK not in on_drawing[-1]
    # the note is the page's, not the model's: it never goes back into the conversation
    history = [{"role": "user", "content": {"path": str(tmp_path / "photo.png")}},
               {"role": "user", "content": "what is this?"}, {"role": "assistant", "content": on_photo}]
    messages, _ = history_to_request(history, "and now?", [], "<image>")
    assert messages[1] == {"role": "assistant", "content": reply}
