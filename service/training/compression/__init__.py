"""`cnnserve compress`: a published version in, a compressed next version out.

Methods: :mod:`.int8` (post-training full-integer quantization), :mod:`.prune` (magnitude
pruning on a polynomial schedule with fine-tuning), :mod:`.distill` (a smaller student
trained on a teacher version's softened outputs). Each measures size, test accuracy and
throughput at batch 1 and 32 before and after, prints them and records them in the new
version's model card (``compression``); :mod:`.common` holds what they share.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def compress(args: argparse.Namespace, *, command: str) -> tuple[Path, str]:
    """Run the method ``args.method`` names (the CLI's parsed arguments); returns the new
    version folder and a printable summary of the measured effects."""
    from service.training.compression.common import load_source

    source = load_source(
        args.model_repository,
        args.model,
        args.version,
        data_dir=args.data_dir,
        test_limit=args.test_limit,
    )
    if args.method == "int8":
        from service.training.compression.int8 import Int8Options, compress_int8

        return compress_int8(
            source,
            Int8Options(
                representative_samples=args.representative_samples,
                min_top1_agreement=args.min_agreement,
                max_accuracy_drop=args.max_accuracy_drop,
                latency_runs=args.latency_runs,
                seed=args.seed,
            ),
            command=command,
        )
    if args.method == "prune":
        from service.training.compression.prune import PruneOptions, compress_prune

        return compress_prune(
            source,
            PruneOptions(
                target_sparsity=args.sparsity,
                epochs=args.epochs,
                batch_size=args.batch_size,
                learning_rate=args.lr if args.lr is not None else 1e-4,
                limit=args.limit,
                latency_runs=args.latency_runs,
                seed=args.seed,
            ),
            command=command,
        )
    from service.training.compression.distill import DistillOptions, compress_distill

    return compress_distill(
        source,
        DistillOptions(
            teacher_version=args.teacher,
            student_arch=args.student_arch,
            student_width=args.student_width,
            student_depth=args.student_depth,
            temperature=args.temperature,
            alpha=args.alpha,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr if args.lr is not None else 2e-3,
            limit=args.limit,
            latency_runs=args.latency_runs,
            seed=args.seed,
        ),
        command=command,
    )
