"""The Gradio chat page: upload images, ask about them, answers stream in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from llava_lite.api import CAPTION_PROMPT
from llava_lite.image_views import ImageView
from llava_lite.serve.engine import ChatEngine, ChatRequest, GenerationStats, UserFacingError
from llava_lite.serve.examples import chat_examples
from llava_lite.serve.gradio_history import ERROR_MARK, EVIDENCE_MARK, history_to_request

# What the default model can and cannot see, said plainly on the page.
CAN_SEE = (" · The default model was trained on drawn shapes: it counts, locates and names their colours. For a "
           "real photo it gets only its vision tower's ImageNet guesses: it names what they are sure of and "
           "says when it can't tell.")
SHUTDOWN_NOTE = "The server is shutting down; this reply was cut short."
EMPTY_MESSAGE = "Please type a message (and upload an image to ask about it)."


def make_chat_fn(engine: ChatEngine):
    """The ChatInterface callback: (message, history, sliders) -> streamed reply text."""
    image_token = engine.lite.config.image_token

    def respond(message: dict | str, history: list[dict], temperature: float, top_p: float,
                max_new_tokens: float) -> Iterator[str]:
        if isinstance(message, str):
            message = {"text": message, "files": []}
        text = (message.get("text") or "").strip()
        files = [f["path"] if isinstance(f, dict) else str(f) for f in message.get("files") or []]
        if not text and not files:
            yield ERROR_MARK + EMPTY_MESSAGE
            return
        messages, images = history_to_request(history, text or CAPTION_PROMPT, files, image_token)
        request = ChatRequest(messages, images, temperature=temperature, top_p=top_p,
                              max_new_tokens=int(max_new_tokens))
        reply = ""
        stats = GenerationStats()
        try:
            for chunk in engine.stream(request, stats):
                reply += chunk
                yield reply
        except UserFacingError as err:
            yield (reply + "\n\n" if reply else "") + ERROR_MARK + str(err)
            return
        if stats.finish_reason == "cancelled":
            yield (reply + "\n\n" if reply else "") + ERROR_MARK + SHUTDOWN_NOTE
            return
        if not reply:
            yield "(the model returned an empty reply)"
        elif note := evidence_note(stats.image_views[len(stats.image_views) - len(files):]):
            yield reply + EVIDENCE_MARK + note

    return respond


def evidence_note(views: list[ImageView]) -> str:
    """For the photos among `views` (this turn's images) that the model saw only through the
    label bridge, what the tower's classifier said (shown under the reply, never sent back to
    the model)."""
    notes = [", ".join(f"{name} {p:.0%}" for name, p in v.evidence.classes[:3])
             for v in views if v.bridge_text is not None]
    if not notes:
        return ""
    return ("The image classifier's top guesses: " + " · ".join(notes) + ". This photo is unlike the drawn "
            "shapes the model was trained on, so the model sees only these guesses, not the photo itself.")


def build_app(engine: ChatEngine, cache_dir: Path):
    """The chat page as a Gradio Blocks app (queue settings are applied by the caller)."""
    import gradio as gr

    limits = engine.limits
    default_tokens = min(128, limits.max_new_tokens)
    # With additional inputs, Gradio wants each example as [message, *input values].
    examples = [[ex, 0.0, 1.0, default_tokens] for ex in chat_examples(cache_dir)]
    return gr.ChatInterface(
        make_chat_fn(engine),
        multimodal=True,
        textbox=gr.MultimodalTextbox(
            # No server-side type filter: a non-image upload gets our readable message in the
            # chat instead of a Gradio error toast.
            file_count="multiple", sources=["upload"],
            placeholder="Upload, drop or paste images, then ask about them",
        ),
        chatbot=gr.Chatbot(height=480, buttons=["copy"], placeholder="Ask about an image"),
        additional_inputs=[
            gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)"),
            gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p"),
            gr.Slider(1, limits.max_new_tokens, value=default_tokens, step=1,
                      label="Max new tokens"),
        ],
        additional_inputs_accordion=gr.Accordion("Generation settings", open=False),
        examples=examples or None,
        cache_examples=False,
        run_examples_on_click=True,
        title="llava-lite",
        description=f"Chat about images · {engine.describe()}" + CAN_SEE,
        api_name="chat",
        concurrency_limit=limits.concurrency,
        fill_height=True,
    )
