"""`cnnserve data audit` and `cnnserve experiments`: the data and experiment-record commands
(kept beside cli.py so that module stays about serving and training)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from service.cli_types import DefaultsHelp, at_least, folder_or_new
from service.config import Settings


def add_data(sub: argparse._SubParsersAction[argparse.ArgumentParser], settings: Settings) -> None:
    from service.training.audit import AuditConfig

    cfg = AuditConfig()
    data = sub.add_parser("data", help="inspect training data (see `cnnserve data audit -h`)")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = actions.add_parser(
        "audit",
        help="class balance, duplicates and likely label errors of one or more datasets",
        description="Audit the merged sources as `cnnserve train` would read them: class "
        "balance, exact and near duplicates within and across splits, and likely label errors "
        "(confident learning on out-of-fold predictions of a small CNN). Writes summary.md, "
        "audit.json, CSVs and PNGs to --output; source files are never modified. With --fix, "
        "turns a reviewed label_issues.csv into OUTPUT/relabel.json for `train --relabel`.",
        formatter_class=DefaultsHelp,
    )
    p.add_argument("dataset", help="'fashion_mnist' or a folder of class folders")
    p.add_argument(
        "--dataset", dest="more", action="append", default=[], help="another source to merge"
    )
    p.add_argument("--data-dir", type=Path, default=settings.fashion_mnist_dir)
    p.add_argument("--class-map", type=Path, default=None, help="'source_class -> class' rules")
    p.add_argument("--output", type=folder_or_new, required=True, help="folder for the report")
    p.add_argument("--fix", type=Path, default=None, help="reviewed label_issues.csv to apply")
    p.add_argument(
        "--folds", type=at_least(2), default=cfg.folds, help="k of the k-fold predictions"
    )
    p.add_argument("--epochs", type=at_least(1), default=cfg.epochs, help="epochs per fold")
    p.add_argument(
        "--hash-distance", type=int, default=cfg.hash_distance, help="near duplicate: pHash bits"
    )
    p.add_argument(
        "--limit",
        type=at_least(0),
        default=cfg.limit,
        help="N images drawn from every source and split, for a quick look (0 = all)",
    )
    p.add_argument("--seed", type=int, default=cfg.seed)
    p.set_defaults(handler=_audit)


def _progress() -> Callable[[str], None]:
    started = time.monotonic()

    def say(message: str) -> None:
        sys.stderr.write(f"[audit {time.monotonic() - started:6.0f}s] {message}\n")
        sys.stderr.flush()

    return say


def _audit(args: argparse.Namespace, settings: Settings) -> int:
    from service.training.audit import AuditConfig, load, run_audit, write_fix

    cfg = AuditConfig(
        folds=args.folds,
        epochs=args.epochs,
        hash_distance=args.hash_distance,
        limit=args.limit,
        seed=args.seed,
    )
    data = load(
        [args.dataset, *args.more], data_dir=args.data_dir, class_map=args.class_map, cfg=cfg
    )
    if args.fix is not None:
        path = write_fix(data, args.fix, args.output)
        sys.stdout.write(f"{path}\n")
        sys.stderr.write(f"train with: cnnserve train ... --relabel {path}\n")
        return 0
    say = _progress()
    report = run_audit(data, args.output, cfg, say)
    labels = report["label_issues"]
    sys.stdout.write(
        json.dumps(
            {
                "images": report["images"],
                "imbalance_ratio": report["balance"]["imbalance_ratio"],
                "duplicates": {k: v for k, v in report["duplicates"].items() if k != "first"},
                "label_issues": labels["flagged"],
                "estimated_label_accuracy": labels["estimated_label_accuracy"],
                "summary": str(args.output / "summary.md"),
            },
            indent=2,
        )
        + "\n"
    )
    return 0


def add_experiments(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], settings: Settings
) -> None:
    p = sub.add_parser(
        "experiments",
        help="compare every published version and finished run (report from model cards)",
        description="One table of every published version in the repository and every "
        "finished, unpublished run in the work directory: architecture, hyper-parameters "
        "that differ from the best run, data sources, accuracy, macro F1, mAP, latency, size; "
        "overlaid validation curves and a per-class F1 heat map.",
    )
    p.add_argument("--model-repository", type=Path, default=settings.model_repository)
    p.add_argument("--work-dir", type=Path, default=Path(".train"))
    p.add_argument(
        "--output", type=folder_or_new, required=True, help="folder for report.md and PNGs"
    )
    p.set_defaults(handler=_experiments)


def _experiments(args: argparse.Namespace, settings: Settings) -> int:
    from service.training.experiments import report

    data = report(args.model_repository, args.work_dir, args.output)
    groups = data["groups"]
    best = ", ".join(g["best"] for g in groups)
    sets = f" on {len(groups)} test sets, the best of each" if len(groups) > 1 else ", best"
    sys.stdout.write(f"{len(data['runs'])} runs{sets}: {best}; {args.output}/report.md\n")
    return 0
