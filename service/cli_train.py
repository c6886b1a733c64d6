"""`cnnserve train`, `evaluate` and `compress`: the offline commands (parsers and
handlers). Kept apart from :mod:`service.cli` so that each module stays one job; ``cli``
adds them. TensorFlow is imported inside the handlers, so `--help` stays fast."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import get_args

from service.cli_types import (
    NON_NEGATIVE,
    POSITIVE,
    RATE,
    SHARE,
    DefaultsHelp,
    at_least,
    folder_or_new,
    fraction,
    model_name,
    number_in,
)
from service.config import Settings
from service.errors import CnnserveError


def add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser], settings: Settings) -> None:
    # Defaults and choices come from the training config itself (a light module, so
    # --help stays fast): one declaration, shown here with ArgumentDefaultsHelpFormatter.
    from service.training.config import (
        ARCHITECTURE_NAMES,
        SEED_CNN_DROPOUT,
        SEED_CNN_L2,
        ArchConfig,
        AugmentConfig,
        ClassWeight,
        Optimizer,
        Schedule,
        TrainConfig,
    )

    train, arch, aug = TrainConfig(), ArchConfig(), AugmentConfig()
    p = sub.add_parser(
        "train",
        help="train a model and publish it as the next version in the repository",
        description="Train on Fashion-MNIST or a folder of class folders, evaluate on the "
        "held-out test split, and publish a versioned SavedModel atomically.",
        formatter_class=DefaultsHelp,
    )
    p.add_argument(
        "--dataset",
        action="append",
        default=None,
        # %(default).0s prints nothing: it only stops the formatter adding "(default: None)".
        help=f"'fashion_mnist' or a folder of class folders; repeat to merge sources "
        f"(default: {train.dataset})%(default).0s",
    )
    p.add_argument(
        "--class-map", type=Path, default=None, help="'source_class -> class' rules, one a line"
    )
    p.add_argument(
        "--relabel", type=Path, default=None, help="label corrections from `data audit --fix`"
    )
    p.add_argument(
        "--data-dir", type=Path, default=settings.fashion_mnist_dir, help="Fashion-MNIST IDX folder"
    )
    p.add_argument(
        "--repository",
        "--model-repository",  # the spelling of every other command
        dest="repository",
        type=folder_or_new,
        default=str(settings.model_repository),  # a string: checked by its type too
        help="model repository to publish into",
    )
    p.add_argument(
        "--model-name",
        type=model_name,
        default=None,
        help="model folder in the repository (default: fashion_mnist when Fashion-MNIST is "
        "among the datasets; required otherwise, so that other classes never become the next "
        "version of the served Fashion-MNIST model)",
    )
    p.add_argument(
        "--work-dir", type=Path, default=Path(".train"), help="checkpoints (resume on rerun)"
    )
    p.add_argument("--arch", choices=ARCHITECTURE_NAMES, default=arch.name, help="architecture")
    p.add_argument(
        "--width", type=POSITIVE, default=arch.width_multiplier, help="channel width multiplier"
    )
    p.add_argument("--depth", type=at_least(1), default=arch.depth, help="blocks per stage")
    p.add_argument("--se", action="store_true", help="squeeze-and-excitation blocks")
    p.add_argument(
        "--dropout",
        type=RATE,
        default=None,
        help=f"dropout rate; {arch.dropout} ({SEED_CNN_DROPOUT} for seed_cnn) when not given",
    )
    p.add_argument(
        "--l2",
        type=NON_NEGATIVE,
        default=None,
        help=f"L2 on dense layers; {arch.weight_decay} ({SEED_CNN_L2} for seed_cnn) when not given",
    )
    p.add_argument(
        "--resize-method",
        default=train.preprocess.resize_method,
        choices=["nearest", "bilinear", "bicubic", "lanczos", "box"],
        help="how images are resized to the model's input (the gateway does the same)",
    )
    p.add_argument("--epochs", type=at_least(1), default=train.epochs, help="maximum epochs")
    p.add_argument(
        "--batch-size", type=at_least(1), default=train.batch_size, help="images per step"
    )
    p.add_argument(
        "--optimizer", choices=get_args(Optimizer), default=train.optimizer, help="optimizer"
    )
    p.add_argument("--lr", type=POSITIVE, default=train.learning_rate, help="learning rate")
    p.add_argument("--momentum", type=RATE, default=train.momentum, help="SGD momentum")
    p.add_argument(
        "--weight-decay",
        type=NON_NEGATIVE,
        default=None,
        help=f"decoupled weight decay of adamw and radam ({train.weight_decay} when not "
        "given); sgd and adam take none (use --l2)",
    )
    p.add_argument(
        "--schedule",
        choices=get_args(Schedule),
        default=train.schedule,
        help="learning-rate schedule",
    )
    p.add_argument(
        "--patience",
        type=at_least(0),
        default=train.early_stopping_patience,
        help="early-stopping patience (epochs)",
    )
    p.add_argument("--no-augment", action="store_true", help="switch all augmentation off")
    p.add_argument(
        "--rotation",
        type=number_in(0, 180),
        default=aug.rotation_degrees,
        help="max rotation in degrees (0 = off)",
    )
    p.add_argument(
        "--shift", type=RATE, default=aug.width_shift, help="max width/height shift fraction"
    )
    p.add_argument("--zoom", type=RATE, default=aug.zoom, help="max zoom fraction")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips")
    p.add_argument("--balance", action="store_true", help="oversample minority classes")
    p.add_argument(
        "--class-weight",
        choices=get_args(ClassWeight),
        default=train.class_weight,
        help="'balanced' weighs each class's loss by n / (classes * class count)",
    )
    p.add_argument("--val-fraction", type=RATE, default=train.val_fraction, help="validation share")
    p.add_argument(
        "--test-fraction",
        type=RATE,
        default=train.test_fraction,
        help="test share (folder datasets only)",
    )
    p.add_argument(
        "--limit",
        type=at_least(0),
        default=train.limit,
        help="use N training images, drawn at random with --seed (0 = all)",
    )
    p.add_argument("--seed", type=int, default=train.seed, help="random seed")
    p.add_argument(
        "--no-demo-samples",
        action="store_true",
        help="publish no test images with the version (the demo page's samples for a model "
        "not trained on Fashion-MNIST: one per class, at most 6)",
    )
    p.add_argument(
        "--latency-runs", type=at_least(1), default=50, help="timed batches for the latency report"
    )
    p.set_defaults(handler=_train)


def _train(args: argparse.Namespace, settings: Settings) -> int:
    if args.model_name is None:  # before TensorFlow is imported: a mistake costs nothing
        if args.dataset and "fashion_mnist" not in args.dataset:
            print(
                "cnnserve train: name the model these classes are for with --model-name "
                "(the default, fashion_mnist, is the served Fashion-MNIST model)",
                file=sys.stderr,
            )
            return 2
        args.model_name = "fashion_mnist"
    if problem := unpublishable(args.repository / args.model_name):
        print(f"cnnserve train: {problem}; choose another --repository", file=sys.stderr)
        return 2
    if args.balance and args.class_weight == "balanced":
        print(
            "cnnserve train: --balance (oversampling) and --class-weight balanced each even "
            "out the classes; together the minority counted many times over: choose one",
            file=sys.stderr,
        )
        return 2
    # The card recorded it; sgd and adam never applied it (TrainConfig records 0 for them).
    if args.optimizer in ("sgd", "adam") and args.weight_decay:
        print(
            f"cnnserve train: --weight-decay is for adamw and radam (decoupled); "
            f"{args.optimizer} takes none: use --l2, or --optimizer adamw",
            file=sys.stderr,
        )
        return 2
    from service.preprocessing import PreprocessSpec
    from service.training.config import ArchConfig, AugmentConfig, TrainConfig
    from service.training.train import train

    # Absolute in the card: `evaluate`/`compress` read these again, from anywhere.
    datasets = [
        d if d == "fashion_mnist" else str(Path(d).resolve())
        for d in args.dataset or [TrainConfig().dataset]
    ]
    cfg = TrainConfig(
        dataset=datasets[0],
        extra_datasets=tuple(datasets[1:]),
        class_map=args.class_map.resolve() if args.class_map else None,
        relabel=args.relabel.resolve() if args.relabel else None,
        class_weight=args.class_weight,
        data_dir=args.data_dir,
        arch=ArchConfig.for_arch(
            args.arch,
            dropout=args.dropout,
            l2=args.l2,
            width_multiplier=args.width,
            depth=args.depth,
            squeeze_excite=args.se,
        ),
        preprocess=PreprocessSpec(resize_method=args.resize_method),
        augment=AugmentConfig(
            enabled=not args.no_augment,
            rotation_degrees=args.rotation,
            width_shift=args.shift,
            height_shift=args.shift,
            zoom=args.zoom,
            horizontal_flip=not args.no_flip,
        ),
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        learning_rate=args.lr,
        momentum=args.momentum,
        weight_decay=(
            TrainConfig().weight_decay if args.weight_decay is None else args.weight_decay
        ),
        schedule=args.schedule,
        early_stopping_patience=args.patience,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        balance=args.balance,
        limit=args.limit,
        seed=args.seed,
    )
    result = train(cfg, args.work_dir)
    already = published_run(args.repository / args.model_name, result.run_id)
    if already is not None:
        print(
            f"cnnserve train: this fit (same recipe, same images) is already published as "
            f"{already}; nothing new to publish",
            file=sys.stderr,
        )
        print(already)
        return 0
    from service.training.export import publish  # after fit: a failed import must not cost a fit

    command = "cnnserve " + shlex.join(args.argv)
    version_dir = publish(
        result,
        cfg,
        repository=args.repository,
        model_name=args.model_name,
        command=command,
        latency_runs=args.latency_runs,
        demo_samples=not args.no_demo_samples,
    )
    _say_test_accuracy(version_dir)
    print(version_dir)
    _say_if_unserved(args.repository, args.model_name)
    return 0


def _say_test_accuracy(version_dir: Path) -> None:
    """The held-out score, on stderr, so a fit ends with how good it is (it was only in
    the card, for `cnnserve evaluate` to show); stdout keeps the folder alone."""
    from service.repository import read_card

    evaluation = read_card(version_dir).get("evaluation", {})
    if "accuracy" in evaluation and "examples" in evaluation:
        print(
            f"cnnserve train: test accuracy {evaluation['accuracy']:.2%} on "
            f"{evaluation['examples']:,} held-out images (macro F1 "
            f"{evaluation.get('macro_f1', float('nan')):.3f}); `cnnserve evaluate "
            f"{version_dir}` for per-class scores and the confusion matrix",
            file=sys.stderr,
        )


def published_run(model_dir: Path, run_id: str) -> Path | None:
    """The version of ``model_dir`` whose card names the fit ``run_id``, if any."""
    for card_path in sorted(model_dir.glob("*/assets.extra/model_card.json")):
        try:
            card = json.loads(card_path.read_text())
        except (OSError, ValueError):
            continue  # not ours to judge here; the server reports unreadable versions
        if card.get("training", {}).get("run_id") == run_id and card_path.parents[1].name.isdigit():
            return card_path.parents[1]
    return None


def _say_if_unserved(repository: Path, model: str) -> None:
    """A model that models.config does not name is never served: a repository without
    the file gets one naming it (nothing to clobber); otherwise say what to add."""
    from service.repository import read_repository

    block = (
        "  config {\n"
        f'    name: "{model}"\n'
        f'    base_path: "/models/{model}"\n'
        '    model_platform: "tensorflow"\n'
        "    model_version_policy { latest { num_versions: 1 } }\n"
        "  }"
    )
    path = repository / "models.config"
    if not path.exists():
        written = path.with_name(".models.config.tmp")
        written.write_text(f"model_config_list {{\n{block}\n}}\n")
        written.replace(path)  # atomic: a server polling the folder reads all or nothing
        print(f"cnnserve: wrote {path}, which serves {model!r}", file=sys.stderr)
        return
    try:
        served = {config.name for config in read_repository(repository)}
    except CnnserveError:
        served = set()
    if model in served:
        return
    print(
        f"cnnserve: {model!r} is not in {path}, so no server loads it;"
        f" add this block inside model_config_list {{ ... }}:\n{block}",
        file=sys.stderr,
    )


def _add_card_data_dir(p: argparse.ArgumentParser) -> None:
    """evaluate's and compress's way to find a version's data elsewhere than its card says."""
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="override the card's dataset folder (Fashion-MNIST's IDX folder, or the folder "
        "a one-folder version was trained on)",
    )


def add_evaluate(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], settings: Settings
) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a published version on its test split",
        description="Accuracy, per-class precision/recall/F1, confusion matrix and latency of "
        "a published version, on the test split its model card names. The version folder is "
        "never modified; the report goes to stdout (JSON) and, with --output, to a folder.",
    )
    p.add_argument("version_dir", type=Path, help="e.g. model_repository/fashion_mnist/1")
    _add_card_data_dir(p)
    p.add_argument(
        "--output", type=folder_or_new, default=None, help="write report.json and PNG plots here"
    )
    p.add_argument("--latency-runs", type=at_least(1), default=50)
    p.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    card = args.version_dir / "assets.extra" / "model_card.json"
    if not ((args.version_dir / "saved_model.pb").is_file() and card.is_file()):
        print(
            f"cnnserve evaluate: {args.version_dir} is not a version published by cnnserve "
            "(a SavedModel with assets.extra/model_card.json), e.g. "
            "model_repository/fashion_mnist/1",
            file=sys.stderr,
        )
        return 2
    from service.training.evaluate import evaluate_version

    report = evaluate_version(
        args.version_dir, data_dir=args.data_dir, output=args.output, latency_runs=args.latency_runs
    )
    print(json.dumps(report, indent=2))
    return 0


def unpublishable(model_dir: Path) -> str:
    """Why a version cannot be published into ``model_dir``, found before the work (a
    read-only repository was said after the whole fit), or "". Nothing is created."""
    existing = model_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot publish into {model_dir}: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):  # a read-only mount, a folder not ours
        return f"cannot publish into {model_dir}: {existing} is not writable"
    return ""


def add_compress(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], settings: Settings
) -> None:
    from service.training.config import ARCHITECTURE_NAMES

    p = sub.add_parser(
        "compress",
        help="publish a compressed copy of a version (int8, prune, distill) as the next one",
        description="Read a published version, compress it, measure size, test accuracy and "
        "throughput at batch 1 and 32 before and after on the runtime that serves each, and "
        "publish the result atomically as the next version with the figures in its model "
        "card. The source version is never modified.",
    )
    p.add_argument("--model-repository", type=folder_or_new, default=str(settings.model_repository))
    p.add_argument("--model", type=model_name, default="fashion_mnist")
    p.add_argument("--version", type=int, default=None, help="source version (default: newest)")
    p.add_argument("--method", choices=["int8", "prune", "distill"], required=True)
    _add_card_data_dir(p)
    p.add_argument(
        "--test-limit",
        type=at_least(0),
        default=0,
        help="measure on N test images drawn at random, the same N each run (0 = all)",
    )
    p.add_argument(
        "--latency-runs", type=at_least(1), default=50, help="timed batches per batch size"
    )
    p.add_argument("--seed", type=int, default=0)
    # Spelled out (as ARCHITECTURE_NAMES): service.runtimes.card's MIN_TOP1_AGREEMENT and
    # MAX_ACCURACY_DROP; importing it would load TensorFlow for `--help`. A test checks.
    int8 = p.add_argument_group("int8")
    int8.add_argument("--representative-samples", type=at_least(1), default=200)
    int8.add_argument("--min-agreement", type=SHARE, default=0.98, help="top-1 vs float model")
    int8.add_argument("--max-accuracy-drop", type=SHARE, default=0.01, help="fraction, 0.01 = 1 pt")
    tune = p.add_argument_group("prune and distill (training)")
    tune.add_argument(
        "--limit",
        type=at_least(0),
        default=0,
        help="fine-tune on N training images drawn at random, the same N each run (0 = all)",
    )
    tune.add_argument("--epochs", type=at_least(1), default=2)
    tune.add_argument("--batch-size", type=at_least(1), default=64)
    tune.add_argument("--lr", type=POSITIVE, default=None, help="default 1e-4 prune, 2e-3 distill")
    tune.add_argument("--sparsity", type=fraction, default=0.5, help="prune: target sparsity")
    tune.add_argument("--teacher", type=int, default=None, help="distill: teacher version")
    tune.add_argument("--student-arch", choices=ARCHITECTURE_NAMES, default="efficient_cnn")
    tune.add_argument("--student-width", type=POSITIVE, default=0.5)
    tune.add_argument("--student-depth", type=at_least(1), default=1)
    tune.add_argument("--temperature", type=POSITIVE, default=4.0)
    tune.add_argument("--alpha", type=SHARE, default=0.1, help="weight of the hard-label loss")
    p.set_defaults(handler=_compress)


def _compress(args: argparse.Namespace, settings: Settings) -> int:
    if problem := unpublishable(args.model_repository / args.model):
        print(f"cnnserve compress: {problem}; choose another --model-repository", file=sys.stderr)
        return 2
    from service.training.compression import compress

    version_dir, summary = compress(args, command="cnnserve " + shlex.join(args.argv))
    print(summary)
    print(version_dir)
    return 0
