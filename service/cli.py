"""`cnnserve`: train, evaluate, export and serve CNN image classifiers."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Literal, NoReturn, get_args, get_origin

from pydantic import ValidationError

from service.cli_bench import add_bench
from service.cli_data import add_data, add_experiments
from service.cli_rollout import add_promote, add_verify
from service.cli_train import add_compress, add_evaluate, add_train
from service.cli_types import DefaultsHelp, say_defaults
from service.config import Settings, unknown_variables
from service.errors import CnnserveError, DatasetError, PromotionError
from service.logs import setup_logging

# The settings `cnnserve serve` takes as flags; each flag's type, choices, help and
# default (the environment's value) come from the Settings field of the same name.
SERVE_FLAGS = (
    "host",
    "port",
    "grpc_port",
    "probe_port",
    "model_repository",
    "workers",
    "poll_seconds",
    "backend",
    "tfserving_address",
    "canary_percent",
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_serve(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], settings: Settings
) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model repository over REST and gRPC",
        description="Serve every model of models.config: REST (and /docs) on --port, gRPC on "
        "--grpc-port. Each flag is also the environment variable CNNSERVE_<NAME>; defaults "
        "shown are the values in effect.",
        formatter_class=DefaultsHelp,
    )
    for name in SERVE_FLAGS:
        field = Settings.model_fields[name]
        choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
        kind = None if choices else field.annotation
        p.add_argument(
            _flag(name),
            type=kind,  # type: ignore[arg-type]
            choices=choices,
            default=getattr(settings, name),
            help=field.description,
        )
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from service.server import serve, startup_problem

    # A misspelt variable is ignored by the settings: refused here, as one that would turn
    # a setting off without a word (API keys, TLS, limits) must not start a server.
    unknown = unknown_variables(os.environ)
    if unknown:
        print(
            f"cnnserve serve: {'; '.join(unknown)}: correct or unset it (a misspelt "
            "variable would leave its setting, API keys or TLS or a limit, at the default)",
            file=sys.stderr,
        )
        return 2
    # Validated exactly as settings from the environment are (model_copy would skip that).
    overrides = {name: getattr(args, name) for name in SERVE_FLAGS}
    try:
        settings = Settings.model_validate({**settings.model_dump(), **overrides})
    except ValidationError as exc:
        print(f"cnnserve serve: {_settings_problem(exc, _flag)}", file=sys.stderr)
        return 2
    try:
        settings.keys()  # an unreadable key file stops start-up here, in one line
    except ValueError as exc:
        print(f"cnnserve serve: {exc}", file=sys.stderr)
        return 2
    problem = startup_problem(settings)
    if problem is not None:
        print(f"cnnserve serve: {problem}", file=sys.stderr)
        return 3
    return int(serve(settings))


def _settings_problem(exc: ValidationError, name_of: Callable[[str], str]) -> str:
    """One line naming each refused setting as the user spelled it (flag or variable)."""
    problems = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["loc"]:
            problems.append(f"{name_of(str(error['loc'][0]))}: {message}")
        else:  # a rule across fields: name the fields it mentions
            fields = "|".join(sorted(Settings.model_fields, key=len, reverse=True))
            problems.append(re.sub(rf"\b({fields})\b", lambda m: name_of(m[1]), message))
    return "; ".join(problems)


def _variable(name: str) -> str:
    return f"CNNSERVE_{name.upper()}"


class _OneLineErrors(argparse.ArgumentParser):
    """A bad flag is one line naming where help is, not the usage block above it (the
    message was lost under ~15 lines); subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# After Ctrl-C: what the interrupted command left and how to go on.
# Exit codes for a command stopped by the file system (OSError), where 1 means something
# else: verify's 1 is "the server disagrees", 2 "cannot check".
_OS_ERROR_EXIT = {"verify": 2}

_AFTER_INTERRUPT = {
    "train": "rerun the same command to resume from the last finished epoch",
    "compress": "nothing was published; rerun the same command",
    "promote": "models.config holds the steps already printed; rerun the same command",
}


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _OneLineErrors(
        prog="cnnserve",
        description="Train CNN image classifiers into a TF Serving model repository and serve it.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train(sub, settings)
    add_evaluate(sub, settings)
    _add_serve(sub, settings)
    add_bench(sub, settings)
    add_compress(sub, settings)
    add_data(sub, settings)
    add_experiments(sub, settings)
    add_promote(sub, settings)
    add_verify(sub, settings)
    say_defaults(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # No argv: the console script or `python -m service.cli`, so this process is the
    # command's own (tests pass argv and share theirs).
    own_process = argv is None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"cnnserve: {_settings_problem(exc, _variable)}", file=sys.stderr)
        return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(settings).parse_args(argv)
    args.argv = argv
    setup_logging(verbose=args.verbose)
    interrupt = _Interrupt(args.command)
    if own_process and args.command != "serve":  # serve has its own graceful SIGTERM
        # A SIGTERM (a CI runner's, `timeout`'s) stops as Ctrl-C does: temporary folders
        # removed and one line, where it killed the process and left them behind.
        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, interrupt)
    try:
        return int(args.handler(args, settings))
    except KeyboardInterrupt:
        if own_process:
            # Freeing an interrupted fit's tf.data iterators deadlocks in TF (a prefetch
            # thread pool's teardown): train printed the line and hung for good.
            # Everything to clean up has been (the with-blocks ran on the way here).
            interrupt.exit()
        print(_interrupted(args.command), file=sys.stderr)
        return 130
    except DatasetError as exc:
        print(f"cnnserve: {exc.message}", file=sys.stderr)
        return 2
    except PromotionError as exc:
        print(f"cnnserve {args.command}: {exc.message}", file=sys.stderr)
        return 1
    except CnnserveError as exc:
        print(f"cnnserve: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:  # the machine said no: a read-only folder, a full disk
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"cnnserve {args.command}: {exc.strerror or exc}{where}", file=sys.stderr)
        return _OS_ERROR_EXIT.get(args.command, 1)


def _interrupted(command: str) -> str:
    after = _AFTER_INTERRUPT.get(command)
    return f"cnnserve {command}: interrupted" + (f"; {after}" if after else "")


# Seconds an interrupted command may take to unwind (its with-blocks remove temporary
# folders) before it exits all the same.
UNWIND_SECONDS = 5.0


class _Interrupt:
    """SIGINT and SIGTERM of an offline command: KeyboardInterrupt, so the with-blocks
    on the way out remove what they made, then exit 130 with one line. Unwinding may
    free an interrupted fit's tf.data iterators, which can deadlock in TF's teardown (a
    SIGTERM half an epoch in hung CI for a minute): a timer exits anyway after
    :data:`UNWIND_SECONDS`."""

    def __init__(self, command: str) -> None:
        self.command = command
        self._once = threading.Lock()

    def __call__(self, signum: int, frame: object) -> None:
        timer = threading.Timer(UNWIND_SECONDS, self.exit)
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    def exit(self) -> NoReturn:
        self._once.acquire()  # the timer and the unwound main thread: one line, one exit
        print(_interrupted(self.command), file=sys.stderr)
        _exit_now(130)


def _exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown (see the caller)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
