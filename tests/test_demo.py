"""``groupclip demo``: a short run end to end, and the user errors that must exit with code 2."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from groupclip.cli import main  # noqa: E402


def test_short_demo_writes_report_and_files(tmp_path, capsys):
    out = tmp_path / "demo-out"
    # One epoch, a one-point sweep: ~10 s on 2 CPU cores (most of it is noise calibration).
    assert main(["demo", "--epochs", "1", "--epsilon", "3", "--sweep", "1", "--seed", "1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    report = captured.out
    for word in ("epsilon", "delta", "sigma", "sample rate", "steps", "wall time", "non-private baseline"):
        assert word in report, word
    assert "epoch 1/1" in captured.err  # the tqdm bars go to stderr

    assert (out / "privacy_utility.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    dp = results["dp"]
    assert dp["target_epsilon"] == 3.0
    assert 0 < dp["epsilon"] <= 3.0 * (1 + 1e-9)
    assert 0 < dp["delta"] <= min(1e-5, 1 / (10 * results["dataset"]["train"]))
    assert dp["noise_multiplier"] > 0 and dp["steps"] >= 1 and 0 < dp["sample_rate"] < 1
    assert 0.0 <= dp["test_accuracy"] <= 1.0
    assert 0.0 <= results["non_private"]["test_accuracy"] <= 1.0
    sweep = {point["target_epsilon"]: point for point in results["sweep"]}
    assert set(sweep) == {1.0, 3.0, None}  # None: the non-private baseline (epsilon = infinity)
    assert sweep[1.0]["epsilon"] <= 1.0 * (1 + 1e-9)
    assert all(0.0 <= point["test_accuracy"] <= 1.0 for point in results["sweep"])


def test_help_documents_the_options(capsys):
    assert main(["demo", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--epsilon", "--epochs", "--clipping", "--groups", "--seed", "--out", "--sweep"):
        assert option in text, option


@pytest.mark.parametrize(
    "args",
    [
        ["--clipping", "bogus"],
        ["--groups", "per-neuron"],
        ["--epsilon", "0"],
        ["--epsilon", "-1"],
        ["--epsilon", "inf"],
        ["--epsilon", "three"],
        ["--epochs", "0"],
        ["--sweep", "1,0"],
        ["--bogus-option"],
    ],
)
def test_bad_input_exits_2(args, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("groupclip: error:") and err.count("\n") == 1  # one line
    assert not (tmp_path / "out").exists()  # rejected before anything is written


def test_unwritable_output_folder_exits_2(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["demo", "--epochs", "1", "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("groupclip: error: cannot write to the output folder") and err.count("\n") == 1
