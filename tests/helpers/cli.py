"""Running `cnnserve` commands in the test's own process."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

from service.cli import main


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def cnnserve(*args: str) -> Done:
    """`cnnserve ARGS` in this process (TensorFlow is imported once, not per command);
    stdout and stderr as a person would see them."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's one-line errors
            code = int(exc.code or 0)
    return Done(code, out.getvalue(), err.getvalue())
