"""One config system: every config dataclass loads from JSON/TOML/YAML, type-checks strictly,
refuses unknown keys and takes the same dotted, typed overrides."""

from __future__ import annotations

import json

import pytest

from llava_lite.cli import build_parser
from llava_lite.config import ConfigError, LlavaLiteConfig
from llava_lite.dual_encoder import DualEncoderConfig
from llava_lite.serve.cli import serve_config
from llava_lite.serve.config import ServeConfig
from llava_lite.settings import apply_overrides
from llava_lite.train.clip_recipe import ClipRecipe
from llava_lite.train.recipe import TrainRecipe


@pytest.mark.parametrize("cls", [LlavaLiteConfig, TrainRecipe, ClipRecipe, DualEncoderConfig, ServeConfig])
def test_every_config_round_trips_and_refuses_unknown_keys(cls, tmp_path):
    obj = cls() if cls is not ClipRecipe else ClipRecipe(fashion_per_class=4)
    if cls is TrainRecipe:
        obj = apply_overrides(obj, ['align.data=[{"name": "shapes-captions"}]', "adapter.enabled=false",
                                    "instruct.enabled=false"])
    obj.save(tmp_path / "c.json")
    assert cls.load(tmp_path / "c.json") == obj
    data = {**obj.to_dict(), "bogus": 1}
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        cls.from_dict(data, source="my.json")
    (tmp_path / "c.yaml").write_text("bogus: 1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'bogus'"):
        cls.load(tmp_path / "c.yaml")


def test_overrides_are_typed_by_the_field():
    cfg = LlavaLiteConfig()
    out = apply_overrides(cfg, ["system_prompt=Be brief.", "max_length=512", "llm.model_id=123",
                                "vision.concat_blocks=[3, 5]", "lora.dropout=0"])
    assert out.system_prompt == "Be brief." and out.max_length == 512
    assert out.llm.model_id == "123"  # a text field keeps the text, even when it looks like JSON
    assert out.vision.concat_blocks == [3, 5] and out.lora.dropout == 0.0
    assert cfg.max_length == 2048  # the original is untouched
    for item, needle in (("max_length=big", "overrides: max_length: input should be a valid integer"),
                         ("lora.enabled=yes", "lora.enabled: input should be a valid boolean"),
                         ("vision.nope=1", "no such field 'nope'"), ("max_length", "not key=value"),
                         ("max_length=4", "too small")):
        with pytest.raises(ConfigError, match=needle):
            apply_overrides(cfg, [item])


def test_nested_dataclass_lists_take_overrides_by_index():
    recipe = apply_overrides(TrainRecipe(), ['align.data=[{"name": "shapes-captions", "limit": 5}]',
                                             "align.data.0.limit=7", "adapter.enabled=false",
                                             "instruct.enabled=false"])
    assert recipe.align.data[0].limit == 7 and type(recipe.align.data[0]).__name__ == "DataSpec"
    with pytest.raises(ConfigError, match=r"align.data.0.limit: input should be a valid integer"):
        apply_overrides(recipe, ["align.data.0.limit=1.5"])


def test_serve_takes_the_same_overrides_between_file_and_flags(tmp_path):
    toml = tmp_path / "serve.toml"
    toml.write_text("[limits]\nmax_images = 3\nconcurrency = 2\n")
    args = build_parser().parse_args(["serve", "--config", str(toml), "--set", "limits.max_images=5",
                                      "--set", "rate_limit.concurrent=2", "--concurrency", "4"])
    config = serve_config(args)
    assert (config.limits.max_images, config.limits.concurrency, config.rate_limit.concurrent) == (5, 4, 2)
    with pytest.raises(ConfigError, match="must be positive"):
        serve_config(build_parser().parse_args(["serve", "--set", "limits.max_images=0"]))


def test_a_config_file_of_the_wrong_shape_names_the_file(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="list.json: expected a table of settings"):
        LlavaLiteConfig.load(path)
    (tmp_path / "x.ini").write_text("a=1")
    with pytest.raises(ConfigError, match="use a .json, .toml, .yaml"):
        ServeConfig.load(tmp_path / "x.ini")
