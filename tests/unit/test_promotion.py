"""`cnnserve promote`'s config edits: surgical (comments kept), validated, in safe steps."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

import pytest

from service.config_edit import (
    find_model,
    merge_config,
    set_labels,
    set_specific_versions,
    validate,
    write_atomically,
)
from service.errors import ConfigError, PromotionError, VersionFailedToLoad
from service.promotion import Step, plan, promote
from service.repository import read_repository

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "model_repository" / "models.config"

CANARY_FILE = """\
# Our models. This comment must survive every edit.
model_config_list {
  config {
    name: "other"   # a second model, never touched
    base_path: "/models/other"
    model_platform: "tensorflow"
  }
  config {
    name: "m"
    base_path: "/models/m"
    model_platform: "tensorflow"
    # Pinned versions; see the runbook.
    model_version_policy {
      specific {
        versions: 1
      }
    }
    version_labels { key: "stable" value: 1 }  # the one customers get
    version_labels { key: "canary" value: 1 }
  }
}
"""


def configs(text: str, tmp_path: Path) -> dict[str, tuple[str, tuple[int, ...], dict[str, int]]]:
    return {c.name: (c.policy, c.versions, dict(c.labels)) for c in validate(text, tmp_path)}


def comments(text: str) -> list[str]:
    return [line.split("#", 1)[1] for line in text.splitlines() if "#" in line]


def test_edits_touch_only_the_entries_that_change(tmp_path: Path) -> None:
    text = set_specific_versions(CANARY_FILE, "m", [1, 2])
    assert "        versions: 1\n        versions: 2\n" in text
    text = set_labels(text, "m", {"stable": 1, "canary": 2})
    assert 'version_labels { key: "canary" value: 2 }' in text
    assert 'version_labels { key: "stable" value: 1 }  # the one customers get' in text
    assert comments(text) == comments(CANARY_FILE)
    # The other model and every line outside m's policy and labels are unchanged.
    assert text.splitlines()[:12] == CANARY_FILE.splitlines()[:12]
    assert configs(text, tmp_path) == {
        "other": ("latest", (), {}),
        "m": ("specific", (1, 2), {"stable": 1, "canary": 2}),
    }


def test_a_one_line_config_stays_on_one_line(tmp_path: Path) -> None:
    one = (
        'model_config_list {\nconfig { name: "m" base_path: "/models/m" '
        'model_platform: "tensorflow" model_version_policy { latest { num_versions: 1 } } }\n}\n'
    )
    text = set_labels(set_specific_versions(one, "m", [1, 2]), "m", {"stable": 2})
    assert text.count("\n") == one.count("\n")
    assert (
        "model_version_policy { specific { versions: 1 versions: 2 } } "
        'version_labels { key: "stable" value: 2 } }' in text
    )
    assert configs(text, tmp_path)["m"] == ("specific", (1, 2), {"stable": 2})


def test_the_committed_default_config_gets_a_multi_line_specific_policy(tmp_path: Path) -> None:
    original = DEFAULT_CONFIG.read_text()
    text = set_specific_versions(original, "fashion_mnist", [1, 2])
    assert "    model_version_policy {\n      specific {\n        versions: 1\n" in text
    assert comments(text) == comments(original)
    assert configs(text, tmp_path)["fashion_mnist"] == ("specific", (1, 2), {})


def test_the_scanner_is_not_fooled_by_braces_in_strings_and_comments(tmp_path: Path) -> None:
    tricky = CANARY_FILE.replace("# Our models.", '# Our models { config { name: "m" } }').replace(
        'name: "other"', 'name: "other}{ \\"m\\""'
    )
    entry = find_model(tricky, "m")
    assert tricky[entry.start : entry.end].startswith('config {\n    name: "m"')
    with pytest.raises(ConfigError, match="no config"):
        find_model(tricky, "missing")


def test_promote_canary_then_stable_steps_and_their_intermediate_configs(tmp_path: Path) -> None:
    steps = plan(CANARY_FILE, tmp_path, "m", 2, "canary", on_disk=[1, 2])
    assert [(s.name, s.changed) for s in steps] == [
        ("load", True),
        ("label", True),
        ("drop", False),
    ]
    # Step 1 serves version 2 and moves no label: TF Serving accepts it as is.
    assert configs(steps[0].text, tmp_path)["m"] == (
        "specific",
        (1, 2),
        {"stable": 1, "canary": 1},
    )
    assert configs(steps[1].text, tmp_path)["m"] == (
        "specific",
        (1, 2),
        {"stable": 1, "canary": 2},
    )
    # Version 1 stays: stable still points at it.
    assert steps[2].text == steps[1].text

    steps = plan(steps[-1].text, tmp_path, "m", 2, "stable", on_disk=[1, 2])
    assert [(s.name, s.changed) for s in steps] == [
        ("load", False),
        ("label", True),
        ("drop", True),
    ]
    assert configs(steps[1].text, tmp_path)["m"] == (
        "specific",
        (1, 2),
        {"stable": 2, "canary": 2},
    )
    assert configs(steps[2].text, tmp_path)["m"] == ("specific", (2,), {"stable": 2, "canary": 2})
    assert "versions: 1" not in steps[2].text.split('name: "m"')[1]
    assert comments(steps[2].text) == comments(CANARY_FILE)


def test_a_label_on_a_latest_policy_pins_its_version(tmp_path: Path) -> None:
    latest = DEFAULT_CONFIG.read_text()
    # latest 1 of {1, 2} serves 2, but publishing 3 would unload it: the policy pins {2}.
    steps = plan(latest, tmp_path, "fashion_mnist", 2, "canary", on_disk=[1, 2])
    assert [s.changed for s in steps] == [True, True, False]
    assert configs(steps[0].text, tmp_path)["fashion_mnist"] == ("specific", (2,), {})
    # Version 1 is added to the pinned policy.
    steps = plan(steps[-1].text, tmp_path, "fashion_mnist", 1, "stable", on_disk=[1, 2])
    assert configs(steps[0].text, tmp_path)["fashion_mnist"] == (
        "specific",
        (2, 1),
        {"canary": 2},
    )
    assert configs(steps[-1].text, tmp_path)["fashion_mnist"] == (
        "specific",
        (2, 1),
        {"canary": 2, "stable": 1},
    )


def test_a_latest_policy_pins_what_the_server_serves_not_the_newest_folders(
    tmp_path: Path,
) -> None:
    """{20, 21, 22} on disk, 22 broken, so latest 1 serves 21: promoting 20 pinned
    {20, 22}, which unloaded the serving 21 and kept the broken 22 in the policy."""
    latest = DEFAULT_CONFIG.read_text()
    steps = plan(latest, tmp_path, "fashion_mnist", 20, "canary", [20, 21, 22], serving=[21])
    assert configs(steps[0].text, tmp_path)["fashion_mnist"] == (
        "specific",
        (20, 21),
        {"stable": 21},
    )
    # No server answered: the folders are all there is to go by.
    steps = plan(latest, tmp_path, "fashion_mnist", 20, "canary", [20, 21, 22])
    assert configs(steps[0].text, tmp_path)["fashion_mnist"] == (
        "specific",
        (20, 22),
        {"stable": 22},
    )


def test_a_canary_without_a_stable_label_pins_stable_to_what_is_served_first(
    tmp_path: Path,
) -> None:
    """Unlabelled requests go to `stable`, else to the newest version served: promoting
    a canary under the committed latest policy loaded it in step 1 and moved every
    unlabelled request to it, before its label did (an outside audit, 12-07). Step 1
    now labels the served version `stable` beside the load; promoting `stable` itself,
    or with a `stable` there already, labels nothing more."""
    latest = DEFAULT_CONFIG.read_text()
    steps = plan(latest, tmp_path, "fashion_mnist", 2, "canary", [1, 2], serving=[1])
    assert "label 'stable' → version 1, what unlabelled requests get now" in steps[0].summary
    assert configs(steps[0].text, tmp_path)["fashion_mnist"] == (
        "specific",
        (1, 2),
        {"stable": 1},
    )
    assert configs(steps[-1].text, tmp_path)["fashion_mnist"][2] == {"stable": 1, "canary": 2}
    # Undone, step 1 puts back the file as it was, label and all.
    assert steps[0].undo == latest
    steps = plan(latest, tmp_path, "fashion_mnist", 2, "stable", [1, 2], serving=[1])
    assert configs(steps[0].text, tmp_path)["fashion_mnist"][2] == {}
    again = plan(steps[-1].text, tmp_path, "fashion_mnist", 3, "canary", [1, 2, 3])
    assert configs(again[0].text, tmp_path)["fashion_mnist"][2] == {"stable": 2}
    # What the server serves decides, not the folders: 2 broken, 1 served.
    pinned = set_specific_versions(latest, "fashion_mnist", [1, 2])
    served = plan(pinned, tmp_path, "fashion_mnist", 3, "canary", [1, 2, 3], [1])
    assert configs(served[0].text, tmp_path)["fashion_mnist"][2] == {"stable": 1}
    # The version promoted is what unlabelled requests get already: nothing to pin.
    every = latest.replace("latest {\n        num_versions: 1\n      }", "all {}")
    assert "all {}" in every
    newest = plan(every, tmp_path, "fashion_mnist", 3, "canary", [1, 2, 3], [1, 2, 3])
    assert configs(newest[0].text, tmp_path)["fashion_mnist"][2] == {}
    older = plan(every, tmp_path, "fashion_mnist", 2, "canary", [1, 2, 3], [1, 2, 3])
    assert configs(older[0].text, tmp_path)["fashion_mnist"][2] == {"stable": 3}


class Recorder:
    """A Waiter that records what promote waited for; ``fail`` makes the load fail,
    ``slow`` the wait time out."""

    def __init__(self, events: list[str], fail: bool = False, slow: bool = False) -> None:
        self.events, self.fail, self.slow = events, fail, slow

    def available(self, model: str, version: int) -> None:
        self.events.append(f"wait {model} {version}")
        if self.fail:
            raise VersionFailedToLoad(f"{model} version {version} failed to load: broken")
        if self.slow:
            raise PromotionError(f"{model} version {version} is not AVAILABLE after 5s")

    def labelled(self, model: str, label: str, version: int) -> None:
        self.events.append(f"labelled {model} {label} {version}")


def test_promote_applies_each_step_and_waits_before_moving_the_label() -> None:
    steps = plan(CANARY_FILE, Path("/r"), "m", 2, "canary", on_disk=[1, 2])
    events: list[str] = []
    promote(
        steps,
        model="m",
        version=2,
        label="canary",
        apply=lambda text: events.append("apply " + configs_labels(text)),
        wait=Recorder(events),
        dry_run=False,
        out=io.StringIO(),
    )
    # The drop (if any) only once every worker answers the label with the new version.
    assert events[:4] == ["apply canary=1", "wait m 2", "apply canary=2", "labelled m canary 2"]


@pytest.mark.parametrize(
    ("waiter", "said"),
    [
        # It stayed in the policy (specific { ... 8 }) after every failed promote.
        (Recorder([], fail=True), "failed to load"),
        # Left in a specific policy, it would take every unlabelled request once it
        # loaded (the newest version served answers them), no label moved, no one waiting.
        (Recorder([], slow=True), "not AVAILABLE after"),
    ],
)
def test_a_version_not_seen_available_undoes_the_load_step(waiter: Recorder, said: str) -> None:
    steps = plan(CANARY_FILE, Path("/r"), "m", 3, "canary", on_disk=[1, 2, 3])
    assert steps[0].changed
    applied: list[str] = []
    out = io.StringIO()
    with pytest.raises(PromotionError, match=said):
        promote(
            steps,
            model="m",
            version=3,
            label="canary",
            apply=applied.append,
            wait=waiter,
            dry_run=False,
            out=out,
        )
    assert applied == [steps[0].text, CANARY_FILE]
    assert "step 1 undone" in out.getvalue()


def failed_promote(steps: list[Step], version: int, applied: list[str]) -> str:
    out = io.StringIO()
    with pytest.raises(PromotionError, match="failed to load"):
        promote(
            steps,
            model="m",
            version=version,
            label="canary",
            apply=applied.append,
            wait=Recorder([], fail=True),
            dry_run=False,
            out=out,
        )
    return out.getvalue()


def test_a_rerun_after_an_interrupted_promote_takes_the_broken_version_out_again() -> None:
    """An interrupted promote of a broken version left it in the policy (step 1 applied);
    the rerun the message asks for found it "already served", failed, and left it there
    for good."""
    interrupted = set_specific_versions(CANARY_FILE, "m", [1, 3])
    steps = plan(interrupted, Path("/r"), "m", 3, "canary", on_disk=[1, 2, 3])
    assert not steps[0].changed and "already served" in steps[0].summary
    applied: list[str] = []
    printed = failed_promote(steps, 3, applied)
    assert applied == [set_specific_versions(interrupted, "m", [1])]
    assert "version 3 taken out of the policy again" in printed
    # Not when a label points at it, or when it is all the policy serves: said, not done.
    labelled = set_labels(interrupted, "m", {"stable": 1, "canary": 3})
    for text, version in ((labelled, 3), (set_specific_versions(CANARY_FILE, "m", [4]), 4)):
        applied.clear()
        steps = plan(text, Path("/r"), "m", version, "canary", on_disk=[1, 2, 3, 4])
        assert "take it out by hand" in failed_promote(steps, version, applied)
        assert applied == []


def test_a_failure_left_from_before_is_believed_only_once_it_stands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service import promotion

    clock = [100.0]
    monkeypatch.setattr(promotion.time, "monotonic", lambda: clock[0])
    stale = promotion._Failure()
    stale.check("m", 6, "END", "variables/ is missing")  # the first answer: maybe old
    clock[0] += promotion.STALE_FAILURE_SECONDS - 1
    stale.check("m", 6, "END", "variables/ is missing")
    clock[0] += 2
    with pytest.raises(PromotionError, match="variables/ is missing"):
        stale.check("m", 6, "END", "variables/ is missing")
    retried = promotion._Failure()
    retried.check("m", 6, "END", "variables/ is missing")
    retried.check("m", 6, "LOADING", "")  # the server retries the changed folder
    retried.check("m", 6, "AVAILABLE", "")
    fresh = promotion._Failure()
    fresh.check("m", 4, "LOADING", "")
    with pytest.raises(PromotionError, match="Wire format"):  # failed during the wait
        fresh.check("m", 4, "END", "Wire format was corrupt")
    other = promotion._Failure()
    other.check("m", 4, "END", "old error")
    with pytest.raises(PromotionError, match="new error"):  # a new attempt's failure
        other.check("m", 4, "END", "new error")


def configs_labels(text: str) -> str:
    (m,) = [c for c in validate(text, Path("/r")) if c.name == "m"]
    return f"canary={m.labels['canary']}"


def test_dry_run_prints_each_intermediate_config_and_applies_nothing() -> None:
    out = io.StringIO()
    one_label = set_labels(CANARY_FILE, "m", {"stable": 1})
    steps = plan(one_label, Path("/r"), "m", 2, "stable", on_disk=[1, 2])
    promote(
        steps,
        model="m",
        version=2,
        label="stable",
        apply=pytest.fail,
        wait=None,
        dry_run=True,
        out=out,
    )
    printed = out.getvalue()
    assert printed.count("--- models.config after step") == 3
    assert "step 1/3 (load): serve versions 1, 2" in printed
    assert "step 2/3 (label): label 'stable' → version 2 (was 1)" in printed
    assert "step 3/3 (drop): drop version 1 (no label points at it); serve 2" in printed
    assert printed.rstrip().endswith(steps[2].text.rstrip())


def test_bad_requests_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(PromotionError, match=r"no model 'nope' \(models there: m, other\)"):
        plan(CANARY_FILE, tmp_path, "nope", 2, "canary", on_disk=[1, 2])
    with pytest.raises(PromotionError, match="label"):
        plan(CANARY_FILE, tmp_path, "m", 2, "can ary", on_disk=[1, 2])
    with pytest.raises(ConfigError):
        validate(CANARY_FILE.replace("versions: 1", "versions: x"), tmp_path)


def test_merge_keeps_comments_when_only_policies_and_labels_change(tmp_path: Path) -> None:
    new = set_labels(set_specific_versions(CANARY_FILE, "m", [1, 2]), "m", {"stable": 2})
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    as_sent = text_format.MessageToString(
        text_format.Parse(new, model_server_config_pb2.ModelServerConfig())
    )
    merged = merge_config(CANARY_FILE, as_sent, tmp_path)
    assert merged == new
    # A different set of models replaces the file whole.
    only_m = as_sent.split("config {", 2)
    replaced = "model_config_list {\n  config {" + only_m[2]
    assert merge_config(CANARY_FILE, replaced, tmp_path) == replaced


def test_write_atomically_replaces_the_file_in_one_step(tmp_path: Path) -> None:
    path = tmp_path / "models.config"
    path.write_text(CANARY_FILE)
    path.chmod(0o640)
    write_atomically(path, set_labels(CANARY_FILE, "m", {"stable": 1}))
    assert [p.name for p in tmp_path.iterdir()] == ["models.config"]
    assert (path.stat().st_mode & 0o777) == 0o640
    assert [dict(c.labels) for c in read_repository(tmp_path)] == [{}, {"stable": 1}]


def test_write_atomically_keeps_the_files_owner(tmp_path: Path) -> None:
    """promote run as root gave a 640 models.config to root: the image's user (10001)
    could no longer read it."""
    if os.geteuid() != 0:
        pytest.skip("only root may give a file to another user")
    path = tmp_path / "models.config"
    path.write_text(CANARY_FILE)
    path.chmod(0o640)
    os.chown(path, 10001, 10001)
    write_atomically(path, set_labels(CANARY_FILE, "m", {"stable": 1}))
    assert (path.stat().st_uid, path.stat().st_gid) == (10001, 10001)
    assert (path.stat().st_mode & 0o777) == 0o640


def test_write_atomically_writes_a_linked_file_where_it_points(tmp_path: Path) -> None:
    """promote replaced a linked models.config with a file: the link was lost and its
    target (where the operator keeps the config) kept the old text."""
    kept = tmp_path / "configs" / "models.config"
    kept.parent.mkdir()
    kept.write_text(CANARY_FILE)
    link = tmp_path / "repo" / "models.config"
    link.parent.mkdir()
    link.symlink_to(kept)
    write_atomically(link, set_labels(CANARY_FILE, "m", {"stable": 1}))
    assert link.is_symlink() and link.resolve() == kept
    assert [dict(c.labels) for c in read_repository(link.parent)] == [{}, {"stable": 1}]
    assert sorted(p.name for p in kept.parent.iterdir()) == ["models.config"]


def test_the_reload_config_rpc_is_off_unless_enabled(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from service.config import Settings
    from service.dataplane import DataPlane
    from service.errors import MethodNotAllowed

    with ThreadPoolExecutor(1) as pool:
        plane = DataPlane(Settings(model_repository=tmp_path), registry=None, decode_pool=pool)  # type: ignore[arg-type]
        with pytest.raises(MethodNotAllowed, match="CNNSERVE_RELOAD_CONFIG_RPC"):
            asyncio.run(plane.reload_config(CANARY_FILE))
