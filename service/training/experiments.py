"""`cnnserve experiments`: the experiment record, generated from model cards.

Every published version (its ``model_card.json``) and every finished training run in a
work directory that was not published (``config.json`` + ``history.json``, written by
:func:`service.training.train.train`) becomes one row: architecture, the hyper-parameters
that differ from the best run, data sources, accuracy, macro F1, mAP when the card has it,
latency and size. Written to the output folder as ``report.md``, ``experiments.json``,
``curves.png`` (validation curves overlaid) and ``per_class_f1.png`` (a heat map of the
published versions' per-class F1, when there are any).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from service.errors import DatasetError, ModelLoadError
from service.repository import load_card
from service.training.config import ADDED_LATER

log = logging.getLogger(__name__)

# Card keys that describe a run's outcome or machine, not its recipe.
_NOT_HYPER = {
    "history",
    "seconds",
    "epochs_run",
    "overfitting_warnings",
    "machine",
    "data_dir",
    "run_id",
}
# What names a compression (its measured figures are outcomes, not recipe).
_COMPRESSION_KEYS = {"method", "source_version", "target_sparsity", "teacher_version"}
# The recipe's keys that decide which images the test (and validation) split holds.
_DATA_KEYS = (
    "dataset",
    "extra_datasets",
    "class_map",
    "relabel",
    "val_fraction",
    "test_fraction",
    "seed",
)


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if key in _NOT_HYPER:
            continue
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _recipe_id(hyper: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(hyper, sort_keys=True, default=str).encode()).hexdigest()


def _data_recipe(training: dict[str, Any]) -> str:
    """Which data a run was split from: runs with equal recipes test on the same images
    (while the folders are unchanged; published cards say for sure)."""
    data = {k: training.get(k) for k in _DATA_KEYS}
    data["extra_datasets"] = list(data["extra_datasets"] or [])
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def _map(evaluation: dict[str, Any]) -> float | None:
    for key, value in evaluation.items():
        lowered = key.lower()
        if isinstance(value, int | float) and (
            lowered in {"map", "mean_average_precision"} or lowered.startswith("map")
        ):
            return float(value)
    return None


def _sources(training: dict[str, Any]) -> str:
    names = [training.get("dataset", "?"), *training.get("extra_datasets", [])]
    text = " + ".join(Path(n).name if "/" in n else n for n in names)
    if training.get("class_map"):
        text += " (class map)"
    if training.get("relabel"):
        text += " (relabelled)"
    return text


def _section(card: dict[str, Any], key: str) -> dict[str, Any]:
    """A card's section, {} when it is missing or not an object (a card edited by hand:
    a null section stopped the whole report with a traceback)."""
    value = card.get(key)
    return value if isinstance(value, dict) else {}


def published_runs(repository: Path) -> list[dict[str, Any]]:
    runs = []
    for card_path in sorted(repository.glob("*/*/assets.extra/model_card.json")):
        version_dir = card_path.parents[1]
        if not version_dir.name.isdigit():
            continue
        # One damaged card must not hide every other run.
        try:
            runs.append(_published_run(version_dir, load_card(version_dir)))
        except ModelLoadError as exc:
            log.warning("%s; left out of the report", exc.message)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # edited by hand
            log.warning(
                "%s: the model card is not as cnnserve writes it (%s: %s); left out of the report",
                card_path,
                type(exc).__name__,
                exc,
            )
    return runs


def _published_run(version_dir: Path, card: dict[str, Any]) -> dict[str, Any]:
    training, evaluation = _section(card, "training"), _section(card, "evaluation")
    # A compressed version is measured on the artifact that serves it (LiteRT), a trained
    # one on TensorFlow: the runtime goes with the figure (side by side in one column, an
    # int8 copy read 7x faster than its source, where on one runtime it was 2x slower).
    runtime = "TF" if evaluation.get("latency_tensorflow") else "LiteRT"
    timed = evaluation.get("latency_tensorflow") or evaluation.get("latency_litert") or {}
    latency = timed.get("batch_1", {}).get("p50_ms")
    hyper = _flatten(training)
    # How a compressed version differs from its source: an int8 or a pruned one had
    # the source's recipe to the letter and read as the same run.
    compression = _section(card, "compression")
    hyper.update(
        {
            f"compression.{k}": v
            for k, v in compression.items()
            if k in _COMPRESSION_KEYS and not isinstance(v, dict | list)
        }
    )
    test_sha = _section(card, "dataset").get("test_sha256")
    data = _data_recipe(training)
    architecture = _section(card, "architecture")
    return {
        "run": f"{version_dir.parent.name}/{version_dir.name}",
        "test_set": test_sha or f"recipe:{data}",
        "data_recipe": data,
        "published": True,
        "architecture": architecture.get("name", "?"),
        "parameters": architecture.get("parameters"),
        "sources": _sources(training),
        "accuracy": evaluation.get("accuracy"),
        "macro_f1": evaluation.get("macro_f1"),
        "map": _map(evaluation),
        "latency_ms": latency,
        "latency_runtime": runtime if latency is not None else None,
        "size_mb": round(_dir_mb(version_dir), 2),
        "metric_split": "test",
        "per_class_f1": {k: v["f1"] for k, v in evaluation.get("per_class", {}).items()},
        "history": _curves(training.get("history")),
        "hyper": hyper,
        "recipe": _recipe_id(hyper),
    }


def _read_object(path: Path) -> dict[str, Any] | None:
    """A run's JSON record, or None (with a warning) when it is unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("%s cannot be read (%s); its run is left out of the report", path, exc)
        return None
    if not isinstance(value, dict):
        log.warning("%s holds no JSON object; its run is left out of the report", path)
        return None
    return value


def _curves(history: Any) -> dict[str, list[float | None]]:
    """The per-epoch series of a recorded history; anything else in it is ignored."""

    def number(value: Any) -> bool:
        return value is None or (isinstance(value, int | float) and not isinstance(value, bool))

    if not isinstance(history, dict):
        return {}
    return {
        key: values
        for key, values in history.items()
        if isinstance(values, list) and all(number(v) for v in values)
    }


def work_runs(work_dir: Path, published: set[str]) -> list[dict[str, Any]]:
    """Finished fits whose recipe no published version shares (validation numbers only)."""
    runs = []
    for config_path in sorted(work_dir.glob("*/config.json")):
        history_path = config_path.parent / "history.json"
        if not history_path.is_file():
            continue  # interrupted or still running
        config, recorded = _read_object(config_path), _read_object(history_path)
        if config is None or recorded is None:
            continue  # one damaged run must not hide every other run
        hyper = _flatten(config)
        if _recipe_id(hyper) in published:
            continue
        history = _curves(recorded.get("history"))
        val = history.get("val_accuracy") or []
        data = _data_recipe(config)
        runs.append(
            {
                "run": f"work/{config_path.parent.name}",
                "test_set": f"recipe:{data}",
                "data_recipe": data,
                "published": False,
                "architecture": hyper.get("arch.name", "?"),
                "parameters": None,
                "sources": _sources(hyper),
                "accuracy": max((v for v in val if v is not None), default=None),
                "macro_f1": None,
                "map": None,
                "latency_ms": None,
                "latency_runtime": None,
                "size_mb": None,
                "metric_split": "validation",
                "per_class_f1": {},
                "history": history,
                "hyper": hyper,
                "recipe": _recipe_id(hyper),
            }
        )
    return runs


def differences(run: dict[str, Any], best: dict[str, Any]) -> str:
    """The settings a run sets otherwise than the best run. A setting a card written before
    it existed lacks had the value it had then (config.ADDED_LATER: class_weight=none
    beside the default model's card was no difference); one neither explains is unknown,
    left out."""
    ran, top = _with_later(run["hyper"]), _with_later(best["hyper"])
    keys = sorted(set(ran) & set(top))
    changed = [f"{k}={ran[k]}" for k in keys if ran[k] != top[k]]
    return ", ".join(changed) if changed else "—"


def _with_later(hyper: dict[str, Any]) -> dict[str, Any]:
    """A run's settings with those added since its card was written, at their values then."""
    return {**ADDED_LATER, **hyper}


def _latency(run: dict[str, Any]) -> str:
    """Batch-1 p50 and the runtime it was timed on: figures of two runtimes do not compare."""
    if run["latency_ms"] is None:
        return "—"
    return f"{run['latency_ms']:.2f} ({run['latency_runtime']})"


def _cell(value: Any, pattern: str = "{:.4f}") -> str:
    return "—" if value is None else pattern.format(value)


def plot_curves(runs: list[dict[str, Any]], path: Path) -> None:
    fig = Figure(figsize=(11, 4))
    acc_ax, loss_ax = fig.subplots(1, 2)
    for number, run in enumerate(runs):
        # Matplotlib's 10 colours repeat: each further ten runs get another line style.
        style = ("-", "--", ":", "-.")[number // 10 % 4]
        for key, ax in (("val_accuracy", acc_ax), ("val_loss", loss_ax)):
            values = run["history"].get(key)
            if values:
                ax.plot(range(1, len(values) + 1), values, style, label=run["run"])
    for ax, name in ((acc_ax, "validation accuracy"), (loss_ax, "validation loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:  # a run without curves (a card with no history) draws none
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_per_class_f1(runs: list[dict[str, Any]], path: Path) -> None:
    rows = [r for r in runs if r["per_class_f1"]]
    classes: list[str] = []
    for r in rows:
        classes += [c for c in r["per_class_f1"] if c not in classes]
    matrix = np.array(
        [[r["per_class_f1"].get(c, np.nan) for c in classes] for r in rows], dtype=np.float64
    ).reshape(len(rows), len(classes))
    fig = Figure(figsize=(max(6.0, 0.8 * len(classes) + 3), max(2.5, 0.5 * len(rows) + 2)))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [r["run"] for r in rows])
    for (i, j), value in np.ndenumerate(matrix):
        if not np.isnan(value):
            color = "black" if value > 0.6 else "white"  # readable on viridis
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, label="F1 (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _groups(runs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Runs scored on the same images, each group best first. Accuracy on one test set
    says nothing against accuracy on another (a 17-image folder model ranked above
    Fashion-MNIST models), so runs are only ranked within a group. An unpublished run
    joins the published runs split from the same data recipe."""
    test_set_of_recipe: dict[str, str] = {}
    for r in runs:
        if r["published"]:
            test_set_of_recipe.setdefault(r["data_recipe"], r["test_set"])
    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        key = (
            r["test_set"]
            if r["published"]
            else test_set_of_recipe.get(r["data_recipe"], r["test_set"])
        )
        grouped.setdefault(key, []).append(r)
    groups = [
        sorted(g, key=lambda r: (r["published"], r["accuracy"] or 0.0), reverse=True)
        for g in grouped.values()
    ]
    # The group with the most published versions first (the model being worked on).
    return sorted(groups, key=lambda g: (sum(r["published"] for r in g), len(g)), reverse=True)


def report(repository: Path | None, work_dir: Path | None, output: Path) -> dict[str, Any]:
    runs = published_runs(repository) if repository and repository.is_dir() else []
    if work_dir is not None and work_dir.is_dir():
        runs += work_runs(work_dir, {r["recipe"] for r in runs})
    if not runs:
        raise DatasetError(
            f"no published versions in {repository} and no finished runs in {work_dir}"
        )
    groups = _groups(runs)
    best_of = {r["run"]: g[0] for g in groups for r in g}
    best = groups[0][0]
    output.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, output / "curves.png")
    # Only published versions have per-class scores: with none, an empty heat map.
    per_class = any(r["per_class_f1"] for r in runs)
    heat_map = output / "per_class_f1.png"
    if per_class:
        plot_per_class_f1(runs, heat_map)
    else:
        heat_map.unlink(missing_ok=True)  # an earlier report's map is not this one's
    several = len(groups) > 1
    lines = [
        "# Experiments",
        "",
        f"{len(runs)} run{'' if len(runs) == 1 else 's'}"
        + (
            f" on {len(groups)} different test sets, each ranked on its own (accuracy on "
            "different images does not compare)"
            if several
            else ""
        )
        + ". Published versions are scored on their test split, unpublished work-directory "
        "runs by their best validation accuracy.",
    ]
    for number, group in enumerate(groups, 1):
        head = group[0]
        lines.append("")
        if several:
            title = f"{head['sources']} (`{head['test_set'][:19]}`)"
            lines += [f"## Test set {number}: {title}", ""]
        lines += [
            f"Best: **{head['run']}** (accuracy {_cell(head['accuracy'])}).",
            "",
            "| run | architecture | params | sources | accuracy | macro F1 | mAP | latency ms "
            "| size MB | differs from best |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in group:  # best first, as the line above says (_groups)
            lines.append(
                f"| {r['run']}{'' if r['published'] else ' (validation)'} | {r['architecture']} "
                f"| {_cell(r['parameters'], '{:,}')} | {r['sources']} | {_cell(r['accuracy'])} "
                f"| {_cell(r['macro_f1'])} | {_cell(r['map'])} "
                f"| {_latency(r)} | {_cell(r['size_mb'], '{:.1f}')} "
                f"| {differences(r, head)} |"
            )
    lines += [
        "",
        "![validation curves](curves.png)",
        "",
        *(["![per-class F1](per_class_f1.png)", ""] if per_class else []),
        *(
            f"Best recipe on test set {n}: "
            f"`{json.dumps(g[0]['hyper'], sort_keys=True, default=str)}`"
            if several
            else f"Best run's recipe: `{json.dumps(g[0]['hyper'], sort_keys=True, default=str)}`"
            for n, g in enumerate(groups, 1)
        ),
    ]
    (output / "report.md").write_text("\n".join(lines) + "\n")
    data = {
        "best": best["run"],
        "groups": [
            {"test_set": g[0]["test_set"], "best": g[0]["run"], "runs": [r["run"] for r in g]}
            for g in groups
        ],
        "runs": [
            {
                **r,
                "best_of_test_set": best_of[r["run"]]["run"],
                "differs_from_best": differences(r, best_of[r["run"]]),
            }
            for r in runs
        ],
    }
    (output / "experiments.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    return data
