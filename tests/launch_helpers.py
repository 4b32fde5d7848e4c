"""What the training end-to-end tests share: the CLI as a subprocess, its environment, and a
data-parallel launch of it on CPU processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from server_helpers import free_port

CLI = [sys.executable, "-m", "llava_lite.cli"]


def train_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def ddp_launch(num_processes: int = 2) -> list[str]:
    """`accelerate launch` of the CLI on `num_processes` data-parallel processes."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "llava_lite.cli"]


def train_in_one_and_two_processes(args: list[str], root: Path) -> tuple[Path, Path]:
    """`llava-lite ARGS` in one process into ROOT/one, then on two DDP processes into ROOT/two;
    both must succeed."""
    for out, launch in ((root / "one", CLI), (root / "two", ddp_launch(2))):
        proc = subprocess.run([*launch, *args, "--output", str(out)], capture_output=True, text=True, timeout=600,
                              env=train_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "one", root / "two"
