"""The model repository on disk: TF Serving's config files and version folders.

Only reading happens here; what is loaded in memory lives in the registry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeVar, cast

import numpy.typing as npt
from google.protobuf import message, text_format

from service.errors import ConfigError, ModelLoadError
from service.proto_gen import tfserving_config_pb2
from service.proto_gen.tensorflow_serving.config import model_server_config_pb2
from service.warmup import warmup_inputs

MODELS_CONFIG = "models.config"
BATCHING_CONFIG = "batching.config"
MONITORING_CONFIG = "monitoring.config"
# Inside a version folder, beside saved_model.pb (TF Serving's own convention).
ASSETS_EXTRA = "assets.extra"
LABELS_FILE = "labels.txt"
CARD_FILE = "model_card.json"
WARMUP_FILE = "tf_serving_warmup_requests"

log = logging.getLogger(__name__)

M = TypeVar("M", bound=message.Message)


def read_config_text(path: Path) -> str:
    """A config file's text. One that is missing, cannot be read (permissions, a folder
    in its place) or is not UTF-8 text raises ConfigError naming it and the problem, as
    one that does not parse does: every caller handles that one (the poller keeps the
    models serving, start-up says it in one line, the CLIs too)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror or exc}") from None


def parse_text_proto(path: Path, message_type: type[M]) -> M:
    """Parse a text-protobuf file strictly: unknown fields and wrong types fail; a file
    that cannot be read fails as :func:`read_config_text` says."""
    return parse_text(read_config_text(path), message_type, path)


def parse_text(text: str, message_type: type[M], where: Path | str) -> M:
    """``text`` as a ``message_type`` text protobuf, strictly; ConfigError naming
    ``where`` when it does not parse."""
    try:
        return cast(M, text_format.Parse(text, message_type()))
    except text_format.ParseError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_models_config(repository: Path) -> model_server_config_pb2.ModelServerConfig:
    return read_models_config(repository)[1]


def read_models_config(repository: Path) -> tuple[str, model_server_config_pb2.ModelServerConfig]:
    """models.config's text, and the config it holds (:func:`models_config`)."""
    path = repository / MODELS_CONFIG
    text = read_config_text(path)
    return text, models_config(text, path)


def models_config(text: str, where: Path | str) -> model_server_config_pb2.ModelServerConfig:
    """models.config ``text`` parsed strictly (unknown fields and wrong types fail) and
    checked (:func:`check_models_config`); raises ConfigError naming ``where``."""
    config = parse_text(text, model_server_config_pb2.ModelServerConfig, where)
    check_models_config(config, where)
    return config


# Unicode categories of characters a name may not hold: controls, format characters
# (bidi overrides, zero-width), and line and paragraph separators (line breaks to
# str.splitlines and to log viewers).
_UNPRINTABLE = frozenset({"Cc", "Cf", "Zl", "Zp"})


def check_models_config(config: Any, where: Path | str) -> None:
    """What TF Serving also refuses: no model list, or names missing or repeated."""
    if config.WhichOneof("config") != "model_config_list":
        raise ConfigError(f"{where}: needs a model_config_list")
    names = [c.name for c in config.model_config_list.config]
    if not names:
        raise ConfigError(f"{where}: model_config_list configures no model; add a config {{ }}")
    if len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"{where}: model names must be unique and non-empty")
    for name in names:
        # A name is written into log lines and URLs: a newline in one forged log lines
        # (HandleReloadConfigRequest took "a\0b\n}" and served it; an outside audit).
        if any(unicodedata.category(c) in _UNPRINTABLE for c in name):
            raise ConfigError(
                f"{where}: model name {name!r} holds a control character (a newline, a "
                "NUL, a line separator, a bidi override, ...); name models with printable "
                "characters"
            )


def tf_serving_objections(config: model_server_config_pb2.ModelServerConfig) -> list[str]:
    """What TF Serving refuses in a models.config (:func:`models_config`) while the
    gateway serves it, each a sentence naming the model and the fix: no model_platform,
    and a base_path that is empty or relative (no flag of the stack's sets TF Serving's
    root for them).
    The gateway reads them as <repository>/<name> and <repository>/<path>, so a
    repository that served locally failed TF Serving's start in the stack (docker/)
    with its "Illegal setting neither ... model_platform" or "Expected model m to have
    an absolute path or URI"."""
    found = []
    for model in config.model_config_list.config:
        if not model.model_platform and not model.model_type:
            found.append(
                f"model {model.name!r} names no model_platform, which TF Serving refuses "
                '("Illegal setting neither ... model_platform"); add model_platform: '
                '"tensorflow"'
            )
        path = model.base_path
        if "://" not in path and not PurePosixPath(path).is_absolute():
            given = f"a relative base_path {path!r}" if path else "no base_path"
            found.append(
                f"model {model.name!r} has {given}, which TF Serving refuses (it needs an "
                f'absolute path or URI); write base_path: "/models/{path or model.name}", '
                "which the gateway reads as the same folder"
            )
    return found


def rest_unnamed_models(config: model_server_config_pb2.ModelServerConfig) -> list[str]:
    """A sentence for each model with "/" in its name, which ends a name in REST URLs
    (TF Serving's /v1/models/([^/:]+), and the gateway's routes). TF Serving serves such
    a model over gRPC only; the gateway over gRPC and POST /v1/classify?model=NAME: its
    status, metadata, :predict and :classify answered "no route" for "team/shoes", with
    no word at load."""
    return [
        f"model {model.name!r} has '/' in its name, which ends a model's name in REST "
        "URLs (TF Serving's /v1/models/<name> and the gateway's): it is served over gRPC "
        "and by POST /v1/classify?model=<name> only; rename it without '/' to reach it "
        "over REST"
        for model in config.model_config_list.config
        if "/" in model.name
    ]


def parse_models_config(text: str, repository: Path) -> list[ModelConfig]:
    """models.config ``text`` (not yet on disk) as :func:`read_repository` would read it:
    strict text protobuf, then the same checks; raises ConfigError."""
    return model_configs(repository, models_config(text, repository / MODELS_CONFIG))


def model_configs(repository: Path, config: Any) -> list[ModelConfig]:
    """Every model ``config`` (a ModelServerConfig) configures, in its order, with its
    paths resolved in ``repository``; raises ConfigError for what is not served."""
    return [_model_config(repository, c) for c in config.model_config_list.config]


def load_batching_parameters(repository: Path) -> tfserving_config_pb2.BatchingParameters:
    return parse_text_proto(repository / BATCHING_CONFIG, tfserving_config_pb2.BatchingParameters)


def load_monitoring_config(repository: Path) -> tfserving_config_pb2.MonitoringConfig:
    return parse_text_proto(repository / MONITORING_CONFIG, tfserving_config_pb2.MonitoringConfig)


def resolve_base_path(repository: Path, name: str, base_path: str) -> Path:
    """A path under `/models` (written for the TF Serving container, which has the
    repository mounted there) is the same path under the repository: `/models/<name>`
    is `<repository>/<name>`, `/models/team/shoes` is `<repository>/team/shoes`, as TF
    Serving reads them. An empty one is `<repository>/<name>`; other absolute paths are
    used as they are, relative ones are repository-relative (TF Serving refuses those
    two: :func:`tf_serving_objections`)."""
    if not base_path:
        return repository / name
    posix = PurePosixPath(base_path)
    if posix.is_absolute() and posix.parts[:2] == ("/", "models"):
        return repository.joinpath(*posix.parts[2:])
    path = Path(base_path)
    return path if path.is_absolute() else repository / path


# TF Serving's version numbers are int64: a folder named beyond that is not a version
# (as there, it is ignored), and could not be named in a gRPC ModelSpec or status.
MAX_VERSION = 2**63 - 1


def version_number(name: str) -> int | None:
    """The version a folder name or URL path segment writes: ASCII digits only ("1.0" and
    "¹" are not) naming an int64, 0 included (TF Serving's rule); else None. The length
    is checked first: int() of 4,301 digits raises."""
    if not (name.isascii() and name.isdigit()) or len(name) > 19 or int(name) > MAX_VERSION:
        return None
    return int(name)


def version_dirs(model_dir: Path) -> dict[int, Path]:
    """Published versions: folders named by a version number (temp folders are hidden).
    Two folders of one number ("16" and "0016") are one version: its plain name wins,
    else the first by name, and the other is named in a warning (once). The folder's
    order on disk decided before, silently, and a restart could pick the other one."""
    if not model_dir.is_dir():
        return {}
    found: dict[int, list[Path]] = {}
    for path in model_dir.iterdir():
        number = version_number(path.name)
        if number is not None and path.is_dir():
            found.setdefault(number, []).append(path)
        elif number is not None and path not in _TOLD_NOT_FOLDER:
            # A file, a link to nothing or a link loop: ignored, as before, but said
            # (it was said nowhere, where an empty folder is a version that fails).
            _TOLD_NOT_FOLDER.add(path)
            log.warning(
                "%s names version %d but is not a folder (a file, or a link to none); "
                "it is ignored: publish a version as a folder",
                path,
                number,
            )
    chosen = {}
    for number, paths in found.items():
        paths.sort(key=lambda p: (p.name != str(number), p.name))
        chosen[number] = paths[0]
        if len(paths) > 1 and (ignored := tuple(paths[1:])) not in _TOLD_SAME_NUMBER:
            _TOLD_SAME_NUMBER.add(ignored)
            log.warning(
                "%s: folders %s also name version %d; %s is the one a load of it reads, "
                "the others are ignored (a copy of the version loaded already from one of "
                "them serves on, as in TF Serving, until a restart loads %s): rename or "
                "remove them",
                model_dir,
                ", ".join(p.name for p in ignored),
                number,
                paths[0].name,
                paths[0].name,
            )
    return chosen


_TOLD_SAME_NUMBER: set[tuple[Path, ...]] = set()
_TOLD_NOT_FOLDER: set[Path] = set()


# --- what models.config asks for ---------------------------------------------------------

VersionPolicy = Literal["latest", "specific", "all"]
# Stats that change when a version folder is rewritten; a failed load is retried only
# when they differ (TF Serving never retries; a fixed folder should not need a restart).
Fingerprint = tuple[int | str, ...]


@dataclass(frozen=True)
class ModelConfig:
    """One `config { ... }` of models.config, with its base path resolved on this disk."""

    name: str
    base_path: Path
    policy: VersionPolicy = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()
    labels: Mapping[str, int] = field(default_factory=dict)

    def wanted_versions(self, available: Iterable[int]) -> set[int]:
        """The versions to serve among those on disk, as TF Serving's version policy says:
        the newest ``num_versions``, the listed ones that exist, or all of them."""
        present = set(available)
        if self.policy == "all":
            return present
        if self.policy == "specific":
            return present & set(self.versions)
        return set(sorted(present)[-self.num_versions :]) if present else set()

    def would_serve(self, version: int, on_disk: Iterable[int]) -> bool:
        """Whether the policy serves ``version`` once its folder is among ``on_disk``
        (whether it is there yet or not)."""
        return version in self.wanted_versions({*on_disk, version})


def _model_config(repository: Path, proto: Any) -> ModelConfig:
    """ModelConfig of one proto entry (typed Any: the TF Serving protos have no stubs)."""
    where = f"{repository / MODELS_CONFIG}: model {proto.name!r}"
    if proto.model_platform not in ("", "tensorflow"):
        raise ConfigError(
            f"{where}: model_platform is {proto.model_platform!r}; only "
            "'tensorflow' (SavedModel) is served"
        )
    choice = proto.model_version_policy.WhichOneof("policy_choice")
    policy = cast(VersionPolicy, choice or "latest")  # no policy = TF Serving's latest 1
    versions = tuple(int(v) for v in proto.model_version_policy.specific.versions)
    if policy == "specific" and not versions:
        raise ConfigError(f"{where}: a specific version policy needs at least one version")
    labels = {str(k): int(v) for k, v in proto.version_labels.items()}
    bad = sorted(k for k, v in labels.items() if v < 0 or not k)
    if bad:
        raise ConfigError(f"{where}: version_labels {bad} need a name and a version of 0 or more")
    return ModelConfig(
        name=proto.name,
        base_path=resolve_base_path(repository, proto.name, proto.base_path),
        policy=policy,
        # TF Serving serves at least one version when num_versions is unset (0).
        num_versions=max(int(proto.model_version_policy.latest.num_versions), 1),
        versions=versions,
        labels=labels,
    )


def repeated_labels(text: str) -> list[str]:
    """The version labels a models.config ``text`` (that parses) gives twice for one
    model, each as "model 'm': label 'canary' is given as 1, then 2 (2 counts)". Its
    map keeps the last one, as TF Serving's does, without a word: a hand edit that
    added a label's new line and kept the old one (an outside audit, 12-07). Read from
    the tokens, since the parsed map has kept only one."""
    tokens = text_format.Tokenizer(text.splitlines())
    blocks: list[str] = []  # the field names of the blocks the tokens are in
    field, after_colon = "", False
    model = ""
    given: dict[str, str] = {}  # this model's labels so far: name -> version
    entry: dict[str, str] = {}  # the version_labels block being read
    found: list[str] = []
    while not tokens.AtEnd():
        token = tokens.token
        if token in ("{", "<"):
            blocks.append(field)
            if field == "config":
                model, given = "", {}
            entry, after_colon = {}, False
            tokens.NextToken()
        elif token in ("}", ">"):
            closed = blocks.pop() if blocks else ""
            if closed == "version_labels" and "key" in entry:
                key, value = entry["key"], entry.get("value", "0").lstrip("0") or "0"
                if key in given and given[key] != value:
                    found.append(
                        f"model {model!r}: label {key!r} is given as {given[key]}, then "
                        f"{value} ({value} counts)"
                    )
                given[key] = value
            tokens.NextToken()
        elif token == ":":
            after_colon = True
            tokens.NextToken()
        elif after_colon or token[:1] in "\"'":
            value = tokens.ConsumeString() if token[:1] in "\"'" else token
            if token[:1] not in "\"'":
                tokens.NextToken()
            if blocks[-1:] == ["version_labels"]:
                entry[field] = value
            elif blocks[-1:] == ["config"] and field == "name":
                model = value
            after_colon = False
        else:
            field = token
            tokens.NextToken()
    return found


def read_repository(repository: Path) -> list[ModelConfig]:
    """Every model models.config configures, in file order: the first is the default."""
    return model_configs(repository, load_models_config(repository))


class ModelsConfigReader:
    """:func:`read_repository` for a poll: models.config is parsed again only when its
    stat changes (an edit in place, a rename over it, a chmod). A 50 MB file that parses
    was parsed on every poll, in every worker: 3 s of CPU in 10, and requests' p99 from
    10 to 71 ms (an outside review). A refusal is kept too, and raised again."""

    def __init__(self) -> None:
        self._last: tuple[tuple[int, ...], list[ModelConfig] | ConfigError] | None = None
        self._said: list[str] = []  # the problems last said (_say_problems)

    def read(self, repository: Path) -> list[ModelConfig]:
        try:
            st = (repository / MODELS_CONFIG).stat()
        except OSError:
            return read_repository(repository)  # its error says what is wrong
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)
        if self._last is not None and self._last[0] == key:
            result = self._last[1]
            if isinstance(result, ConfigError):
                raise result.with_traceback(None)  # not the frames of every poll since
            return result
        # A file changed within the clock's tick of this read could change again with
        # the same stat (file times are coarse): kept only once it is older than that.
        settled = time.time() - max(st.st_mtime, st.st_ctime) > SETTLED_SECONDS
        try:
            text, config = read_models_config(repository)
            configs = model_configs(repository, config)
        except ConfigError as exc:
            self._last = (key, exc) if settled else None
            raise
        self._last = (key, configs) if settled else None
        self._say_problems(repository / MODELS_CONFIG, text, config)
        return configs

    def _say_problems(self, path: Path, text: str, config: Any) -> None:
        """A WARNING for each label the file (``text``, read as ``config``) gives twice,
        for each thing in it TF Serving refuses (:func:`tf_serving_objections`), and
        for each model REST cannot name (:func:`rest_unnamed_models`), once per change
        of them: the text and config just read, not the file again."""
        problems = [f"{p}; give each label once" for p in repeated_labels(text)]
        problems += tf_serving_objections(config)
        problems += rest_unnamed_models(config)
        for problem in problems:
            if problem not in self._said:
                log.warning("%s: %s", path, problem)
        self._said = problems


# How old models.config's stat must be for ModelsConfigReader to trust it unchanged.
SETTLED_SECONDS = 1.0


def version_fingerprint(version_dir: Path) -> Fingerprint:
    """Relative path, size, mtime and mode of the folder, of each entry in it and of each
    entry in the folders a load reads (variables/, assets.extra/), in name order
    ((0, 0) for a folder that is missing).

    A version that failed for its labels.txt (or any file a load reads) is retried once
    that file is fixed in place, which a folder's own mtime does not show; one that
    failed for permissions is retried once they are fixed (chmod changes the mode and
    ctime, not the size or mtime). Other folders count by their own entry only: a
    version folder's docs/ of hundreds of files cost a sorted walk every poll, in every
    worker (6x the idle CPU for 50 such versions), and filled the cap before
    assets.extra/ was reached. At most MAX_FINGERPRINT_ENTRIES entries a folder.
    """
    try:
        st = version_dir.stat()
    except OSError:
        return (0, 0)
    stats: list[int | str] = [st.st_mtime_ns, st.st_size, st.st_mode]
    for relative, entry in _entries(version_dir):
        try:
            st = entry.stat(follow_symlinks=True)
        except OSError:  # gone or dangling since listed: still a change to notice
            stats += [relative, 0, 0, 0]
        else:
            stats += [relative, st.st_mtime_ns, st.st_size, st.st_mode]
    return tuple(stats)


# A version folder without assets.extra/labels.txt is loaded only once nothing in it has
# changed for this long (see unsettled).
SETTLE_SECONDS = 5.0
# One with its labels, once none of its files changed for this long: a copy that writes
# assets.extra first (rsync and cp -r go in name order) is still writing the rest.
QUIET_SECONDS = 2.0


def settle_window(labelled: bool) -> float:
    """How long a version folder must be unchanged before it loads (see unsettled)."""
    return QUIET_SECONDS if labelled else SETTLE_SECONDS


def unsettled(version_dir: Path, *, quiet: bool = True) -> float | None:
    """Seconds since ``version_dir`` last changed, while a copy into it may still be in
    progress: it has no assets.extra/labels.txt and changed less than SETTLE_SECONDS
    ago, or (``quiet``) one of its files changed less than QUIET_SECONDS ago; else None.

    Copied in file by file, a version was loaded as soon as its SavedModel was in, before
    its assets.extra: it served class indices ("label": "1") and default preprocessing
    for good, even once its labels.txt was there (an outside review: 3 s between the two
    copies). Copied in name order (assets.extra, labels and all, first), it was loaded at
    every poll while the rest came: one copy, 24 failed loads ("no saved_model.pb", a
    half-written model card, "variables/ is missing"), and once it was served from a
    half-written variables.index (an outside audit, 12-07). A version renamed into place
    whole (`cnnserve train`) waits until its files are QUIET_SECONDS old; one that never
    has labels (a foreign SavedModel) waits the settle time once. Changes are read from
    ctimes as well as mtimes: `cp -a` and rsync give files their source's old mtime, but
    the ctime of that very change. The folder's own times count only without labels: a
    rename into place changes them, not its files'."""
    labelled = os.path.lexists(version_dir / ASSETS_EXTRA / LABELS_FILE)  # any file
    if labelled and not quiet:
        return None
    try:
        st = version_dir.stat()
    except OSError:
        return None
    newest = -math.inf if labelled else max(st.st_mtime, st.st_ctime)
    for _, entry in _entries(version_dir):
        with contextlib.suppress(OSError):
            st = entry.stat(follow_symlinks=False)
            newest = max(newest, st.st_mtime, st.st_ctime)
    age = time.time() - newest
    window = settle_window(labelled)
    # A clock ahead on a network file system: not held back for as long as it is ahead.
    return age if -window < age < window else None


MAX_FINGERPRINT_ENTRIES = 256
LOADED_FOLDERS = ("assets.extra", "variables")  # what a load reads besides the .pb files


def _entries(folder: Path) -> list[tuple[str, os.DirEntry[str]]]:
    """The entries of ``folder`` and of its LOADED_FOLDERS, by relative path."""
    found = _listing(folder, "")
    for name in LOADED_FOLDERS:
        found += _listing(folder / name, name + "/")
    return sorted(found, key=lambda item: item[0])


def _listing(folder: Path, prefix: str) -> list[tuple[str, os.DirEntry[str]]]:
    try:
        with os.scandir(folder) as entries:
            listed = sorted(entries, key=lambda e: e.name)
    except OSError:
        return []
    return [(prefix + e.name, e) for e in listed[:MAX_FINGERPRINT_ENTRIES]]


# --- what a version folder carries beside the SavedModel --------------------------------


def read_labels(version_dir: Path, num_classes: int) -> list[str]:
    """Class names from labels.txt (one per line), else the class indices "0".."C-1".

    A file with the wrong number of names would label every answer wrongly, so it fails
    the load instead of being served.
    """
    path = version_dir / ASSETS_EXTRA / LABELS_FILE
    try:
        # utf-8-sig: a BOM (as Windows editors write) is not part of the first label.
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except FileNotFoundError:
        return [str(i) for i in range(num_classes)]
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) != num_classes:
        raise ModelLoadError(
            f"{path} has {len(lines)} labels (empty lines count) but the model outputs "
            f"{num_classes} classes; write one non-empty label per class, in class order"
        )
    if not all(lines):
        blank = lines.index("") + 1
        raise ModelLoadError(
            f"{path}: line {blank} is empty (or spaces only); write one non-empty label "
            "per class, in class order"
        )
    return lines


def load_card(version_dir: Path) -> dict[str, Any]:
    """The version's model_card.json, or {} when it has none (foreign SavedModels).

    A card that is there but cannot be read, is not JSON or not a JSON object raises
    ModelLoadError: the preprocessing, labels and artifact records a load follows come
    from it, and defaults in their place would be silently wrong for a model whose card
    differs from them.
    """
    path = version_dir / ASSETS_EXTRA / CARD_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        return {}
    except PermissionError as exc:
        try:  # the version folder itself, when it is the one that may not be read
            os.listdir(version_dir)
        except OSError as folder:
            raise ModelLoadError(
                f"{version_dir}: cannot read the version folder: {folder.strerror or folder}"
            ) from None
        raise ModelLoadError(f"{path}: unreadable model card: {exc}") from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise ModelLoadError(f"{path}: unreadable model card: {exc}") from None
    if not isinstance(card, dict):
        kind = type(card).__name__
        raise ModelLoadError(f"{path}: the model card is a JSON {kind}, not an object")
    return card


def read_card(version_dir: Path) -> dict[str, Any]:
    """:func:`load_card` for readers that only show or consult a card (status pages,
    verify, benchmarks): an unreadable one is logged and read as {} instead of raising.
    Loading a version uses load_card, so such a version never serves."""
    try:
        return load_card(version_dir)
    except ModelLoadError as exc:
        log.warning("ignoring %s", exc)
        return {}


def read_warmup(version_dir: Path) -> list[dict[str, npt.NDArray[Any]]]:
    """Named inputs of the serving_default requests in the version's warmup records, in
    file order; [] when it has none. Raises WarmupFormatError for a corrupt file."""
    return warmup_inputs(version_dir / ASSETS_EXTRA / WARMUP_FILE)
