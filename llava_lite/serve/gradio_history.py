"""Gradio's chat history (messages format) -> the model's messages and images."""

from __future__ import annotations

from typing import Any

ERROR_MARK = "⚠️ "  # replies starting with this are error notices, not model output
EVIDENCE_MARK = "\n\n🔎 "  # the page's note of what the tower saw; the model never wrote it


def _parts(content: Any) -> tuple[list[str], list[str]]:
    """(texts, file paths) in one history entry's content, whatever shape Gradio used."""
    texts: list[str] = []
    files: list[str] = []
    items = content if isinstance(content, list) else [content]
    if isinstance(content, tuple):  # the legacy (path, alt_text) file tuple
        items = [{"path": content[0]}] if content and isinstance(content[0], str) else []
    for item in items:
        if item is None:
            continue
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict):
            if item.get("type") == "text":
                texts.append(str(item.get("text", "")))
            elif item.get("type") == "file" and isinstance(item.get("file"), dict):
                files.append(item["file"]["path"])
            elif item.get("path"):
                files.append(item["path"])
        elif isinstance(item, (list, tuple)) and item and isinstance(item[0], str):
            files.append(item[0])
    return texts, files


def history_to_request(history: list[dict], text: str, files: list[str], image_token: str):
    """The conversation so far plus a new user message -> (messages, image paths).

    Gradio stores an uploaded file as its own user entry; files are attached to the next
    text of the same user turn. A user turn answered by an error notice is dropped with
    its files, so one bad upload does not break every later turn.
    """
    turns: list[tuple[str, list[str], str | None]] = []  # (user text, files, reply)
    texts: list[str] = []
    pending: list[str] = []
    for entry in history:
        t, f = _parts(entry.get("content"))
        if entry.get("role") == "user":
            texts.extend(x for x in t if x.strip())
            pending.extend(f)
        else:
            reply = "\n".join(t).split(EVIDENCE_MARK)[0]
            if texts or pending:
                turns.append(("\n".join(texts), list(pending), reply))
                texts, pending = [], []
            elif turns and turns[-1][2] is not None:  # a continuation of the last reply
                u, fs, r = turns[-1]
                turns[-1] = (u, fs, r + reply)
    # Anything left unanswered (a failed upload, an interrupted turn) joins the new message.
    texts.append(text)
    pending.extend(files)
    turns.append(("\n".join(x for x in texts if x.strip()), list(pending), None))

    messages: list[dict] = []
    images: list[str] = []
    for user_text, turn_files, reply in turns:
        if reply is not None and (reply.startswith(ERROR_MARK.strip()) or not reply.strip()):
            continue
        messages.append({"role": "user", "content": f"{image_token}\n" * len(turn_files) + user_text})
        images.extend(turn_files)
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
    return messages, images
