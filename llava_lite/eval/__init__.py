"""Evaluation: benchmark tasks (`llava-lite eval`), stage-end checks and the general-chat comparison."""
