"""`llava-lite bench`'s report: the markdown table and the plot of one run's results."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def markdown(report: dict) -> str:
    bw = report["bandwidth_gbs"]
    refs = sorted({r.get("reference", "") for r in report["results"] if r.get("reference")})
    head = (f"Memory read bandwidth: {bw:.1f} GB/s · torch threads: {report['threads']} · "
            f"{report['new_tokens']} new tokens · reference: {'; '.join(refs)}\n\n")
    batch_keys = sorted({k for r in report["results"] for k in r.get("batch_tok_s", {})}, key=int)
    cols = ["variant", "backend", "LLM weights MB", "encode ms", "prefill ms", "cold first token ms", "first token ms",
            "2nd-turn first token ms", "decode tok/s", "ask() tok/s", "reference tok/s", "ask()/ref", "bound tok/s",
            "of bound", *[f"batch {k} tok/s" for k in batch_keys], "peak MB"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["results"]:
        if r.get("error"):
            rows.append(f"| {r['variant']} | failed: {r['error']} |" + " |" * (len(cols) - 2))
            continue
        bound = bw * 1e9 / r["llm_weight_bytes"]
        cells = [r["variant"], r["backend"], f"{r['llm_weight_bytes'] / 1e6:.0f}", f"{r['image_encode_ms']:.1f}",
                 f"{r['prefill_ms']:.0f}", f"{r.get('cold_first_token_ms', 0):.0f}", f"{r['first_token_ms']:.0f}",
                 f"{r['second_turn_first_token_ms']:.0f}",
                 f"{r['decode_tok_s']:.1f}", f"{r['ask_decode_tok_s']:.1f}", f"{r['reference_decode_tok_s']:.1f}",
                 f"{r['ask_decode_tok_s'] / r['reference_decode_tok_s']:.2f}", f"{bound:.1f}",
                 f"{r['decode_tok_s'] / bound:.0%}",
                 *[f"{r['batch_tok_s'][k]:.1f}" if k in r["batch_tok_s"] else "—" for k in batch_keys],
                 f"{r['peak_memory_bytes'] / 1e6:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if not r.get("error")]
    if not ok:
        return
    names = [r["variant"] for r in ok]
    x = np.arange(len(ok))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.bar(x - 0.2, [r["decode_tok_s"] for r in ok], 0.4, label="llava-lite")
    ax.bar(x + 0.2, [r["reference_decode_tok_s"] for r in ok], 0.4, label="transformers generate")
    ax.scatter(x, [report["bandwidth_gbs"] * 1e9 / r["llm_weight_bytes"] for r in ok], color="k", marker="_",
               s=400, label="bandwidth bound", zorder=3)
    ax.set_xticks(x, names)
    ax.set_ylabel("decode tokens/s")
    ax.legend()
    ax = axes[1]
    ax.bar(x - 0.27, [r.get("cold_first_token_ms", 0) for r in ok], 0.27, label="first chat (nothing cached)")
    ax.bar(x, [r["first_token_ms"] for r in ok], 0.27, label="new chat (system prompt cached)")
    ax.bar(x + 0.27, [r["second_turn_first_token_ms"] for r in ok], 0.27, label="second turn (cached image)")
    ax.set_xticks(x, names)
    ax.set_ylabel("time to first token (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
