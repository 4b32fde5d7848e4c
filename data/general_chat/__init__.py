"""The general-chat question sets, installed as `llava_lite.general_chat` (see pyproject.toml).

- `questions.json`: held-out text-only questions with expected keywords
  (`python -m llava_lite.eval.general_chat`);
- `replay_prompts.json` and `replay.json`: general prompts and the base LLM's own answers,
  mixed into visual training (`python -m llava_lite.data.general_replay`).
"""

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
