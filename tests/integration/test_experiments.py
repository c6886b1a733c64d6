"""Two tiny versions trained through the CLI (one from two mapped, corrected sources with
class weights), their model cards, `evaluate` on the merged sources, and `experiments`."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from service.cli import main
from service.training.sources import RELABEL_FORMAT
from tests.helpers.images import renamed_class_folders, write_class_folders

pytestmark = pytest.mark.slow

TINY = [
    "--model-name", "tiny", "--width", "0.25", "--depth", "1", "--epochs", "2",
    "--batch-size", "8", "--optimizer", "adam", "--val-fraction", "0.2",
    "--test-fraction", "0.2", "--latency-runs", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("experiments")
    a = write_class_folders(root / "shop", classes=3, per_class=14)
    b = renamed_class_folders(root / "street", ["zero", "one", "two"], per_class=6)
    (root / "map.txt").write_text("zero -> class_0\none -> class_1\ntwo -> class_2\n")
    image = sorted((b / "two").iterdir())[-1]
    relabel = {hashlib.sha256(image.read_bytes()).hexdigest(): "class_1"}
    (root / "relabel.json").write_text(
        json.dumps({"format": RELABEL_FORMAT, "corrections": relabel})
    )
    place = ["--repository", str(root / "repo"), "--work-dir", str(root / "work")]
    merged = [
        "train", "--dataset", str(a), "--dataset", str(b),
        "--class-map", str(root / "map.txt"), "--relabel", str(root / "relabel.json"),
        "--class-weight", "balanced", "--lr", "0.003",
    ]  # fmt: skip
    assert main([*merged, *place, *TINY]) == 0
    assert main(["train", "--dataset", str(a), "--lr", "0.01", *place, *TINY]) == 0
    return root


def card(root: Path, version: int) -> dict:  # type: ignore[type-arg]
    path = root / "repo" / "tiny" / str(version) / "assets.extra" / "model_card.json"
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def test_card_records_sources_map_corrections_and_class_weight(trained: Path) -> None:
    first = card(trained, 1)
    dataset = first["dataset"]
    assert [s["name"] for s in dataset["sources"]] == [
        str(trained / "shop"),
        str(trained / "street"),
    ]
    assert dataset["sources"][0]["per_class"] == {"class_0": 14, "class_1": 14, "class_2": 14}
    # One "two" image of street was corrected to class_1.
    assert dataset["sources"][1]["per_class"] == {"class_0": 6, "class_1": 7, "class_2": 5}
    assert all(len(s["content_sha256"]) == 64 for s in dataset["sources"])
    assert dataset["class_map"]["rules"] == {
        "zero": "class_0",
        "one": "class_1",
        "two": "class_2",
    }
    assert dataset["label_corrections"]["images_relabelled"] == 1
    assert first["training"]["class_weight"] == "balanced"
    assert first["training"]["extra_datasets"] == [str(trained / "street")]
    assert "sources" not in card(trained, 2)["dataset"]  # one source: as before


def test_evaluate_rebuilds_the_merged_test_split(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version = trained / "repo" / "tiny" / "1"
    assert main(["evaluate", str(version), "--latency-runs", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["test_split_matches_card"] is True


def test_experiments_compares_versions_and_unpublished_runs(trained: Path) -> None:
    # An unpublished run in the work directory: a recipe no version shares.
    fit = next(p for p in (trained / "work").iterdir() if (p / "config.json").is_file())
    other = trained / "work" / "unpublished"
    other.mkdir()
    config = json.loads((fit / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "epochs": 99}))
    # Its validation accuracy above any test accuracy: still not its test set's best.
    history = {"val_accuracy": [0.4, 0.999], "val_loss": [1.1, 0.9]}
    (other / "history.json").write_text(json.dumps({"history": history}))

    out = trained / "report"
    args = ["experiments", "--model-repository", str(trained / "repo")]
    assert main([*args, "--work-dir", str(trained / "work"), "--output", str(out)]) == 0
    data = json.loads((out / "experiments.json").read_text())
    runs = {r["run"]: r for r in data["runs"]}
    assert set(runs) == {"tiny/1", "tiny/2", "work/unpublished"}  # published fits not twice
    # tiny/1 tested on the merged sources' test split, tiny/2 on shop's alone: accuracy
    # on different images is not ranked (one of them was "the best" of both).
    assert len(data["groups"]) == 2
    assert (
        {g["best"] for g in data["groups"]}
        == {"tiny/1", "tiny/2"}
        == {runs[name]["best_of_test_set"] for name in ("tiny/1", "tiny/2")}
    )
    assert runs["tiny/1"]["differs_from_best"] == "—"
    # The unpublished run shares its data recipe with the fit it was copied from.
    copied_from = next(
        r["run"]
        for r in data["runs"]
        if r["published"] and r["data_recipe"] == runs["work/unpublished"]["data_recipe"]
    )
    assert runs["work/unpublished"]["best_of_test_set"] == copied_from
    assert runs["work/unpublished"]["differs_from_best"] == "epochs=99"
    assert runs["work/unpublished"]["accuracy"] == 0.999
    assert runs["tiny/1"]["sources"] == "shop + street (class map) (relabelled)"
    assert runs["tiny/1"]["size_mb"] > 0 and runs["tiny/1"]["latency_ms"] > 0
    # The runtime it was timed on goes with it: TF and LiteRT figures do not compare.
    assert runs["tiny/1"]["latency_runtime"] == "TF"
    report = (out / "report.md").read_text()
    assert f"| {runs['tiny/1']['latency_ms']:.2f} (TF) |" in report
    assert "| tiny/1 |" in report and "| work/unpublished (validation) |" in report
    assert "on 2 different test sets" in report
    assert "## Test set 1: " in report and "## Test set 2: " in report
    # Each table starts with the run its "Best:" line names (it was sorted by accuracy
    # alone, so a validation accuracy headed it under another run's "Best:").
    for section in report.split("## Test set ")[1:]:
        best = re.search(r"Best: \*\*(.+?)\*\*", section)
        assert best, section
        rows = [line for line in section.splitlines() if re.match(r"\| \S+/\S+ ", line)]
        assert rows[0].startswith(f"| {best[1]} |"), section
    for png in ("curves.png", "per_class_f1.png"):
        assert f"]({png})" in report and (out / png).stat().st_size > 5000


def test_a_card_that_is_not_json_is_left_out_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """It stopped the whole report with a JSONDecodeError traceback."""
    repo = tmp_path / "repo"
    sections = ("training", "evaluation", "architecture", "dataset", "compression")
    for version, text in (
        ("1", '{"training":\n'),  # cut short
        ("2", json.dumps({"training": {"dataset": "shop"}, "evaluation": {"accuracy": 0.5}})),
        ("3", json.dumps(dict.fromkeys(sections))),  # null sections: read as empty
        ("4", json.dumps({"evaluation": {"per_class": {"cat": 0.5}}})),  # not as written
    ):
        extra = repo / "tiny" / version / "assets.extra"
        extra.mkdir(parents=True)
        (extra / "model_card.json").write_text(text)
    out = tmp_path / "report"
    args = ["experiments", "--model-repository", str(repo), "--work-dir", str(tmp_path / "none")]
    assert main([*args, "--output", str(out)]) == 0
    assert capsys.readouterr().out.startswith("2 runs on 2 test sets, the best of each: tiny/2")
    damaged = repo / "tiny" / "1" / "assets.extra" / "model_card.json"
    assert f"{damaged}: unreadable model card" in caplog.text
    odd = repo / "tiny" / "4" / "assets.extra" / "model_card.json"
    assert f"{odd}: the model card is not as cnnserve writes it (TypeError" in caplog.text
    runs = json.loads((out / "experiments.json").read_text())["runs"]
    assert sorted(r["run"] for r in runs) == ["tiny/2", "tiny/3"]


def test_a_damaged_work_run_is_left_out_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cut-short config.json or history.json stopped the report with a traceback."""
    work = tmp_path / "work"
    good = {"arch": {"name": "lenet5"}, "dataset": "shop", "epochs": 3}
    records = {
        "cut-config": ('{"arch": {"na', json.dumps({"history": {"val_accuracy": [0.3]}})),
        "cut-history": (json.dumps({**good, "epochs": 4}), '{"history": {"val_acc'),
        "list-history": (json.dumps({**good, "epochs": 5}), "[1, 2]"),
        # Odd series are dropped, the rest of the run kept.
        "odd-series": (
            json.dumps({**good, "epochs": 6}),
            json.dumps({"history": {"val_accuracy": [0.25, None, 0.5], "val_loss": "x"}}),
        ),
    }
    for name, (config, history) in records.items():
        (work / name).mkdir(parents=True)
        (work / name / "config.json").write_text(config)
        (work / name / "history.json").write_text(history)
    out = tmp_path / "report"
    args = ["experiments", "--model-repository", str(tmp_path / "repo"), "--work-dir", str(work)]
    assert main([*args, "--output", str(out)]) == 0
    assert capsys.readouterr().out.startswith("1 runs, best: work/odd-series;")
    for name, file in (("cut-config", "config"), ("cut-history", "history")):
        assert f"{work / name / file}.json cannot be read" in caplog.text
    assert f"{work / 'list-history' / 'history.json'} holds no JSON object" in caplog.text
    (run,) = json.loads((out / "experiments.json").read_text())["runs"]
    assert run["accuracy"] == 0.5 and set(run["history"]) == {"val_accuracy"}
    report = (out / "report.md").read_text()
    assert "curves.png" in report and "per_class_f1" not in report  # no empty heat map
    assert not (out / "per_class_f1.png").exists()


def test_a_setting_one_card_does_not_record_is_no_difference() -> None:
    """An older card lacks settings added since (class_weight, extra_datasets): their
    value then is unknown, not a difference from the best run."""
    from service.training.experiments import differences

    best = {"hyper": {"lr": 0.002, "epochs": 36}}
    run = {"hyper": {"lr": 0.01, "epochs": 36, "class_weight": "none", "extra_datasets": []}}
    assert differences(run, best) == "lr=0.01"
    assert differences(best, best) == "—"
