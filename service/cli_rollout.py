"""`cnnserve promote` and `cnnserve verify`: the rollout commands (parsers and handlers).

Kept apart from :mod:`service.cli` so that each module stays one job; ``cli`` adds them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from service.cli_types import POSITIVE, DefaultsHelp, at_least, folder_or_new, pem_certificates
from service.client_trust import api_key_headers
from service.config import Settings
from service.errors import (
    BackendUnavailable,
    CnnserveError,
    ConfigError,
    DatasetError,
    NoServer,
    PromotionError,
)

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_NO_SERVER = 3


def add_promote(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], settings: Settings
) -> None:
    p = sub.add_parser(
        "promote",
        help="move a version label (canary, stable) to a version, safely",
        description="Point LABEL at VERSION of MODEL in steps that never drop traffic: serve "
        "the version (add it to the version policy) and wait until it is AVAILABLE, then move "
        "the label, then drop the version the label left if nothing needs it. models.config "
        "is edited in place (comments kept) and replaced atomically; with --tfserving each "
        "step is also sent to that TF Serving (HandleReloadConfigRequest).",
        formatter_class=DefaultsHelp,
    )
    p.add_argument("model", help="model name in models.config")
    p.add_argument("version", type=int, help="the version the label moves to")
    p.add_argument("--label", required=True, help="version label, e.g. canary or stable")
    p.add_argument(
        "--model-repository",
        type=Path,
        default=settings.model_repository,
        help="repository whose models.config is edited",
    )
    p.add_argument(
        "--tfserving",
        metavar="ADDRESS",
        default=None,
        help="a TF Serving (host:port) to reconfigure and wait on, instead of a gateway",
    )
    p.add_argument(
        "--url", default=DEFAULT_URL, help="gateway whose status is waited on (repository mode)"
    )
    add_ca_cert(p, "an https:// --url")
    p.add_argument("--timeout", type=POSITIVE, default=300.0, help="seconds to wait for AVAILABLE")
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="apply every step without waiting (only when no server serves the repository)",
    )
    p.add_argument("--dry-run", action="store_true", help="print each intermediate config")
    p.set_defaults(handler=_promote)


def _promote(args: argparse.Namespace, settings: Settings) -> int:
    from service.config_edit import editing

    if args.ca_cert is not None and (args.tfserving or not args.url.startswith("https://")):
        raise PromotionError(
            "--ca-cert is for an https:// --url (--tfserving speaks plaintext gRPC)"
        )
    if not args.model_repository.is_dir():
        raise PromotionError(f"model repository {args.model_repository} is not a folder")
    # Steps are planned from the file as read and written minutes apart: two promotes
    # at once each wrote its own plan over the other's (a label lost, both exit 0).
    with editing(args.model_repository) as mine:
        if not mine:
            raise PromotionError(
                f"another cnnserve promote is changing {args.model_repository}; rerun this "
                "one once it has finished"
            )
        return _promote_locked(args, settings)


def _promote_locked(args: argparse.Namespace, settings: Settings) -> int:
    from service.config_edit import write_atomically
    from service.promotion import GatewayStatus, TFServingStatus, plan, promote, published_versions
    from service.repository import MODELS_CONFIG, read_config_text

    path = args.model_repository / MODELS_CONFIG
    try:
        text = read_config_text(path)
    except ConfigError as exc:  # missing, unreadable, not UTF-8
        raise PromotionError(exc.message) from None
    on_disk = set(published_versions(text, args.model_repository, args.model))
    client: Any = None
    gateway: GatewayStatus | None = None
    serving: set[int] | None = None
    if args.tfserving:
        from service.runtimes.tfserving import TFServingClient

        # TLS as the gateway speaks it to TF Serving (CNNSERVE_TFSERVING_CA_FILE).
        client = TFServingClient(args.tfserving, 30.0, settings.tfserving_ca_file)
        try:
            serving = set(client.available(args.model))
            on_disk |= serving
        except BackendUnavailable:
            client.close()
            raise PromotionError(
                f"TF Serving at {args.tfserving} cannot be reached: is it running, and is "
                "that its gRPC port (--tfserving host:port, 8500 by default)?"
            ) from None
    elif args.version not in on_disk:
        raise PromotionError(
            f"version {args.version} of {args.model} is not published in "
            f"{args.model_repository} (versions there: {sorted(on_disk) or 'none'})"
        )
    else:
        gateway = GatewayStatus(args.url, args.timeout, _auth(settings), ca_cert=args.ca_cert)
        serving = gateway.serving(args.model)
        _check_served_here(args, serving, on_disk)
    # Only a promote that waits for a server needs one to say what it serves: with
    # --no-wait the caller said none serves the repository.
    unknown = None if gateway is None or args.no_wait else gateway.unreachable
    steps = plan(
        text,
        args.model_repository,
        args.model,
        args.version,
        args.label,
        on_disk,
        serving,
        unknown,
    )

    written = [text]  # what the file should hold now: as read, then as last written

    def apply(new_text: str) -> None:
        # A hand edit while a step waited would be overwritten by the next step's text,
        # planned from the file as it was.
        try:
            now = read_config_text(path)
        except ConfigError as exc:
            raise PromotionError(exc.message) from None
        if now != written[-1]:
            raise PromotionError(
                f"{path} changed while this promote waited (someone else edited it); "
                "nothing more was written: rerun the command to plan from the file as it is"
            )
        if client is not None:
            _reload_tfserving(client, new_text)
        write_atomically(path, new_text)
        written.append(new_text)
        print(f"wrote {path}", file=sys.stderr)

    wait: Any = None
    if not args.no_wait:
        wait = (
            TFServingStatus(
                client,
                args.timeout,
                lambda: TFServingClient(
                    args.tfserving, 10.0, settings.tfserving_ca_file, own_connection=True
                ),
            )
            if client is not None
            else gateway
        )
    try:
        promote(
            steps,
            model=args.model,
            version=args.version,
            label=args.label,
            apply=apply,
            wait=wait,
            dry_run=args.dry_run,
            out=sys.stdout,
        )
    except NoServer as exc:
        print(
            f"cnnserve promote: {exc.message}. Step 1 is applied; the label was not moved. "
            "Rerun the same command once a server serves the repository (or pass --no-wait "
            "when none does).",
            file=sys.stderr,
        )
        return EXIT_NO_SERVER
    finally:
        if client is not None:
            client.close()
    return 0


def _check_served_here(
    args: argparse.Namespace, serving: set[int] | None, on_disk: set[int]
) -> None:
    """Refuse, before anything is written, a promote that would leave the repository's
    config at odds with the gateway at --url (an outside review):

    - ``--no-wait`` while it serves the model: every step applied without waiting, a
      version that did not load stayed pinned and labelled (promote's undo needs the
      wait), and a restart or a new replica then served nothing (503 for every request);
    - none of the versions it serves in the repository: --model-repository is not the
      one it serves (its versions were written into another repository's config, which
      then served nothing of them), or they were all deleted since."""
    if serving is None:
        return
    served = ", ".join(str(v) for v in sorted(serving)) or "none AVAILABLE"
    if args.no_wait:
        raise PromotionError(
            f"a gateway at {args.url} serves {args.model} (versions: {served}): --no-wait is "
            "for a repository no server serves (without the wait, a version that does not "
            "load stays pinned and labelled). Promote without --no-wait, or pass the --url "
            "of the gateway that serves this repository; nothing was written"
        )
    if serving and not serving & on_disk:
        raise PromotionError(
            f"the gateway at {args.url} serves versions {served} of {args.model}, none of "
            f"which is in {args.model_repository} (versions there: "
            f"{', '.join(str(v) for v in sorted(on_disk))}): is --model-repository the "
            "repository it serves (or were those versions deleted)? Check it and --url; "
            "nothing was written"
        )


def _reload_tfserving(client: Any, text: str) -> None:
    """HandleReloadConfigRequest with the whole ModelServerConfig of ``text``."""
    from google.protobuf import text_format

    from service.proto_gen.tensorflow_serving.apis import model_management_pb2
    from service.proto_gen.tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    request = model_management_pb2.ReloadConfigRequest(config=config)
    try:
        answer = client.call("HandleReloadConfigRequest", request)
    except CnnserveError as exc:
        raise PromotionError(
            f"TF Serving at {client.address} did not take the config: {exc.log_message()}"
        ) from None
    if answer.status.error_code:
        raise PromotionError(
            f"TF Serving at {client.address} refused the config: {answer.status.error_message}"
        )


def add_verify(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], settings: Settings
) -> None:
    p = sub.add_parser(
        "verify",
        help="check that a live server answers what the offline evaluation measured",
        description="Send the test set through the live API as PNG and as JPEG (quality 90), "
        "compare served top-1 with the same version's offline predictions on the same bytes "
        "(its SavedModel through service.preprocessing), and fail (exit 1) when agreement is "
        "below 99.9% (PNG) or 99% (JPEG): the train/serve-skew guard. No answer from the "
        "server is exit 2. Progress goes to stderr.",
        formatter_class=DefaultsHelp,
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", default=DEFAULT_URL, help="gateway REST address (/v1/classify)")
    where.add_argument(
        "--grpc", metavar="ADDRESS", default=None, help="gRPC Predict (gateway or TF Serving)"
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="--grpc over TLS (REST's follows --url's scheme)",
    )
    add_ca_cert(p, "an https:// --url or --grpc (implies --tls)")
    p.add_argument("--model", default=None, help="default: the server's default model")
    pin = p.add_mutually_exclusive_group()
    pin.add_argument("--version", type=int, default=None, help="default: what answers first")
    pin.add_argument("--label", default=None, help="a version label, e.g. canary")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="image folder (class subfolders, or flat); default: the version's test split, "
        "as its model card records it (Fashion-MNIST's test set for a Fashion-MNIST model)",
    )
    p.add_argument(
        "--data-dir", type=Path, default=settings.fashion_mnist_dir, help="Fashion-MNIST IDX folder"
    )
    p.add_argument(
        "--limit",
        type=at_least(0),
        default=0,
        help="N images (0 = all): Fashion-MNIST's first, a folder's a stratified sample",
    )
    p.add_argument(
        "--model-repository",
        type=Path,
        default=settings.model_repository,
        help="where the version's SavedModel is read for the offline side",
    )
    p.add_argument(
        "--output",
        type=folder_or_new,
        default=Path("reports/verify"),
        help="report.json and the images of the worst disagreements",
    )
    p.add_argument("--show", type=at_least(0), default=10, help="disagreements listed per encoding")
    p.add_argument(
        "--offline",
        choices=("auto", "artifact", "savedmodel"),
        default="auto",
        help="the offline side: auto = the shipped LiteRT artifact when it is quantized "
        "(what the gateway serves), else the SavedModel (what TF Serving serves)",
    )
    p.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    from service.verify import TestImages, card_test_images, load_images, run_verify
    from service.verify_clients import GrpcServer, RestServer

    misuse = _verify_misuse(args) or unwritable_folder(args.output)
    if misuse:
        print(f"cnnserve verify: {misuse}", file=sys.stderr)
        return 2
    try:
        headers = _auth(settings)
    except PromotionError as exc:  # an unreadable key file: cannot check, not a skew
        print(f"cnnserve verify: {exc.message}", file=sys.stderr)
        return 2
    if args.data is not None:
        given = load_images(args.data, args.data_dir, args.limit)  # a bad folder fails first

        def images(card: dict[str, Any]) -> TestImages:
            return given
    else:

        def images(card: dict[str, Any]) -> TestImages:
            return card_test_images(card, args.data_dir, args.limit)

    server: GrpcServer | RestServer
    if args.grpc:
        # A certificate to trust says TLS as plainly as --tls does.
        tls = args.tls or args.ca_cert is not None
        server = GrpcServer(args.grpc, metadata=headers, tls=tls, ca_cert=args.ca_cert)
    else:
        server = RestServer(args.url, headers, ca_cert=args.ca_cert)
    try:
        report = run_verify(
            server,
            repository=args.model_repository,
            images=images,
            model=args.model,
            version=args.version,
            label=args.label,
            output=args.output,
            show=args.show,
            offline_model=args.offline,
            cache_dir=settings.cache_dir,
        )
    except CnnserveError as exc:
        # Exit 1 says "skew" to a CI gate; a setup that cannot be checked is not one.
        # (DatasetError is verify's "cannot check": its code would only mislead.)
        code = "" if isinstance(exc, DatasetError) else f"{exc.code}: "
        print(f"cnnserve verify: {code}{exc.message}", file=sys.stderr)
        return 2
    finally:
        server.close()
    return 0 if report.passed else 1


def _verify_misuse(args: argparse.Namespace) -> str:
    """Options that would be silently ignored together, told before any work starts."""
    if args.tls and not args.grpc:
        return "--tls is for --grpc (REST's follows --url's scheme)"
    if args.ca_cert is not None and not args.grpc and not args.url.startswith("https://"):
        return f"--ca-cert is for an https:// --url or --grpc (got --url {args.url})"
    return ""


def unwritable_folder(folder: Path) -> str:
    """Why the report cannot be written to ``folder``, found before the check runs (it
    ran to the end, then lost its results to a traceback), or ""."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"cannot write the report to {folder}: {exc.strerror or exc}; give --output"
    return ""


def add_ca_cert(p: argparse.ArgumentParser, used_for: str) -> None:
    p.add_argument(
        "--ca-cert",
        type=pem_certificates,
        default=None,
        metavar="PEM",
        help=f"certificates to trust for {used_for}, e.g. a gateway's self-signed "
        "CNNSERVE_TLS_CERTFILE (REST: added to httpx's roots; gRPC: instead of its own)",
    )


def _auth(settings: Settings) -> dict[str, str]:
    """The gateway's own API key (CNNSERVE_API_KEYS or its file, as the server reads
    them) for the commands that call its API (REST header, gRPC metadata): with keys
    on, every call was a 401 / UNAUTHENTICATED."""
    try:
        return api_key_headers(settings)
    except ValueError as exc:  # an unreadable key file, or one that holds no key
        raise PromotionError(str(exc)) from None
