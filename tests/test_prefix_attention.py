"""Packed batches attend without a dense mask (train/prefix_attention.py) and, in bf16 runs, with
the frozen weights pre-cast (train/precision.py): both must give the reference's numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft.helpers import disable_input_dtype_casting

from llava_lite.config import ConfigError
from llava_lite.train import loop, stepping
from llava_lite.train.packing import Pack, pack_attention, pack_rows, single, without_stems
from llava_lite.train.precision import frozen_linear_weights
from llava_lite.train.prefix_attention import PackLayout, layout_of, packed_attention
from tests.test_train import _encoded_rows


def _packs(shapes):
    """Packs from (prefix length, suffixes): a suffix is a length, or (stem length, [leaf lengths])."""
    packs = []
    for prefix, suffixes in shapes:
        pack = Pack([], [], [], [0] * prefix, list(range(prefix)))
        for suffix in suffixes:
            stem, leaves = suffix if isinstance(suffix, tuple) else (0, [suffix])
            parent = 0
            if stem:
                pack.parents.append(0)
                parent = len(pack.parents)
                pack.segments += [parent] * stem
                pack.positions += range(prefix, prefix + stem)
            for n in leaves:
                pack.parents.append(parent)
                pack.segments += [len(pack.parents)] * n
                pack.positions += range(prefix + stem, prefix + stem + n)
        pack.input_ids, pack.labels = [1] * len(pack.segments), [0] * len(pack.segments)
        packs.append(pack)
    return packs


@pytest.mark.parametrize("shapes", [
    # packs of different prefix and suffix lengths, an unpacked row, a one-token suffix, padding
    [(5, [3, 2, 4]), (7, []), (4, [1, 5]), (3, [2])],
    # stems: leaves that see a shared stem beside plain suffixes, a one-token leaf, a stem longer
    # than any leaf, a pack without stems in the same batch
    [(5, [(3, [2, 4]), 3, (2, [1, 1, 3])]), (7, []), (4, [(6, [2])]), (3, [2, 1])],
    # many short suffixes and a long one (a caption): two length groups, stems in both
    [(3, [2, 2, 2, 2, (2, [2, 1]), 2, 12, (3, [11])]), (5, [1, 9, 2, 2])],
])
def test_packed_attention_equals_the_block_mask_attention_and_its_gradients(shapes):
    torch.manual_seed(0)
    packs = _packs(shapes)
    width = max(len(p.segments) for p in packs)
    mask, _ = pack_attention(packs, width)
    B = len(packs)
    q = torch.randn(B, 6, width, 8, requires_grad=True)
    k = torch.randn(B, 2, width, 8, requires_grad=True)  # grouped-query: 3 query heads per kv head
    v = torch.randn(B, 2, width, 8, requires_grad=True)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                         attn_mask=mask).transpose(1, 2)
    out = packed_attention(q, k, v, layout_of([p.segments for p in packs], width, [p.parents for p in packs]))
    real = torch.tensor([[i < len(p.segments) for i in range(width)] for p in packs])
    assert torch.allclose(out[real], ref[real], atol=1e-5)
    assert bool(out[~real].isfinite().all())  # padding: anything finite (no label reads it)
    weights = torch.randn_like(ref) * real[..., None, None]
    for a, b in zip(torch.autograd.grad((ref * weights).sum(), (q, k, v)),
                    torch.autograd.grad((out * weights).sum(), (q, k, v)), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_suffixes_are_split_by_length_where_that_pads_less():
    from llava_lite.train.prefix_attention import _split_by_length

    groups = _split_by_length(torch.tensor([2, 12, 3, 2, 2, 11, 3, 2]))
    assert [sorted(g.tolist()) for g in groups] == [[0, 2, 3, 4, 6, 7], [1, 5]]
    assert len(_split_by_length(torch.tensor([4, 5, 4, 5]))) == 1  # splitting saves too little here
    packs = _packs([(3, [2, 2, 2, 2, (2, [2, 1]), 2, 12, (3, [11])])])
    layout = layout_of([p.segments for p in packs], 48, [p.parents for p in packs])
    assert [g.seg_len for g in layout.index(torch.device("cpu")).packed.groups] == [3, 12]


def test_a_leaf_sees_its_stem_and_not_another_stem_or_leaf():
    pack = _packs([(2, [(2, [1, 1]), (2, [1])])])[0]
    assert pack.segments == [0, 0, 1, 1, 2, 3, 4, 4, 5] and pack.parents == [0, 1, 1, 0, 4]
    assert pack.positions == [0, 1, 2, 3, 4, 4, 2, 3, 4]
    mask, _ = pack_attention([pack], 9)
    seen = [[k for k in range(9) if mask[0, 0, q, k]] for q in range(9)]
    assert seen[5] == [0, 1, 2, 3, 5]  # second leaf: prefix, its stem, itself (not the first leaf)
    assert seen[8] == [0, 1, 6, 7, 8]  # the other stem's leaf


def test_a_layout_whose_prefix_is_not_at_the_start_is_refused():
    layout = PackLayout(torch.tensor([[0, 0, 1, 0, -1]]))
    with pytest.raises(ValueError, match="segment 0"):
        layout.index(torch.device("cpu"))


INSTRUCTED = "Answer each question with a single word.\n"


def test_rows_asked_alike_share_a_stem_and_keep_their_separate_losses(tiny_lite, images, tmp_path):
    """Questions that start with the same instruction share it once (a stem); the pack's loss,
    on either attention path, is still the sum of the rows' own losses."""
    lite = tiny_lite(lora=True, seed=1)
    images[0].save(tmp_path / "a.png")
    questions = [(INSTRUCTED + "What color is it?", "red"), ("what color is it", "It is red."),
                 (INSTRUCTED + "How many shapes are there?", "two"), ("is it big?", "Yes, it is."),
                 (INSTRUCTED + "Is it big?", "yes")]
    rows = _encoded_rows(lite, tmp_path / "a.png", questions, instruction="")
    packs = pack_rows(rows, lite.processor.image_token_id, 16, 512)
    (pack,) = packs
    n_stem = len(lite.processor.tokenizer(INSTRUCTED.strip(), add_special_tokens=False)["input_ids"])
    stems = [k for k in set(pack.parents) if k]
    assert len(stems) == 1 and pack.parents.count(stems[0]) == 3 and pack.members == 5
    assert pack.segments.count(stems[0]) >= n_stem
    flat = without_stems(pack)  # the layout before stems: only the prefix shared
    assert not any(flat.parents) and flat.members == 5
    assert len(flat.input_ids) == sum(len(r.input_ids) for r in rows) - 4 * pack.segments.count(0)
    assert len(flat.input_ids) - len(pack.input_ids) == 2 * pack.segments.count(stems[0])
    module = loop.TrainModule(lite.model, contrastive=False)
    with torch.no_grad():
        separate = sum(module(**stepping.collate([single(r)], lite.processor, None, packed=False))[0]
                       for r in rows)
        for attention, items in (("prefix", packs), ("mask", packs), ("prefix", [flat])):
            packed, _ = module(**stepping.collate(items, lite.processor, None, packed=True, attention=attention))
            assert packed.item() == pytest.approx(separate.item(), rel=1e-5), attention


def test_a_stem_stops_before_a_supervised_token(tiny_lite, images, tmp_path):
    """Rows identical up to their answers share no answer token: it would be learnt once, not per row."""
    lite = tiny_lite(lora=False)
    images[0].save(tmp_path / "a.png")
    rows = _encoded_rows(lite, tmp_path / "a.png", [("What is it?", "a red circle"), ("How big?", "small"),
                                                    ("What is it?", "a red disc")], instruction="")
    (pack,) = pack_rows(rows, lite.processor.image_token_id, 16, 512)
    stem = [i for i, s in enumerate(pack.segments) if s == 1]
    assert pack.parents == [0, 1, 1, 0] and all(pack.labels[i] == -100 for i in stem)
    leaves = [[pack.labels[i] for i, s in enumerate(pack.segments) if s == k] for k in (2, 3)]
    assert all(leaf[0] == -100 and any(t != -100 for t in leaf) for leaf in leaves)


def _batch_and_module(tiny_lite, images, tmp_path):
    lite = tiny_lite(lora=True, seed=1)
    for i in range(2):
        images[i].save(tmp_path / f"{i}.png")
    rows = _encoded_rows(lite, tmp_path / "0.png", [("What color?", "red"), ("How many?", "two"),
                                                    ("Is it big?", "yes, it is")])
    rows += _encoded_rows(lite, tmp_path / "1.png", [("What shape?", "a circle")])
    packs = pack_rows(rows, lite.processor.image_token_id, 16, 256) + [single(rows[0])]
    return lite, packs, loop.TrainModule(lite.model, contrastive=False)


def _loss_and_grads(lite, module, packs, attention):
    module.zero_grad()
    batch = stepping.collate(packs, lite.processor, None, packed=True, attention=attention)
    loss, _ = module(**batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.item(), grads


def test_a_training_step_through_prefix_attention_matches_the_block_mask(tiny_lite, images, tmp_path):
    lite, packs, module = _batch_and_module(tiny_lite, images, tmp_path)
    assert [p.members for p in packs] == [3, 1, 1]
    loss_mask, grads_mask = _loss_and_grads(lite, module, packs, "mask")
    loss_prefix, grads_prefix = _loss_and_grads(lite, module, packs, "prefix")
    assert loss_prefix == pytest.approx(loss_mask, rel=1e-5)
    assert grads_prefix.keys() == grads_mask.keys() and any("lora_" in n for n in grads_mask)
    for name, g in grads_mask.items():
        # float32 summation order differs; a wrong mask would differ at the gradient's own scale
        assert (grads_prefix[name] - g).abs().max() <= 1e-5 * g.abs().max(), name
    # the LLM's attention is put back: generation after training uses plain SDPA
    assert lite.model.llm.config._attn_implementation != "llava_lite_prefix"


def test_an_llm_that_ignores_the_layout_is_refused(tiny_lite, images, tmp_path, monkeypatch):
    from contextlib import nullcontext

    lite, packs, module = _batch_and_module(tiny_lite, images, tmp_path)
    monkeypatch.setattr(loop, "prefix_attention", lambda llm: nullcontext())  # attention never sees it
    batch = stepping.collate(packs, lite.processor, None, packed=True)
    with pytest.raises(ConfigError, match="pack_attention=mask"):
        module(**batch)


def test_frozen_weights_held_in_bf16_give_the_autocast_step_and_are_put_back(tiny_lite, images, tmp_path):
    lite, packs, module = _batch_and_module(tiny_lite, images, tmp_path)
    llm = lite.model.llm
    before = {n: p for n, p in llm.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _loss_and_grads(lite, module, packs, "prefix")
        with frozen_linear_weights(llm, torch.bfloat16) as n, disable_input_dtype_casting(llm):
            dtypes = {p.dtype for name, p in llm.named_parameters() if "base_layer" in name}
            fast = _loss_and_grads(lite, module, packs, "prefix")
    assert n > 0 and dtypes == {torch.bfloat16}
    assert fast[0] == pytest.approx(ref[0], rel=1e-6)
    for name, g in ref[1].items():
        assert (fast[1][name] - g).abs().max() <= 1e-3 * g.abs().max(), name
    after = dict(llm.named_parameters())
    assert all(after[k] is p and p.dtype == torch.float32 for k, p in before.items())
    assert llm.get_input_embeddings().weight.dtype == torch.float32


@pytest.mark.slow
def test_bench_steps_compares_the_paths_on_the_same_batches(capsys):
    """The step benchmark on the tiny recipe's default parts: in fp32 the paths differ only
    by summation order, on the same batch and along a short training run."""
    import json

    from llava_lite.train import bench_steps

    assert bench_steps.main(["--recipe", "tiny", "--stage", "adapter", "--steps", "3", "--curve", "3",
                             "--paths", "reference,fast,fast-flat"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["timed_steps"] == 2 and set(result["tokens_per_s"]) == {"reference", "fast", "fast-flat"}
    assert set(result["speedup_over_reference_median_of_batches"]) == {"fast", "fast-flat"}
    assert max(result["max_same_batch_loss_gap_to_reference"].values()) < 1e-4
    assert len(result["loss_curves"]["fast"]) == 3
    assert max(result["max_curve_gap_to_reference"].values()) < 1e-3
