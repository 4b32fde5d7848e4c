"""The training engine on tiny models: stage chaining, checkpoints, resume, divergence, data checks."""

from __future__ import annotations

import json

import pytest
import torch
from llava_lite.recipes import get_recipe
from safetensors.torch import load_file

from llava_lite.config import ConfigError
from llava_lite.llava_data import DataValidationError
from llava_lite.settings import apply_overrides
from llava_lite.train import loop, stepping
from llava_lite.train.recipe import DataSpec
from llava_lite.train.run import run_recipe


@pytest.fixture
def tiny_recipe(tiny_llm_dir, tiny_clip_dir):
    def make(*extra: str):
        base = [f"model.llm.model_id={tiny_llm_dir}", "model.vision.name=clip",
                f"model.vision.model_id={tiny_clip_dir}"]
        return apply_overrides(get_recipe("tiny"), base + list(extra))

    return make


def _losses(stage_dir):
    return [json.loads(line)["loss"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_all_stages_chain_and_write_their_outputs(tiny_recipe, tmp_path):
    summary = run_recipe(tiny_recipe(), ["align", "adapter", "instruct"], tmp_path / "run", progress=False)
    for i, name in enumerate(["align", "adapter", "instruct"], start=1):
        d = tmp_path / "run" / f"{i}-{name}"
        assert (d / "model" / "config.json").is_file() and (d / "loss.png").stat().st_size > 1000
        assert len(_losses(d)) == 4 and all(loss > 0 for loss in _losses(d))
        assert json.loads((d / "stage.json").read_text())["steps"] == 4
        assert "scenes-test" in json.loads((d / "eval.json").read_text())
        # keep_last=2 of the checkpoints at steps 2 and 4
        assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
        assert summary[name]["final_loss"] == pytest.approx(_losses(d)[-1], abs=1e-6)
    assert not (tmp_path / "run" / "1-align" / "model" / "adapter").exists()  # align trains no LoRA
    assert (tmp_path / "run" / "3-instruct" / "model" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["name"] == "tiny"


def test_the_final_model_is_that_of_the_last_stage_run(tiny_recipe, tmp_path):
    from llava_lite.train.run import last_model_dir

    recipe = tiny_recipe()
    assert last_model_dir(recipe, tmp_path).parent.name == "3-instruct"
    assert last_model_dir(recipe, tmp_path, ["adapter"]).parent.name == "2-adapter"
    assert last_model_dir(apply_overrides(recipe, ["instruct.enabled=false"]), tmp_path).parent.name == "2-adapter"


def test_a_stage_starts_from_the_previous_stage_model(tiny_recipe, tmp_path, monkeypatch):
    recipe = tiny_recipe()
    run_recipe(recipe, ["align"], tmp_path, progress=False)
    seen = {}
    real = loop.build_stage_model

    def spy(recipe, stage, init_from):
        model, processor = real(recipe, stage, init_from)
        seen["init_from"] = init_from
        seen["projector"] = {k: v.clone() for k, v in model.projector.state_dict().items()}
        return model, processor

    monkeypatch.setattr(loop, "build_stage_model", spy)
    run_recipe(recipe, ["adapter"], tmp_path, progress=False)
    aligned = load_file(str(tmp_path / "1-align" / "model" / "projector.safetensors"))
    assert seen["init_from"] == tmp_path / "1-align" / "model"
    assert all(torch.equal(seen["projector"][k], aligned[k]) for k in aligned)
    # instruct alone without a finished adapter stage in another folder is an error
    with pytest.raises(ConfigError, match="previous stage"):
        run_recipe(recipe, ["instruct"], tmp_path / "other", progress=False)


def test_projector_learns_in_align(tiny_recipe, tmp_path):
    recipe = tiny_recipe("align.max_steps=12", "align.projector_lr=0.01", "align.eval=[]")
    run_recipe(recipe, ["align"], tmp_path, progress=False)
    losses = _losses(tmp_path / "1-align")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_recipe, tmp_path, monkeypatch):
    recipe = tiny_recipe("adapter.max_steps=6", "adapter.eval=[]", "align.eval=[]")
    run_recipe(recipe, ["align", "adapter"], tmp_path / "full", progress=False)
    full = _losses(tmp_path / "full" / "2-adapter")

    run_recipe(recipe, ["align"], tmp_path / "crash", progress=False)
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def crashing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # die during step 4, after the step-2 checkpoint (save_every=2)
            raise RuntimeError("simulated crash")
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_recipe(recipe, ["adapter"], tmp_path / "crash", progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    # without --resume an interrupted folder is refused rather than overwritten
    with pytest.raises(ConfigError, match="--resume"):
        run_recipe(recipe, ["adapter"], tmp_path / "crash", progress=False)
    summary = run_recipe(recipe, ["align", "adapter"], tmp_path / "crash", resume=True, progress=False)
    assert summary["adapter"]["resumed_from"] == 2
    resumed = _losses(tmp_path / "crash" / "2-adapter")
    assert len(resumed) == 6
    assert resumed == pytest.approx(full, rel=1e-5, abs=1e-6)
    a = load_file(str(tmp_path / "full" / "2-adapter" / "model" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "crash" / "2-adapter" / "model" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_nan_loss_stops_with_the_last_good_checkpoint(tiny_recipe, tmp_path, monkeypatch):
    recipe = tiny_recipe("align.eval=[]")
    real_forward = loop.TrainModule.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        ce, con = real_forward(self, *a, **k)
        calls["n"] += 1
        return (ce * float("nan") if calls["n"] > 5 else ce), con  # 2 micro-batches per step: step 3

    monkeypatch.setattr(loop.TrainModule, "forward", poisoned)
    with pytest.raises(loop.TrainingDivergedError, match="step 3.*step-0000002"):
        run_recipe(recipe, ["align"], tmp_path, progress=False)
    ckpts = sorted(p.name for p in (tmp_path / "1-align" / "checkpoints").iterdir())
    assert ckpts == ["step-0000002"]
    state = load_file(str(tmp_path / "1-align" / "checkpoints" / "step-0000002" / "model" / "projector.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())


def test_malformed_data_fails_before_training_with_file_index(tiny_recipe, tmp_path, monkeypatch, images):
    img = tmp_path / "ok.png"
    images[0].save(img)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [
        {"id": 0, "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                      {"from": "gpt", "value": "A shape."}]},
        {"id": 1, "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                           {"from": "gpt", "value": "x"}]},
        {"id": 2, "image": "ok.png", "conversations": [{"from": "human", "value": "no placeholder"},
                                                      {"from": "gpt", "value": "x"}]},
        {"id": 3, "image": "broken.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                          {"from": "gpt", "value": "x"}]},
        {"id": 4, "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
        {"id": 5, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]},
        {"id": 6, "conversations": [{"from": "human", "value": "word " * 600}, {"from": "gpt", "value": "late"}]},
        {"id": 7, "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                      {"from": "gpt", "value": "Fine."}]},
    ]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(rows))
    recipe = tiny_recipe("align.eval=[]")
    recipe.align.data = [DataSpec(path=str(data), image_root=str(tmp_path))]
    trained = []
    monkeypatch.setattr(loop.TrainModule, "forward", lambda *a, **k: trained.append(1))
    with pytest.raises(DataValidationError) as err:
        run_recipe(recipe, ["align"], tmp_path / "run", progress=False)
    assert not trained
    msg = str(err.value)
    for index, reason in [(1, "not found"), (2, "no <image> placeholder"), (3, "not an image"),
                          (4, "expected a user turn"), (5, "empty assistant turn"), (6, "max_length")]:
        assert f"{data}:{index}:" in msg and reason in msg, (index, reason, msg)
    assert f"{data}:0:" not in msg and f"{data}:7:" not in msg
    assert "6 of 8 rows are bad" in msg


def test_skip_bad_drops_and_counts(tiny_recipe, tmp_path, images):
    images[0].save(tmp_path / "ok.png")
    good = {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                {"from": "gpt", "value": "A shape."}]}
    lines = [json.dumps({**good, "id": i}) for i in range(4)] + ["{not json", json.dumps({"id": 9})]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    recipe = tiny_recipe("align.eval=[]", "skip_bad=true")
    recipe.align.data = [DataSpec(path=str(tmp_path / "t.jsonl"), image_root=str(tmp_path))]
    summary = run_recipe(recipe, ["align"], tmp_path / "run", progress=False)
    assert summary["align"]["rows"] == 4 and summary["align"]["skipped_rows"] == 2


def test_recipe_overrides_and_validation(tiny_recipe):
    r = tiny_recipe("adapter.lr=0.5", "align.data.0.args.n=3", "seed=7")
    assert r.adapter.lr == 0.5 and r.align.data[0].args["n"] == 3 and r.seed == 7
    with pytest.raises(ConfigError, match="no such field 'nope'"):
        tiny_recipe("adapter.nope=1")
    with pytest.raises(ConfigError, match="multiple of"):
        tiny_recipe("adapter.batch_size=5")
    with pytest.raises(ConfigError, match="precision"):
        tiny_recipe("precision=int3")
    # fields the stages decide are errors, not silently overwritten
    with pytest.raises(ConfigError, match="model.lora.enabled is set by training"):
        tiny_recipe("model.lora.enabled=true")
    with pytest.raises(ConfigError, match="fit_domain_gate"):
        tiny_recipe("model.label_bridge.enabled=true")
    for name in ("demo", "tiny", "llava15-7b"):
        recipe = get_recipe(name)
        assert recipe.to_dict() == type(recipe).from_dict(recipe.to_dict()).to_dict()
    ref = get_recipe("llava15-7b")
    assert (ref.align.projector_lr, ref.align.batch_size) == (1e-3, 256)
    assert (ref.model.lora.r, ref.model.lora.alpha) == (128, 256)
    assert (ref.instruct.lr, ref.instruct.projector_lr) == (2e-4, 2e-5)


def _encoded_rows(lite, image_path, questions, image_first=True, instruction="Answer briefly.\n"):
    from llava_lite.llava_data import EncodedRow, Row

    rows = []
    for i, (q, a) in enumerate(questions):
        text = f"<image>\n{instruction}{q}" if image_first else f"{q}\n<image>"
        conv = [{"role": "user", "content": text}, {"role": "assistant", "content": a}]
        enc = lite.processor.encode_training(conv)
        rows.append(EncodedRow(Row(str(i), [str(image_path)], conv, f"t:{i}"), enc.input_ids, enc.labels))
    return rows


@pytest.mark.parametrize("attention", ["prefix", "mask"])
def test_prefix_shared_packing_gives_the_separate_rows_losses(tiny_lite, images, tmp_path, attention):
    from llava_lite.train.packing import pack_rows, single

    lite = tiny_lite(lora=True, seed=1)
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    images[0].save(paths[0])
    images[1].save(paths[1])
    rows = _encoded_rows(lite, paths[0], [("What color?", "red"), ("How many shapes are there?", "two"),
                                          ("Is it big?", "yes, it is")])
    rows += _encoded_rows(lite, paths[1], [("What shape?", "a circle"), ("Where?", "left")])
    packs = pack_rows(rows, lite.processor.image_token_id, max_members=16, max_length=256)
    assert [p.members for p in packs] == [3, 2]
    assert sum(len(p.input_ids) for p in packs) < sum(len(r.input_ids) for r in rows) * 0.6
    module = loop.TrainModule(lite.model, contrastive=False)
    with torch.no_grad():
        packed, _ = module(**stepping.collate(packs, lite.processor, None, packed=True, attention=attention))
        separate = sum(module(**stepping.collate([single(r)], lite.processor, None, packed=False))[0]
                       for r in rows)
    assert packed.item() == pytest.approx(separate.item(), rel=1e-5)
    # swapping one question changes the pack's loss by exactly that question's own change
    other = _encoded_rows(lite, paths[0], [("Totally different words here?", "red"),
                                           ("How many shapes are there?", "two"), ("Is it big?", "yes, it is")])

    def loss(items, packed):
        with torch.no_grad():
            return module(**stepping.collate(items, lite.processor, None, packed=packed,
                                             attention=attention))[0].item()

    changed = loss(pack_rows(other, lite.processor.image_token_id, 16, 256), True)
    delta = loss([single(other[0])], False) - loss([single(rows[0])], False)
    assert changed - loss(packs[:1], True) == pytest.approx(delta, rel=1e-4, abs=1e-4)


def test_rows_that_cannot_share_a_prefix_stay_single(tiny_lite, images, tmp_path):
    from llava_lite.train.packing import pack_rows

    lite = tiny_lite(lora=False)
    images[0].save(tmp_path / "a.png")
    # the image comes after the question, so it is not inside the shared prefix
    rows = _encoded_rows(lite, tmp_path / "a.png", [("What color?", "red"), ("Which?", "blue")], image_first=False)
    assert [p.members for p in pack_rows(rows, lite.processor.image_token_id, 16, 256)] == [1, 1]
    rows = _encoded_rows(lite, tmp_path / "a.png", [("Q?", "a"), ("R?", "b"), ("S?", "c")])
    assert [p.members for p in pack_rows(rows, lite.processor.image_token_id, 2, 256)] == [2, 1]


def _text_row(lite, question, answer):
    from llava_lite.llava_data import EncodedRow, Row

    conv = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    enc = lite.processor.encode_training(conv)
    return EncodedRow(Row("text", [], conv, "t:text"), enc.input_ids, enc.labels)


def test_text_only_rows_distil_to_the_base_llm(tiny_lite, images, tmp_path):
    """With distill_text, an image row keeps its cross-entropy and a text-only row's loss is the
    KL divergence from the base LLM (adapter disabled) to the adapted one, by hand."""
    from llava_lite.train.packing import single

    lite = tiny_lite(lora=True, seed=1)
    images[0].save(tmp_path / "a.png")
    image_row = _encoded_rows(lite, tmp_path / "a.png", [("What color?", "red")])[0]
    text_row = _text_row(lite, "Name a fruit.", "An apple, or a pear.")

    def batch(rows):
        return stepping.collate([single(r) for r in rows], lite.processor, None, packed=False)

    plain = loop.TrainModule(lite.model, contrastive=False)
    distil = loop.TrainModule(lite.model, contrastive=False, distill=True)
    ids = torch.tensor([text_row.input_ids])
    keep = torch.tensor(text_row.labels[1:]) != -100
    with torch.no_grad():
        image_ce = plain(**batch([image_row]))[0]
        total = distil(**batch([image_row, text_row]))[0]
        student = lite.model.llm(input_ids=ids).logits[0, :-1][keep].log_softmax(-1)
        with lite.model.llm.disable_adapter():
            base = lite.model.llm(input_ids=ids).logits[0, :-1][keep].log_softmax(-1)
    kl = (base.exp() * (base - student)).sum()
    assert kl.item() > 1e-3  # the randomised adapter really moves the text distribution
    assert total.item() == pytest.approx(image_ce.item() + kl.item(), rel=1e-4)
    # gradient from the text row alone reaches the adapter
    loss = distil(**batch([text_row]))[0]
    loss.backward()
    grads = [p.grad for n, p in lite.model.llm.named_parameters() if "lora_" in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_distill_text_needs_lora(tiny_recipe):
    with pytest.raises(ConfigError, match="distill_text needs lora"):
        tiny_recipe("align.distill_text=true")


def test_tensorboard_tracking_writes_loss_lr_and_throughput(tiny_recipe, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe("report_to=tensorboard", "align.eval=[]")
    run_recipe(recipe, ["align"], tmp_path, progress=False)
    stage = tmp_path / "1-align"
    events = list((stage / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, f"no event files under {stage / 'tensorboard'}"
    acc = EventAccumulator(str(events[0].parent)).Reload()
    logged = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    metrics = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    for tag, key in (("train/loss", "loss"), ("train/projector_lr", "projector_lr"),
                     ("train/tokens_per_s", "tokens_per_s"), ("train/samples_per_s", "samples_per_s")):
        assert [s for s, _ in logged[tag]] == [m["step"] for m in metrics]
        assert [v for _, v in logged[tag]] == pytest.approx([m[key] for m in metrics], rel=1e-6)


def test_report_to_is_checked(tiny_recipe, monkeypatch):
    from llava_lite.train import tracking

    with pytest.raises(ConfigError, match="report_to='mlflow'"):
        tiny_recipe("report_to=mlflow").validate()
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="needs the wandb package"):
        tracking.tracker("wandb")


def test_deepspeed_launch_is_refused_not_dropped(monkeypatch):
    """accelerate drops a DeepSpeed config on CPU without a word; training says why it stops."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from llava_lite.train import sharding

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="DeepSpeed is not supported.*fsdp.yaml"):
        sharding.configure(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    with pytest.raises(ConfigError, match="DeepSpeed is not supported"):
        sharding.configure(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
    sharding.configure(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))  # plain DDP: untouched


def test_gradient_checkpointing_gives_the_same_losses_on_packed_rows(tiny_recipe, tmp_path):
    """The adapter stage packs rows under prefix attention; recomputed layers must attend the same
    way (they once fell back to plain SDPA in backward and checkpointing failed)."""
    runs = {}
    for flag in ("false", "true"):
        recipe = tiny_recipe(f"gradient_checkpointing={flag}", "align.eval=[]", "adapter.eval=[]")
        assert recipe.adapter.pack_shared_prefix
        run_recipe(recipe, ["align", "adapter"], tmp_path / flag, progress=False)
        runs[flag] = _losses(tmp_path / flag / "2-adapter")
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-5)


@pytest.mark.slow
def test_a_stage_with_compile_layers_trains_as_the_eager_one(tiny_recipe, tmp_path, capsys):
    """The recipe field reaches the loop, alone and with gradient checkpointing (which recomputes
    the compiled layers in backward): the adapter's logged losses match the eager run's."""
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["adapter.compile_layers=true"]),
                        ("checkpointed", ["adapter.compile_layers=true", "gradient_checkpointing=true"])):
        recipe = tiny_recipe("align.eval=[]", "adapter.eval=[]", *extra)
        run_recipe(recipe, ["align", "adapter"], tmp_path / name, progress=False)
        runs[name] = _losses(tmp_path / name / "2-adapter")
    assert "[adapter] torch.compile:" in capsys.readouterr().out
    assert len(runs["eager"]) > 1
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-4)
    assert runs["checkpointed"] == pytest.approx(runs["eager"], rel=1e-4)


def test_compare_runs_finds_the_one_changed_tensor(tmp_path, capsys):
    from safetensors.torch import save_file

    from llava_lite.train.compare_runs import main

    for name, value in (("a", 1.0), ("b", 1.0), ("c", 2.0)):
        run = tmp_path / name / "1-align" / "model"
        run.mkdir(parents=True)
        save_file({"w": torch.ones(3), "v": torch.full((2,), value)}, str(run / "projector.safetensors"))
        (run / "config.json").write_text('{"x": 1}')
        (tmp_path / name / "metrics.jsonl").write_text(f'{{"step_s": {value * 3}}}\n')  # timings differ anyway
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "2 tensors compared, 0 differences" in capsys.readouterr().out
    assert main([str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    assert "DIFF 1-align/model/projector.safetensors: v" in capsys.readouterr().out
    assert main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
