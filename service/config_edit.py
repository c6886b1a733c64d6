"""Surgical edits of models.config: one model's version policy and version labels.

Round-tripping text protobuf through the proto drops every comment and reflows the file,
so edits here work on the text itself. A small brace-aware scanner finds the model's
``config { ... }`` block and the entries inside it (strings and ``#`` comments are
skipped correctly); only the entries that change are rewritten, in the style they were
written in (one line, or one entry per line), and everything else, comments included,
stays byte for byte. Every result is parsed again with TF Serving's ModelServerConfig
before it may be written, and :func:`write_atomically` writes beside and renames, so a
server polling the file never reads half of it.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from service.errors import ConfigError
from service.repository import MODELS_CONFIG, ModelConfig, parse_models_config

_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>\#[^\n]*)
    | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
    | (?P<word>[A-Za-z0-9_.+-]+)
    | (?P<punct>[{}<>\[\]:,;])
    """,
    re.VERBOSE,
)
_CLOSE = {"{": "}", "<": ">"}


@dataclass(frozen=True)
class Token:
    kind: str  # string, word or punct
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class Entry:
    """One field of a text-protobuf message: ``name: value`` or ``name { children }``."""

    name: str
    start: int
    end: int  # just past the value or the closing brace
    value: Token | None = None  # for scalars
    children: tuple[Entry, ...] | None = None  # for messages
    inner_start: int = 0  # just past the opening brace
    inner_end: int = 0  # at the closing brace

    def fields(self, name: str) -> list[Entry]:
        return [c for c in self.children or () if c.name == name]

    def field(self, name: str) -> Entry | None:
        found = self.fields(name)
        return found[0] if found else None


def tokens(text: str) -> list[Token]:
    out = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ConfigError(f"{MODELS_CONFIG}: cannot read {text[position : position + 20]!r}")
        kind = match.lastgroup or ""
        if kind not in ("space", "comment"):
            out.append(Token(kind, match.group(), match.start(), match.end()))
        position = match.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = tokens(text)
        self.i = 0

    def peek(self) -> Token | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> Token:
        tok = self.peek()
        if tok is None:
            raise ConfigError(f"{MODELS_CONFIG}: ends inside a message (a '}}' is missing)")
        self.i += 1
        return tok

    def message(self, close: str | None) -> tuple[tuple[Entry, ...], int]:
        """Entries up to ``close`` (None: the end of the text); returns them and the
        position of the closing token."""
        entries: list[Entry] = []
        while True:
            tok = self.peek()
            if tok is None:
                if close is not None:
                    raise ConfigError(f"{MODELS_CONFIG}: a {close!r} is missing")
                return tuple(entries), -1
            if tok.kind == "punct" and tok.text == close:
                self.i += 1
                return tuple(entries), tok.start
            if tok.kind == "punct" and tok.text in ",;":
                self.i += 1
                continue
            entries.append(self.entry())

    def entry(self) -> Entry:
        name = self.take()
        if name.kind != "word":
            raise ConfigError(f"{MODELS_CONFIG}: expected a field name at {name.text!r}")
        tok = self.take()
        if tok.kind == "punct" and tok.text == ":":
            tok = self.take()
        if tok.kind == "punct" and tok.text in _CLOSE:
            children, close_at = self.message(_CLOSE[tok.text])
            return Entry(name.text, name.start, close_at + 1, None, children, tok.end, close_at)
        if tok.kind == "punct" and tok.text == "[":
            raise ConfigError(
                f"{MODELS_CONFIG}: the list syntax '{name.text}: [...]' is not edited here; "
                "write one entry per value"
            )
        if tok.kind == "punct":
            raise ConfigError(f"{MODELS_CONFIG}: unexpected {tok.text!r} after {name.text}")
        end = tok.end
        while (nxt := self.peek()) is not None and nxt.kind == "string" and tok.kind == "string":
            end = self.take().end  # adjacent strings concatenate
        return Entry(name.text, name.start, end, tok)


def parse(text: str) -> tuple[Entry, ...]:
    return _Parser(text).message(None)[0]


def _string(tok: Token | None) -> str:
    if tok is None or tok.kind != "string":
        return ""
    value = ast.literal_eval(tok.text)
    return value if isinstance(value, str) else ""


def find_model(text: str, model: str) -> Entry:
    """The ``config { ... }`` entry of ``model`` inside model_config_list."""
    for top in parse(text):
        if top.name != "model_config_list":
            continue
        for config in top.fields("config"):
            name = config.field("name")
            if name is not None and _string(name.value) == model:
                return config
    raise ConfigError(f"{MODELS_CONFIG} has no config {{ name: {model!r} ... }}")


# --- the layout of the text around an entry ---------------------------------------------


def _line_bounds(text: str, start: int, end: int) -> tuple[int, int]:
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    return line_start, len(text) if line_end < 0 else line_end


def _own_line(text: str, entry: Entry) -> bool:
    """Whether the entry starts its line (else it shares a line with what precedes it)."""
    line_start, _ = _line_bounds(text, entry.start, entry.end)
    return not text[line_start : entry.start].strip()


def _indent(text: str, entry: Entry) -> str:
    line_start, _ = _line_bounds(text, entry.start, entry.end)
    prefix = text[line_start : entry.start]
    return prefix if not prefix.strip() else ""


def _insert_after(text: str, anchor: Entry, snippet: str) -> str:
    """``snippet`` after ``anchor``, on a line of its own if the anchor has one."""
    _, line_end = _line_bounds(text, anchor.start, anchor.end)
    rest = text[anchor.end : line_end].strip()
    if _own_line(text, anchor) and (not rest or rest.startswith("#")):
        # On the next line (after a comment trailing the anchor), indented as the anchor.
        indent = _indent(text, anchor)
        lines = "\n".join(indent + line for line in snippet.splitlines())
        return text[:line_end] + "\n" + lines + text[line_end:]
    return text[: anchor.end] + " " + snippet + text[anchor.end :]


def _remove(text: str, entry: Entry) -> str:
    """Delete an entry: its whole line(s) when it has them to itself (a comment trailing
    it goes too: it annotated this entry), else the entry and the spaces after it."""
    line_start, line_end = _line_bounds(text, entry.start, entry.end)
    before, after = text[line_start : entry.start], text[entry.end : line_end]
    if not before.strip() and (not after.strip() or after.lstrip().startswith("#")):
        return text[:line_start] + text[min(line_end + 1, len(text)) :]
    stop = entry.end
    while stop < line_end and text[stop] in " \t,;":
        stop += 1
    return text[: entry.start] + text[stop:]


def _replace(text: str, start: int, end: int, new: str) -> str:
    return text[:start] + new + text[end:]


# --- edits ------------------------------------------------------------------------------


def _policy_text(versions: Iterable[int], multiline: bool, indent_unit: str) -> str:
    ordered = sorted(set(versions))
    if not multiline:
        inner = " ".join(f"versions: {v}" for v in ordered)
        return f"model_version_policy {{ specific {{ {inner} }} }}"
    lines = ["model_version_policy {", f"{indent_unit}specific {{"]
    lines += [f"{indent_unit * 2}versions: {v}" for v in ordered]
    return "\n".join([*lines, f"{indent_unit}}}", "}"])


def set_specific_versions(text: str, model: str, versions: Iterable[int]) -> str:
    """Make the model's policy ``specific { versions: ... }`` with exactly ``versions``.

    An existing specific policy keeps its layout: only the ``versions`` entries that
    change are added or removed. Any other policy (or none) is replaced by a specific one
    written in the style of the block it replaces.
    """
    wanted = sorted(set(versions))
    if not wanted or min(wanted) < 0:
        raise ConfigError(f"a specific version policy needs versions of 0 or more, got {wanted}")
    config = find_model(text, model)
    policy = config.field("model_version_policy")
    specific = policy.field("specific") if policy is not None else None
    entries = specific.fields("versions") if policy is not None and specific is not None else []
    if entries:
        present = {int(e.value.text) for e in entries if e.value is not None}
        for version in sorted(set(wanted) - present, reverse=True):
            text = _insert_after(text, entries[-1], f"versions: {version}")
        for entry in reversed(_versions_entries(text, model)):
            if entry.value is not None and int(entry.value.text) not in wanted:
                text = _remove(text, entry)
        return text
    unit = _indent_unit(text)
    if policy is not None:
        multiline = "\n" in text[policy.start : policy.end]
        block = _policy_text(wanted, multiline, unit)
        if multiline:
            indent = _indent(text, policy)
            block = block.replace("\n", "\n" + indent)
        return _replace(text, policy.start, policy.end, block)
    last = config.children[-1] if config.children else None
    if last is None:
        raise ConfigError(f"{MODELS_CONFIG}: config of {model!r} is empty")
    return _insert_after(text, last, _policy_text(wanted, _own_line(text, last), unit))


def _versions_entries(text: str, model: str) -> list[Entry]:
    policy = find_model(text, model).field("model_version_policy")
    specific = policy.field("specific") if policy is not None else None
    return specific.fields("versions") if specific is not None else []


def _indent_unit(text: str) -> str:
    """The file's indentation step (two spaces when it shows none)."""
    widths = sorted(
        {len(line) - len(line.lstrip(" ")) for line in text.splitlines() if line.startswith(" ")}
    )
    return " " * (widths[0] if widths else 2)


def set_labels(text: str, model: str, labels: Mapping[str, int]) -> str:
    """Make the model's version_labels exactly ``labels``: changed values are rewritten in
    place, new labels go after the last label (or the last entry), dropped ones leave."""
    config = find_model(text, model)
    entries = config.fields("version_labels")
    seen: set[str] = set()
    # Right to left, so earlier spans stay valid.
    for entry in sorted(entries, key=lambda e: e.start, reverse=True):
        key_entry, value_entry = entry.field("key"), entry.field("value")
        key = _string(key_entry.value) if key_entry is not None else ""
        if key not in labels:
            text = _remove(text, entry)
            continue
        seen.add(key)
        if value_entry is None or value_entry.value is None:
            raise ConfigError(f"{MODELS_CONFIG}: version label {key!r} of {model!r} has no value")
        if int(value_entry.value.text) != labels[key]:
            tok = value_entry.value
            text = _replace(text, tok.start, tok.end, str(labels[key]))
    for key, version in labels.items():
        if key in seen:
            continue
        config = find_model(text, model)
        current = config.fields("version_labels")
        anchor = current[-1] if current else (config.children or (None,))[-1]
        if anchor is None:
            raise ConfigError(f"{MODELS_CONFIG}: config of {model!r} is empty")
        text = _insert_after(text, anchor, f'version_labels {{ key: "{key}" value: {version} }}')
    return text


def merge_config(current: str, new: str, repository: Path) -> str:
    """``new`` (a whole config, e.g. from HandleReloadConfigRequest) written over
    ``current``: when both configure the same models with the same base paths and only
    specific policies or labels differ, those entries are edited in ``current`` (its
    comments stay); otherwise ``new`` replaces it whole. Raises ConfigError for an
    invalid ``new``."""
    wanted = parse_models_config(new, repository)
    try:
        have = parse_models_config(current, repository)
    except ConfigError:
        return new
    if [(c.name, c.base_path) for c in have] != [(c.name, c.base_path) for c in wanted]:
        return new
    text = current
    for old, config in zip(have, wanted, strict=True):
        policy_old = (old.policy, old.num_versions, old.versions)
        if policy_old != (config.policy, config.num_versions, config.versions):
            if config.policy != "specific":
                return new
            text = set_specific_versions(text, config.name, config.versions)
        if dict(old.labels) != dict(config.labels):
            text = set_labels(text, config.name, config.labels)
    if parse_models_config(text, repository) != wanted:  # the edit must mean exactly ``new``
        return new
    return text


# --- validation and writing ---------------------------------------------------------------


def validate(text: str, repository: Path) -> list[ModelConfig]:
    """Parse ``text`` as TF Serving would (ModelServerConfig) plus the gateway's checks;
    raises ConfigError naming the problem."""
    return parse_models_config(text, repository)


def write_atomically(path: Path, text: str) -> None:
    """Write beside ``path`` and rename over it: readers see the old file or the new one.
    A linked ``path`` is written where it points (the rename replaced the link itself
    with a file, and its target kept the old text)."""
    path = Path(os.path.realpath(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        if path.exists():
            was = path.stat()
            os.chmod(tmp, was.st_mode & 0o7777)
            # And its owner, where this user may set it (root may: promote run as root
            # left a 640 models.config the image's user 10001 could no longer read).
            with contextlib.suppress(PermissionError):
                os.chown(tmp, was.st_uid, was.st_gid)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def editing(directory: Path) -> Iterator[bool]:
    """Hold the folder's edit lock (flock on the folder itself: models.config is replaced
    by a rename, so a lock on the file would not outlive the first write, and no lock
    file is left in a repository TF Serving reads). Yields False, holding nothing, when
    another process holds it."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock
