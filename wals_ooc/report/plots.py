"""The report's figures as PNG bytes (matplotlib, Agg backend: no display needed).

matplotlib is imported here only, when a report is drawn, so no other command pays for it.
"""

from __future__ import annotations

import io

COLORS = {"user": "#4C72B0", "item": "#DD8452", "loss": "#C44E52", "precision": "#4C72B0", "recall": "#55A868",
          "ndcg": "#C44E52", "map": "#8172B3", "catalogue": "#9C9C9C", "interactions": "#4C72B0",
          "recommendations": "#DD8452"}


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # an optional dependency: say how to get it
        from ..errors import SettingError

        raise SettingError("the report draws its plots with matplotlib, which is not installed: "
                           "pip install 'wals-ooc[report]' (or matplotlib)") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def training_png(training: dict) -> bytes:
    """Loss per iteration (left) and seconds per iteration split into the two half-sweeps (right)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    its = training["iteration"]
    losses = [(i, v) for i, v in zip(its, training["loss"]) if v is not None]
    if losses:
        left.plot([i for i, _ in losses], [v for _, v in losses], marker="o", color=COLORS["loss"])
        left.set_ylabel("loss (training objective)")
    else:
        left.text(0.5, 0.5, "trained with --no-loss:\nno loss recorded", ha="center", va="center",
                  transform=left.transAxes)
    left.set_xlabel("iteration")
    left.set_title("Loss")
    left.grid(alpha=0.3)
    right.bar(its, training["user_seconds"], color=COLORS["user"], label="user half-sweep")
    right.bar(its, training["item_seconds"], bottom=training["user_seconds"], color=COLORS["item"],
              label="item half-sweep")
    right.set_xlabel("iteration")
    right.set_ylabel("seconds")
    right.set_title("Seconds per iteration")
    totals = [u + i for u, i in zip(training["user_seconds"], training["item_seconds"])]
    right.set_ylim(0, 1.3 * max(totals, default=0) or 1)  # headroom: the legend never hides a bar
    right.legend(loc="upper right", fontsize=8, ncol=2)
    right.grid(alpha=0.3, axis="y")
    for ax in (left, right):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return _png(fig)


def metrics_png(metrics: dict) -> bytes:
    """precision, recall, ndcg and map against k, with k = 10 marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    ks = metrics["k"]
    for name in ("precision", "recall", "ndcg", "map"):
        ax.plot(ks, metrics[name], label=f"{name}@k", color=COLORS[name], linewidth=2)
    if len(ks) >= 10:
        ax.axvline(10, color="#999999", linestyle=":", linewidth=1)
    ax.set_xlabel("k (length of the recommendation list)")
    ax.set_ylabel("mean over test users")
    ax.set_xlim(1, max(ks))
    ax.set_ylim(bottom=0)
    ax.set_title(f"Ranking metrics at k on {metrics['users']:,} test users (AUC {metrics['auc']:.3f})")
    ax.legend(loc="best", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def popularity_png(popularity: dict) -> bytes:
    """Shares per popularity bin (left) and cumulative shares over items by popularity (right)."""
    import numpy as np

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    bins = popularity["bins"]
    x = np.arange(len(bins["label"]))
    width = 0.27
    left.bar(x - width, bins["item_share"], width, color=COLORS["catalogue"], label="catalogue items")
    left.bar(x, bins["interaction_share"], width, color=COLORS["interactions"], label="interactions")
    left.bar(x + width, bins["recommendation_share"], width, color=COLORS["recommendations"], label="recommendations")
    left.set_xticks(x, bins["label"], rotation=45, fontsize=8)
    left.set_xlabel("item popularity (users who interacted with the item)")
    left.set_ylabel("share")
    left.set_title("Where items, interactions and recommendations fall")
    left.legend(fontsize=8)
    left.grid(alpha=0.3, axis="y")
    cumulative = popularity["cumulative"]
    right.plot(cumulative["item_share"], cumulative["interaction_share"], color=COLORS["interactions"],
               label="interactions")
    right.plot(cumulative["item_share"], cumulative["recommendation_share"], color=COLORS["recommendations"],
               label="recommendations")
    right.plot([0, 1], [0, 1], color=COLORS["catalogue"], linestyle=":", label="uniform")
    right.axvline(popularity["head_item_share"], color="#999999", linestyle="--", linewidth=1)
    right.text(popularity["head_item_share"], 0.03, " head | long tail", fontsize=8, color="#555555")
    right.set_xlabel("share of items, most popular first")
    right.set_ylabel("cumulative share")
    right.set_title(f"Concentration (coverage {popularity['coverage']:.1%})")
    right.set_xlim(0, 1)
    right.set_ylim(0, 1.02)
    right.legend(fontsize=8, loc="lower right")
    right.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)
