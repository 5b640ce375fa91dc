"""Plots of a pruned architecture (for reports and model cards).

Example:
    >>> png = architecture_png(report["layers"], title="llama2-7b-dms20")   # doctest: +SKIP
"""

from __future__ import annotations

import io


def architecture_png(layers: list[dict], title: str = "") -> bytes:
    """Bar charts of kept KV heads and MLP channels per layer (dropped layers marked), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = [row["layer"] for row in layers]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.28 * len(layers) + 3), 5), sharex=True)
    for axis, kept_key, total_key, label in (
        (axes[0], "kv_heads", "of_kv_heads", "KV heads (attention units)"),
        (axes[1], "channels", "of_channels", "MLP channels"),
    ):
        totals = [row[total_key] for row in layers]
        kept = [row[kept_key] if row["kept"] else 0 for row in layers]
        axis.bar(index, totals, color="#dddddd", label="original")
        axis.bar(index, kept, color="#3b75af", label="kept")
        for row in layers:
            if not row["kept"]:
                axis.text(
                    row["layer"],
                    row[total_key] * 0.5,
                    "dropped",
                    rotation=90,
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="#aa3333",
                )
        axis.set_ylabel(label)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].set_xlabel("decoder layer")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
