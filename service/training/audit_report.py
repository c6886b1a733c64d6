"""The audit's pictures and its Markdown summary (matplotlib's Figure, never pyplot)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from service.training.audit import Dataset
    from service.training.label_issues import LabelIssues


def class_balance_png(balance: dict[str, Any], path: Path) -> None:
    classes = balance["classes"]
    fig = Figure(figsize=(max(6.0, 0.7 * len(classes) + 2), 4.5))
    ax = fig.subplots()
    bottom = np.zeros(len(classes))
    for split, counts in balance["per_split"].items():
        ax.bar(range(len(classes)), counts, bottom=bottom, label=split)
        bottom += np.array(counts)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_ylabel("images")
    ax.set_title(f"class balance (largest / smallest = {balance['imbalance_ratio']:.2f})")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def duplicates_png(data: Dataset, pairs: list[dict[str, Any]], path: Path, top: int) -> None:
    shown = pairs[:top]
    rows = max(1, -(-len(shown) // 3))
    fig = Figure(figsize=(12.0, 2.6 * rows))
    axes = np.atleast_1d(fig.subplots(rows, 6)).ravel()
    for ax in axes:
        ax.axis("off")
    for k, pair in enumerate(shown):
        for side, key in enumerate(("a", "b")):
            image = data.pixels[pair[f"{key}_index"]]
            ax = axes[2 * k + side]
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
            ax.set_title(
                f"{pair['kind']} {pair[f'split_{key}']}\n{Path(pair[key]).name[-22:]}", fontsize=7
            )
    if not shown:
        axes[0].text(0.5, 0.5, "no duplicates found", ha="center", va="center")
    fig.suptitle("duplicate pairs (exact, then cross-split, most alike first)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def gallery_png(data: Dataset, issues: LabelIssues, path: Path, top: int) -> None:
    shown = issues.indices[:top]
    cols = 6
    rows = max(1, -(-len(shown) // cols))
    fig = Figure(figsize=(2.0 * cols, 2.6 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, i, suggested, score in zip(axes, shown, issues.suggested, issues.scores, strict=False):
        image = data.pixels[i]
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.set_title(
            f"given: {data.classes[data.labels[i]]}\nsuggested: {data.classes[suggested]}"
            f"\np(given) {score:.1e}",
            fontsize=8,
        )
    if not len(shown):
        axes[0].text(0.5, 0.5, "no likely label errors found", ha="center", va="center")
    fig.suptitle("likely label errors (given label's out-of-fold probability)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_summary(report: dict[str, Any], path: Path) -> None:
    bal, dup, lab = report["balance"], report["duplicates"], report["label_issues"]
    verdict = "meets" if lab["meets_target"] else "is below"
    lines = [
        "# Data audit",
        "",
        f"{report['images']} images, {len(bal['classes'])} classes, audited "
        f"{report['created_at']}. Numbers in `audit.json`."
        + (
            f" A sample (`--limit {report['config']['limit']}`) of every source and split: "
            "duplicates and label issues among the rest are not looked for."
            if report["config"].get("limit") == report["images"]
            else ""
        ),
        "",
        "## Class balance",
        "",
        f"Imbalance ratio (largest / smallest class): **{bal['imbalance_ratio']:.2f}** "
        f"({bal['largest_class']} / {bal['smallest_class']}).",
        "",
        "| class | " + " | ".join(bal["per_split"]) + " | total |",
        "|---|" + "---|" * (len(bal["per_split"]) + 1),
    ]
    for k, name in enumerate(bal["classes"]):
        cells = [str(counts[k]) for counts in bal["per_split"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {bal['total'][k]} |")
    lines += [
        "",
        "![class balance](class_balance.png)",
        "",
        "## Duplicates",
        "",
        f"{dup['exact_pairs']} exact and {dup['near_pairs']} near-duplicate pairs; "
        f"**{dup['cross_split_pairs']} cross splits** (full list: `duplicates.csv`; a "
        "cross-split pair is leakage: drop one copy or move both into one split).",
        "",
        "![duplicate pairs](duplicates.png)",
        "",
    ]
    if dup["first"]:
        lines += ["| kind | a | b | splits | labels |", "|---|---|---|---|---|"]
        for p in dup["first"]:
            lines.append(
                f"| {p['kind']} | `{p['a']}` | `{p['b']}` | {p['split_a']} / {p['split_b']} "
                f"| {p['label_a']} / {p['label_b']} |"
            )
        lines.append("")
    lines += [
        "## Likely label errors",
        "",
        f"Method: {lab['method']}, on out-of-fold probabilities of a small CNN "
        f"(its out-of-fold accuracy: {lab['out_of_fold_model_accuracy']:.2%}).",
        "",
        f"Estimated label accuracy **{lab['estimated_label_accuracy']:.2%}**, which {verdict} "
        f"the {lab['target_label_accuracy']:.0%} target; {lab['flagged']} images flagged "
        f"({lab['flagged_fraction']:.2%}), listed in `label_issues.csv` most suspicious first.",
        "",
        "![top suspects](label_issues.png)",
        "",
        "To correct labels: fill `corrected_label` in a copy of `label_issues.csv` for the "
        "rows a reviewer confirmed, run `cnnserve data audit ... --fix reviewed.csv --output "
        "DIR`, then train with `--relabel DIR/relabel.json` (source files are never changed).",
        "",
    ]
    if lab["top"]:
        lines += [
            "| rank | image | split | given | suggested | score |",
            "|---|---|---|---|---|---|",
        ]
        for r in lab["top"]:
            lines.append(
                f"| {r['rank']} | `{r['id']}` | {r['split']} | {r['given_label']} "
                f"| {r['suggested_label']} | {r['score']:.4f} |"
            )
    path.write_text("\n".join(lines) + "\n")
