"""The Gradio chat: upload images, ask about them, answers stream in."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from llava_lite import LlavaLite
from llava_lite.images import ImageLoadError
from llava_lite.prompting import ConversationError, SequenceTooLongError

log = logging.getLogger("llava_lite.serve")
USER_ERRORS = (ImageLoadError, ConversationError, SequenceTooLongError)


def _history_to_messages(history: list[dict], text: str, files: list[str], user_message):
    """Gradio messages-format history plus the new text and files -> (messages, image paths).

    Gradio keeps uploaded files as their own user turns; they are attached to the next text turn.
    """
    messages, images, pending = [], [], []

    def add_user_turn(turn_text: str) -> None:
        messages.append(user_message(turn_text, len(pending)))
        images.extend(pending)
        pending.clear()

    for turn in history:
        content = turn.get("content")
        if turn["role"] == "user":
            if isinstance(content, dict) and content.get("path"):  # a file turn
                pending.append(content["path"])
            elif isinstance(content, (list, tuple)) and content and isinstance(content[0], str):
                pending.append(content[0])
            else:
                add_user_turn(content if isinstance(content, str) else str(content))
        elif isinstance(content, str) and content:
            messages.append({"role": "assistant", "content": content})
    pending.extend(files)
    add_user_turn(text)
    return messages, images


def make_chat_fn(model: LlavaLite):
    def respond(message: dict, history: list[dict], temperature: float, top_p: float,
                max_new_tokens: int) -> Iterator[str]:
        text = (message.get("text") or "").strip()
        if not text:
            yield "Please type a question about the image."
            return
        try:
            messages, images = _history_to_messages(
                history, text, list(message.get("files") or []), model.user_message
            )
            reply = ""
            for chunk in model.chat(messages, images=images, stream=True, temperature=temperature,
                                    top_p=top_p, max_new_tokens=int(max_new_tokens)):
                reply += chunk
                yield reply
        except USER_ERRORS as err:
            yield f"⚠️ {err}"
        except Exception:  # noqa: BLE001 - a readable message, never a traceback in the chat
            log.exception("generation failed")
            yield "⚠️ Sorry, something went wrong while generating. The error was logged on the server."

    return respond


def build_app(model: LlavaLite):
    import gradio as gr

    description = f"Model: `{model.source}` · quantization: `{model.quantization}`"
    return gr.ChatInterface(
        make_chat_fn(model),
        multimodal=True,
        textbox=gr.MultimodalTextbox(file_types=["image"], file_count="multiple",
                                     placeholder="Upload an image and ask about it"),
        additional_inputs=[
            gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)"),
            gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p"),
            gr.Slider(1, 512, value=128, step=1, label="Max new tokens"),
        ],
        title="llava-lite",
        description=description,
        api_name="chat",
    )
