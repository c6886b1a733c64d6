"""`cnnserve`: train, evaluate, export and serve CNN image classifiers."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from service.config import Settings
from service.errors import CnnserveError, DatasetError

# Spelled out so `--help` does not import TensorFlow; a test checks it matches.
ARCHITECTURE_NAMES = ("efficient_cnn", "resnet", "seed_cnn", "lenet5", "alexnet")


def _add_train(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], settings: Settings
) -> None:
    p = sub.add_parser(
        "train",
        help="train a model and publish it as the next version in the repository",
        description="Train on Fashion-MNIST or a folder of class folders, evaluate on the "
        "held-out test split, and publish a versioned SavedModel atomically.",
    )
    p.add_argument(
        "--dataset",
        default="fashion_mnist",
        help="'fashion_mnist' or a folder of class-named folders",
    )
    p.add_argument(
        "--data-dir", type=Path, default=settings.fashion_mnist_dir, help="Fashion-MNIST IDX folder"
    )
    p.add_argument("--repository", type=Path, default=settings.model_repository)
    p.add_argument("--model-name", default="fashion_mnist", help="model folder in the repository")
    p.add_argument(
        "--work-dir", type=Path, default=Path(".train"), help="checkpoints (resume on rerun)"
    )
    p.add_argument("--arch", choices=ARCHITECTURE_NAMES, default="efficient_cnn")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    p.add_argument("--depth", type=int, default=2, help="blocks per stage")
    p.add_argument("--se", action="store_true", help="squeeze-and-excitation blocks")
    p.add_argument("--dropout", type=float, default=None, help="default 0.2 (seed_cnn: 0)")
    p.add_argument(
        "--l2",
        type=float,
        default=None,
        help="L2 on dense layers (default 0.01 for seed_cnn, else 0)",
    )
    p.add_argument(
        "--resize-method",
        default="bilinear",
        choices=["nearest", "bilinear", "bicubic", "lanczos", "box"],
    )
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw", "radam"], default="sgd")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW decoupled weight decay")
    p.add_argument("--schedule", choices=["plateau", "cosine", "constant"], default="plateau")
    p.add_argument("--patience", type=int, default=5, help="early-stopping patience (epochs)")
    p.add_argument("--no-augment", action="store_true", help="switch all augmentation off")
    p.add_argument("--rotation", type=float, default=20.0, help="max rotation in degrees (0 = off)")
    p.add_argument("--shift", type=float, default=0.2, help="max width/height shift fraction")
    p.add_argument("--zoom", type=float, default=0.2, help="max zoom fraction")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips")
    p.add_argument("--balance", action="store_true", help="oversample minority classes")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1, help="folder datasets only")
    p.add_argument("--limit", type=int, default=0, help="use the first N training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--latency-runs", type=int, default=50, help="timed batches for the latency report"
    )
    p.set_defaults(handler=_train)


def _train(args: argparse.Namespace, settings: Settings) -> int:
    from service.preprocessing import PreprocessSpec
    from service.training.architectures import ArchConfig
    from service.training.pipeline import AugmentConfig
    from service.training.train import TrainConfig, train

    seed_cnn = args.arch == "seed_cnn"
    cfg = TrainConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        arch=ArchConfig(
            name=args.arch,
            width_multiplier=args.width,
            depth=args.depth,
            squeeze_excite=args.se,
            dropout=args.dropout if args.dropout is not None else (0.0 if seed_cnn else 0.2),
            weight_decay=args.l2 if args.l2 is not None else (0.01 if seed_cnn else 0.0),
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
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        early_stopping_patience=args.patience,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        balance=args.balance,
        limit=args.limit,
        seed=args.seed,
    )
    result = train(cfg, args.work_dir)
    from service.training.export import publish  # after fit: a failed import must not cost a fit

    command = "cnnserve " + shlex.join(args.argv)
    version_dir = publish(
        result,
        cfg,
        repository=args.repository,
        model_name=args.model_name,
        command=command,
        latency_runs=args.latency_runs,
    )
    print(version_dir)
    return 0


def _add_evaluate(
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
    p.add_argument("--data-dir", type=Path, default=None, help="override the card's dataset folder")
    p.add_argument("--output", type=Path, default=None, help="write report.json and PNG plots here")
    p.add_argument("--latency-runs", type=int, default=50)
    p.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from service.training.evaluate import evaluate_version

    report = evaluate_version(
        args.version_dir, data_dir=args.data_dir, output=args.output, latency_runs=args.latency_runs
    )
    print(json.dumps(report, indent=2))
    return 0


def _add_serve(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], settings: Settings
) -> None:
    p = sub.add_parser("serve", help="serve the model repository over REST and gRPC")
    p.add_argument("--host", default=settings.host)
    p.add_argument("--port", type=int, default=settings.port)
    p.add_argument("--grpc-port", type=int, default=settings.grpc_port, help="0 disables gRPC")
    p.add_argument("--model-repository", type=Path, default=settings.model_repository)
    p.add_argument("--workers", type=int, default=settings.workers)
    p.add_argument("--poll-seconds", type=float, default=settings.poll_seconds)
    p.add_argument(
        "--backend",
        choices=["embedded", "tfserving"],
        default=settings.backend,
        help="run models in-process, or forward batches to a TF Serving",
    )
    p.add_argument(
        "--tfserving-address",
        default=settings.tfserving_address,
        help="TF Serving gRPC host:port (with --backend tfserving)",
    )
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    settings = settings.model_copy(
        update={
            "host": args.host,
            "port": args.port,
            "grpc_port": args.grpc_port,
            "model_repository": args.model_repository,
            "workers": args.workers,
            "poll_seconds": args.poll_seconds,
            "backend": args.backend,
            "tfserving_address": args.tfserving_address,
        }
    )
    try:
        from service.server import serve  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        print(
            f"cnnserve serve: the gateway is not built yet; it would serve "
            f"{settings.model_repository} on http://{settings.host}:{settings.port} "
            f"(gRPC :{settings.grpc_port})",
            file=sys.stderr,
        )
        return 3
    return int(serve(settings))


def _add_bench(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], settings: Settings
) -> None:
    p = sub.add_parser(
        "bench",
        help="measure runtimes and end-to-end HTTP throughput/latency",
        description="Times each runtime on one version at several batch sizes, then starts a "
        "server and drives it with wrk (224x224 JPEG, raw body). Prints a table and writes "
        "JSON with the machine, model and settings.",
    )
    p.add_argument("--model-repository", type=Path, default=settings.model_repository)
    p.add_argument("--model", default="fashion_mnist")
    p.add_argument("--version", type=int, default=None, help="default: newest")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--seconds", type=float, default=3.0, help="per runtime measurement")
    p.add_argument("--http-seconds", type=int, default=20)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--workers", default="1,2", help="worker counts to measure over HTTP")
    p.add_argument("--skip-http", action="store_true")
    p.add_argument("--output", type=Path, default=Path("reports/bench.json"))
    p.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    from service.bench import bench_http, bench_runtimes, machine, report
    from service.repository import version_dirs

    versions = version_dirs(args.model_repository / args.model)
    if not versions:
        raise DatasetError(f"no published version of {args.model} in {args.model_repository}")
    version = args.version or max(versions)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    print(f"runtimes on {args.model}/{version} ({machine()})", file=sys.stderr)
    rows = []
    for threads in sorted({1, os.cpu_count() or 1}):
        rows += bench_runtimes(
            versions[version],
            cache_dir=settings.cache_dir,
            batch_sizes=sizes,
            seconds=args.seconds,
            threads=threads,
        )
    http = []
    if not args.skip_http:
        for workers in (int(w) for w in args.workers.split(",")):
            print(f"http: {workers} worker(s), {args.connections} connections", file=sys.stderr)
            http.append(
                bench_http(
                    args.model_repository,
                    workers=workers,
                    connections=args.connections,
                    seconds=args.http_seconds,
                    extra_env={},
                )
            )
    data = {
        "machine": machine(),
        "model": f"{args.model}/{version}",
        "runtimes": rows,
        "http": http,
        "command": "cnnserve " + shlex.join(args.argv),
    }
    report(args.output, data)
    print("| runtime | threads | batch | images/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['runtime']} | {r['threads']} | {r['batch']} | {r['images_per_s']:.0f} "
            f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
        )
    if http:
        print()
        print("| workers | connections | req/s | p50 ms | p90 ms | p99 ms | non-2xx |")
        print("|---|---|---|---|---|---|---|")
        for h in http:
            print(
                f"| {h['workers']} | {h['connections']} | {h['requests_per_s']:.0f} "
                f"| {h['p50_ms']:.1f} | {h['p90_ms']:.1f} | {h['p99_ms']:.1f} | {h['non_2xx']} |"
            )
    print(f"\nwritten to {args.output}", file=sys.stderr)
    return 0


def _add_compress(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], settings: Settings
) -> None:
    p = sub.add_parser(
        "compress",
        help="publish a compressed copy of a version (int8, prune, distill) as the next one",
        description="Read a published version, compress it, measure size, test accuracy and "
        "throughput at batch 1 and 32 before and after on the runtime that serves each, and "
        "publish the result atomically as the next version with the figures in its model "
        "card. The source version is never modified.",
    )
    p.add_argument("--model-repository", type=Path, default=settings.model_repository)
    p.add_argument("--model", default="fashion_mnist")
    p.add_argument("--version", type=int, default=None, help="source version (default: newest)")
    p.add_argument("--method", choices=["int8", "prune", "distill"], required=True)
    p.add_argument("--data-dir", type=Path, default=None, help="override the card's dataset")
    p.add_argument(
        "--test-limit", type=int, default=0, help="measure on the first N test images (0 = all)"
    )
    p.add_argument("--latency-runs", type=int, default=50, help="timed batches per batch size")
    p.add_argument("--seed", type=int, default=0)
    # Spelled out (as ARCHITECTURE_NAMES): service.runtimes.card's MIN_TOP1_AGREEMENT and
    # MAX_ACCURACY_DROP; importing it would load TensorFlow for `--help`. A test checks.
    int8 = p.add_argument_group("int8")
    int8.add_argument("--representative-samples", type=int, default=200)
    int8.add_argument("--min-agreement", type=float, default=0.98, help="top-1 vs float model")
    int8.add_argument("--max-accuracy-drop", type=float, default=0.01, help="fraction, 0.01 = 1 pt")
    tune = p.add_argument_group("prune and distill (training)")
    tune.add_argument("--limit", type=int, default=0, help="use the first N training images")
    tune.add_argument("--epochs", type=int, default=2)
    tune.add_argument("--batch-size", type=int, default=64)
    tune.add_argument("--lr", type=float, default=None, help="default 1e-4 prune, 2e-3 distill")
    tune.add_argument("--sparsity", type=float, default=0.5, help="prune: target sparsity")
    tune.add_argument("--teacher", type=int, default=None, help="distill: teacher version")
    tune.add_argument("--student-arch", choices=ARCHITECTURE_NAMES, default="efficient_cnn")
    tune.add_argument("--student-width", type=float, default=0.5)
    tune.add_argument("--student-depth", type=int, default=1)
    tune.add_argument("--temperature", type=float, default=4.0)
    tune.add_argument("--alpha", type=float, default=0.1, help="weight of the hard-label loss")
    p.set_defaults(handler=_compress)


def _compress(args: argparse.Namespace, settings: Settings) -> int:
    from service.training.compression import compress

    version_dir, summary = compress(args, command="cnnserve " + shlex.join(args.argv))
    print(summary)
    print(version_dir)
    return 0


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnserve",
        description="Train CNN image classifiers into a TF Serving model repository and serve it.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub, settings)
    _add_evaluate(sub, settings)
    _add_serve(sub, settings)
    _add_bench(sub, settings)
    _add_compress(sub, settings)
    return parser


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    settings = Settings()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(settings).parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=LOG_FORMAT)
    try:
        return int(args.handler(args, settings))
    except DatasetError as exc:
        print(f"cnnserve: {exc.message}", file=sys.stderr)
        return 2
    except CnnserveError as exc:
        print(f"cnnserve: {exc.code}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
