"""Text-only replay: the base LLM's own answers to general prompts, mixed into visual training.

Short-answer VQA teaches a LoRA adapter to answer in one word, and it does so everywhere:
after the adapter stage alone the demo model answered "Paris" and "15" to general questions.
Training on the base model's own greedy answers to general prompts (self-distillation, in
place of the ShareGPT text that LLaVA mixes in, which is not available offline) keeps its
chat style and knowledge while the adapter learns to see.

    python -m llava_lite.data.general_replay            # regenerate data/general_chat/replay.json

The prompts (`data/general_chat/replay_prompts.json`) share no question with the 20
held-out general-chat questions that `llava_lite.eval.general_chat` scores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from llava_lite.general_chat import FOLDER

PROMPTS = FOLDER / "replay_prompts.json"
REPLAY = FOLDER / "replay.json"


def load_replay(path: Path = REPLAY) -> list[dict[str, Any]]:
    """The committed replay rows (LLaVA format, text only)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: replay set missing; build it with `python -m llava_lite.data.general_replay`")
    return json.loads(path.read_text())


def whole_sentences(text: str) -> str:
    """Drop a sentence cut off by the token limit, so the replay never teaches stopping mid-
    sentence; text without any complete sentence is kept as it is."""
    text = text.strip()
    if text.endswith((".", "!", "?")):
        return text
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
    return text[:cut + 1] if cut > 0 else text


def build_replay(model_id: str = "smollm2-135m-instruct", max_new_tokens: int = 96) -> list[dict[str, Any]]:
    """Greedy answers of the base LLM (no adapter, no image) to every replay prompt."""
    import torch
    from tqdm.auto import tqdm

    from llava_lite import LlavaLite, LlavaLiteConfig
    from llava_lite.config import LLMConfig

    torch.manual_seed(0)
    base = LlavaLite.from_config(LlavaLiteConfig(llm=LLMConfig(model_id=model_id)), source="base")
    rows = []
    for k, prompt in enumerate(tqdm(json.loads(PROMPTS.read_text()), desc="replay", unit="prompt")):
        answer = whole_sentences(base.chat([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens))
        if answer:
            rows.append({"id": f"general-replay-{k}", "conversations": [
                {"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]})
    return rows


def main(argv: list[str] | None = None) -> int:
    from llava_lite.llava_data import write_rows

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="base LLM (packaged name, Hub id or folder)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--out", type=Path, default=REPLAY)
    args = p.parse_args(argv)
    rows = build_replay(args.model, args.max_new_tokens)
    write_rows(rows, args.out)
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
