"""compile_layers=true (train/compiled_layers.py): the compiled decoder layers give the eager
step's loss and gradients, and the layers are eager again afterwards."""

from __future__ import annotations

import pytest
import torch

from llava_lite.config import ConfigError
from llava_lite.train import compiled_layers as cl
from tests.test_prefix_attention import _batch_and_module, _loss_and_grads


def test_compiled_layers_give_the_eager_step_and_are_put_back(tiny_lite, images, tmp_path):
    lite, packs, module = _batch_and_module(tiny_lite, images, tmp_path)
    llm = lite.model.llm
    layers = cl.decoder_layers(llm)
    assert len(layers) == llm.config.num_hidden_layers > 0
    eager = _loss_and_grads(lite, module, packs, "prefix")
    torch._dynamo.reset()
    with cl.compiled_layers(llm, torch.device("cpu")) as n:
        assert n == len(layers) and all("forward" in vars(layer) for layer in layers)
        compiled = _loss_and_grads(lite, module, packs, "prefix")
        # a batch of another width (the graphs are built for dynamic shapes) gives the eager loss too
        again = _loss_and_grads(lite, module, packs[1:], "prefix")
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    assert compiled[1].keys() == eager[1].keys() and any("lora_" in k for k in eager[1])
    for name, g in eager[1].items():
        assert (compiled[1][name] - g).abs().max() <= 1e-4 * g.abs().max(), name
    assert all("forward" not in vars(layer) for layer in layers)
    assert again[0] == pytest.approx(_loss_and_grads(lite, module, packs[1:], "prefix")[0], rel=1e-5)


def test_compile_layers_without_a_cpu_compiler_is_refused_up_front(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(cl.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        cl.check_compiler(torch.device("cpu"))


def test_compile_layers_on_a_model_without_named_layers_is_refused():
    with pytest.raises(ConfigError, match="_no_split_modules"):
        with cl.compiled_layers(torch.nn.Linear(2, 2), torch.device("cpu")):
            pass
