"""Prompts and labels from the LLM's own chat template, turn by turn.

The conversation is rendered with the tokenizer's template and cut into segments: template
text (never supervised) and each assistant answer plus its end-of-turn token (supervised).
Segments are tokenized separately, so the prompt a model sees at inference tokenizes exactly
like the training prefix. Each image placeholder becomes `num_image_tokens` copies of the
image token id. Anything that does not line up is a loud error, never a silently masked
sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class TemplateMismatchError(ValueError):
    """The tokenizer's chat template does not render conversations prefix-consistently."""


class ConversationError(ValueError):
    """A conversation is malformed (roles, empty turns, image placeholders)."""


class SequenceTooLongError(ValueError):
    """A sample or prompt does not fit in the model's context."""


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]
    num_images: int  # images whose placeholders survived truncation


def normalize_messages(messages: Sequence[dict[str, Any]], image_token: str = "<image>") -> list[dict[str, str]]:
    """Accept OpenAI-style `{"role","content"}` or LLaVA-style `{"from","value"}` turns; image
    content parts become `image_token` placeholders."""
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ConversationError(f"turn {i}: expected an object, got {type(msg).__name__}")
        role = msg.get("role", msg.get("from"))
        content = msg.get("content", msg.get("value"))
        if role not in ROLE_ALIASES:
            raise ConversationError(f"turn {i}: unknown role {role!r}")
        if isinstance(content, list):  # OpenAI content parts: keep text, images as placeholders
            content = _parts_to_text(content, i, image_token)
        if not isinstance(content, str):
            raise ConversationError(f"turn {i}: content must be text, got {type(content).__name__}")
        out.append({"role": ROLE_ALIASES[role], "content": content})
    return out


def _parts_to_text(parts: list, turn: int, image_token: str) -> str:
    pieces = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(part.get("text", ""))
        elif kind in ("image", "image_url"):
            pieces.append(image_token)
        else:
            raise ConversationError(f"turn {turn}: unsupported content part {part!r}")
    return "\n".join(pieces)


def check_turns(messages: list[dict[str, str]], image_token: str, for_training: bool) -> None:
    """Roles alternate user/assistant after an optional system turn; no empty turns."""
    if not messages:
        raise ConversationError("conversation is empty")
    start = 1 if messages[0]["role"] == "system" else 0
    for i, msg in enumerate(messages):
        if msg["role"] == "system" and i != 0:
            raise ConversationError(f"turn {i}: a system turn may only come first")
        if not msg["content"].strip() and msg["role"] != "system":
            raise ConversationError(f"turn {i}: empty {msg['role']} turn")
        if msg["role"] == "assistant" and image_token in msg["content"]:
            raise ConversationError(f"turn {i}: an assistant turn contains the image placeholder")
    for j, msg in enumerate(messages[start:]):
        expected = "user" if j % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise ConversationError(
                f"turn {start + j}: expected a {expected} turn, got {msg['role']} (turns must alternate)"
            )
    if for_training and messages[-1]["role"] != "assistant":
        raise ConversationError("a training conversation must end with an assistant turn")
    if not for_training and messages[-1]["role"] != "user":
        raise ConversationError("a prompt must end with a user turn")


class PromptBuilder:
    """Turns conversations into token ids and labels with a tokenizer's chat template."""

    def __init__(
        self,
        tokenizer,
        image_token: str,
        image_token_id: int,
        num_image_tokens: int,
        max_length: int,
        system_prompt: str | None = None,
        content_format: str = "string",
    ) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise TemplateMismatchError("the tokenizer has no chat template; set one before use")
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.content_format = content_format
        self._special = self._special_token_strings()

    def _special_token_strings(self) -> list[str]:
        tok = self.tokenizer
        names = set(tok.all_special_tokens)
        for added in getattr(tok, "added_tokens_decoder", {}).values():
            if getattr(added, "special", False):
                names.add(str(added))
        names.discard(self.image_token)
        return sorted(names, key=len, reverse=True)

    # -- rendering -------------------------------------------------------------------
    def _with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.system_prompt is not None and messages and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if self.content_format == "parts":
            messages = [{"role": m["role"], "content": self._to_parts(m["content"])} for m in messages]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _to_parts(self, content: str) -> list[dict[str, str]]:
        parts: list[dict[str, str]] = []
        for k, piece in enumerate(content.split(self.image_token)):
            if k > 0:
                parts.append({"type": "image"})
            if piece.strip():
                parts.append({"type": "text", "text": piece.strip()})
        return parts

    def _segments(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        segments: list[tuple[str, bool]] = []
        done = ""
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            through = self._render(messages[: i + 1], add_generation_prompt=False)
            if not before.startswith(done) or not through.startswith(before):
                raise TemplateMismatchError(
                    f"turn {i}: the chat template does not render this conversation "
                    "prefix-consistently, so assistant tokens cannot be located"
                )
            segments.append((before[len(done):], False))
            span = through[len(before):]
            answer = msg["content"].strip()
            start = span.find(answer)
            if start < 0 or span[:start].strip():
                raise TemplateMismatchError(
                    f"turn {i}: assistant text not found where the template puts the answer"
                )
            after = span[start + len(answer):]
            eot_end = self._end_of_turn(after)
            if eot_end is None:
                raise TemplateMismatchError(
                    f"turn {i}: no end-of-turn special token after the assistant answer; "
                    f"rendered tail {after[:40]!r}"
                )
            if start:
                segments.append((span[:start], False))
            segments.append((answer + after[:eot_end], True))
            segments.append((after[eot_end:], False))
            done = through
        whole = self._render(messages, add_generation_prompt=add_generation_prompt)
        if not whole.startswith(done):
            raise TemplateMismatchError("the chat template does not render the conversation prefix-consistently")
        segments.append((whole[len(done):], False))
        return [(text, sup) for text, sup in segments if text]

    def _end_of_turn(self, after: str) -> int | None:
        """End offset of the first special token after the answer (whitespace may precede it)."""
        best_pos, best_end = None, None
        for special in self._special:  # longest first, so ties keep the longest match
            pos = after.find(special)
            if pos >= 0 and not after[:pos].strip() and (best_pos is None or pos < best_pos):
                best_pos, best_end = pos, pos + len(special)
        return best_end

    # -- tokenizing ------------------------------------------------------------------
    def _tokenize(self, segments: list[tuple[str, bool]]) -> tuple[list[list[int]], list[bool]]:
        pieces, supervised = [], []
        for text, sup in segments:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            expanded: list[int] = []
            for tid in ids:
                if tid == self.image_token_id:
                    expanded.extend([self.image_token_id] * self.num_image_tokens)
                else:
                    expanded.append(tid)
            pieces.append(expanded)
            supervised.append(sup)
        return pieces, supervised

    def encode_conversation(self, messages: Sequence[dict[str, Any]]) -> EncodedConversation:
        """Token ids and labels for training: only assistant answers and their end-of-turn token
        are supervised. Whole trailing turns are dropped to fit `max_length`; a first answer
        that cannot fit raises SequenceTooLongError."""
        msgs = self._with_system(normalize_messages(messages, self.image_token))
        check_turns(msgs, self.image_token, for_training=True)
        pieces, supervised = self._tokenize(self._segments(msgs, add_generation_prompt=False))
        input_ids: list[int] = []
        labels: list[int] = []
        keep_until = 0  # length after the last supervised segment that fits
        for ids, sup in zip(pieces, supervised, strict=True):
            if sup and len(input_ids) + len(ids) <= self.max_length:
                keep_until = len(input_ids) + len(ids)
            input_ids.extend(ids)
            labels.extend(ids if sup else [IGNORE_INDEX] * len(ids))
        if keep_until == 0:
            raise SequenceTooLongError(
                f"the first answer ends past max_length={self.max_length} "
                f"(conversation is {len(input_ids)} tokens); it would be truncated away"
            )
        if not any(label != IGNORE_INDEX for label in labels):
            raise TemplateMismatchError("no assistant token is supervised in this conversation")
        # Cutting right after a supervised segment never splits an image block: image tokens
        # only occur in unsupervised (user) segments.
        input_ids, labels = input_ids[:keep_until], labels[:keep_until]
        num_images = sum(1 for t in input_ids if t == self.image_token_id) // self.num_image_tokens
        return EncodedConversation(input_ids, labels, num_images)

    def encode_prompt(self, messages: Sequence[dict[str, Any]], max_new_tokens: int = 0) -> list[int]:
        """Token ids of a prompt ending in the assistant generation prompt."""
        msgs = self._with_system(normalize_messages(messages, self.image_token))
        check_turns(msgs, self.image_token, for_training=False)
        pieces, _ = self._tokenize(self._segments(msgs, add_generation_prompt=True))
        ids = [t for piece in pieces for t in piece]
        if len(ids) + max_new_tokens > self.max_length:
            raise SequenceTooLongError(
                f"prompt is {len(ids)} tokens (images included); with max_new_tokens="
                f"{max_new_tokens} it exceeds the context of {self.max_length} tokens"
            )
        return ids

    def count_images(self, messages: Sequence[dict[str, Any]]) -> int:
        return sum(m["content"].count(self.image_token) for m in normalize_messages(messages, self.image_token))
