"""Loss curves as PNG (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_loss(metrics_path: Path, png_path: Path, title: str = "") -> Path | None:
    """Training loss (and the learning rate, on a second axis) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", lw=1, alpha=0.5, label="loss")
    if len(rows) >= 10:
        k = max(2, len(rows) // 20)
        smooth = [sum(r["loss"] for r in rows[max(0, i - k + 1):i + 1]) / len(rows[max(0, i - k + 1):i + 1])
                  for i in range(len(rows))]
        ax.plot(steps, smooth, color="tab:blue", lw=2, label=f"loss (mean of {k})")
    if any("contrastive" in r for r in rows):
        ax.plot(steps, [r.get("contrastive", float("nan")) for r in rows], color="tab:green", lw=1,
                label="contrastive")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    lr_key = "lr" if any(r.get("lr") for r in rows) else "projector_lr"
    ax2 = ax.twinx()
    ax2.plot(steps, [r.get(lr_key) or 0 for r in rows], color="tab:orange", lw=1, ls="--", label=lr_key)
    ax2.set_ylabel(lr_key)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path
