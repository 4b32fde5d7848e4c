"""What the training end-to-end tests share: the CLI as a subprocess, its environment, and a
data-parallel launch of it on CPU processes (gloo)."""

from __future__ import annotations

import os
import sys

from server_helpers import free_port

CLI = [sys.executable, "-m", "llava_lite.cli"]


def train_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def ddp_launch(num_processes: int = 2) -> list[str]:
    """`accelerate launch` of the CLI on `num_processes` data-parallel processes."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "llava_lite.cli"]
