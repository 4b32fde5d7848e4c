"""Keeping the base LLM's text skills: text-only rows learn its next-token distribution.

Replaying the base model's greedy answers teaches one token per position; the KL divergence to
its full distribution (the same LLM with the LoRA adapter disabled) keeps everything it would
have said, so image training moves text-only behaviour as little as possible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llava_lite.prompting import IGNORE_INDEX


def text_only_rows(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(batch,) True for rows with no image placeholder."""
    return ~(input_ids == image_token_id).any(dim=1)


def token_losses(model, input_ids, attention_mask, labels, image_embeds, distill: bool, **llm_kwargs) -> torch.Tensor:
    """Summed loss over the micro-batch's supervised tokens: cross-entropy on the labels, except
    that with `distill` the tokens of text-only rows take KL(base || model) instead."""
    out = model(input_ids, attention_mask=attention_mask, image_embeds=image_embeds, labels=labels,
                return_logits=distill, **llm_kwargs)
    if not distill:
        return out.loss * out.num_label_tokens
    keep = labels[:, 1:] != IGNORE_INDEX
    text = text_only_rows(input_ids, model.image_token_id)
    in_text = text[:, None].expand_as(keep)[keep]  # which supervised tokens belong to text-only rows
    logits = out.logits.float()
    ce = F.cross_entropy(logits[~in_text], labels[:, 1:][keep][~in_text], reduction="sum")
    if not bool(text.any()):
        return ce
    teacher = base_logits(model, input_ids[text], attention_mask[text], labels[text],
                          {k: v[text] for k, v in llm_kwargs.items()})
    student = logits[in_text].log_softmax(-1)
    kl = F.kl_div(student, teacher.log_softmax(-1), log_target=True, reduction="sum")
    return ce + kl


@torch.no_grad()
def base_logits(model, input_ids, attention_mask, labels, llm_kwargs) -> torch.Tensor:
    """The base LLM's logits (adapter disabled) at the supervised positions of text-only rows."""
    with model.llm.disable_adapter():
        out = model(input_ids, attention_mask=attention_mask, image_embeds=None, labels=labels,
                    return_logits=True, **llm_kwargs)
    return out.logits.float()
