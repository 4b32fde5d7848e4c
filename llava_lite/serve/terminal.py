"""`llava-lite chat`: a streamed, multi-turn chat about images in the terminal."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from llava_lite import LlavaLite
from llava_lite.images import ImageLoadError, load_image
from llava_lite.serve.engine import ChatEngine, ChatRequest, UserFacingError
from llava_lite.serve.limits import ServeLimits

HELP = """Commands:
  /image PATH   talk about another image from the next question on (earlier turns stay)
  /reset        clear the conversation (the current image is kept for the next question)
  /help         this text
  /quit         leave (Ctrl-D works too; Ctrl-C stops a reply)"""


class TerminalChat:
    """A read-eval-print loop over `ChatEngine`; input and output streams are injectable."""

    def __init__(self, lite: LlavaLite, image: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
        self.engine = ChatEngine(lite, ServeLimits(max_new_tokens=max(1, max_new_tokens)))
        self.token = lite.config.image_token
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.stdin = stdin or sys.stdin
        self.out = stdout or sys.stdout
        self.messages: list[dict] = []
        self.images: list = []
        self.pending_image = None  # attached to the next question
        if image is not None:
            self.set_image(image)

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def set_image(self, path: str) -> bool:
        try:
            self.pending_image = load_image(Path(path).expanduser())
        except ImageLoadError as err:
            self.say(f"! {err}")
            return False
        self.say(f"(image: {path})")
        return True

    def reset(self) -> None:
        keep = self.last_image
        self.messages, self.images = [], []
        self.pending_image = keep
        self.say("(conversation cleared)")

    @property
    def last_image(self):
        return self.images[-1] if self.images else self.pending_image

    def ask(self, text: str) -> None:
        attach = self.pending_image is not None
        user = {"role": "user", "content": (f"{self.token}\n" if attach else "") + text}
        images = self.images + ([self.pending_image] if attach else [])
        request = ChatRequest(self.messages + [user], images, temperature=self.temperature,
                              max_new_tokens=self.max_new_tokens)
        reply = ""
        try:
            for chunk in self.engine.stream(request):
                reply += chunk
                self.out.write(chunk)
                self.out.flush()
        except UserFacingError as err:
            self.say(f"! {err}")
            return
        except KeyboardInterrupt:
            self.say(" [stopped]")
        self.say()
        self.messages += [user, {"role": "assistant", "content": reply or "(no reply)"}]
        self.images = images
        if attach:
            self.pending_image = None

    def run(self) -> int:
        self.say(f"llava-lite chat · {self.engine.describe()} · /help for commands")
        if self.pending_image is None:
            self.say("(no image yet: /image PATH to add one, or just chat)")
        while True:
            try:
                self.out.write("> ")
                self.out.flush()
                line = self.stdin.readline()
            except KeyboardInterrupt:
                self.say()
                continue
            if not line:  # end of input
                self.say()
                return 0
            line = line.strip()
            if line in ("/quit", "/exit"):
                return 0
            if line:
                self.handle(line)

    def handle(self, line: str) -> None:
        """One non-empty input line: a command or a message."""
        if line == "/help":
            self.say(HELP)
        elif line == "/reset":
            self.reset()
        elif line.startswith("/image"):
            path = line[len("/image"):].strip()
            if path:
                self.set_image(path)
            else:
                self.say("! usage: /image PATH")
        elif line.startswith("/"):
            self.say(f"! unknown command {line.split()[0]}; /help lists them")
        else:
            self.ask(line)
