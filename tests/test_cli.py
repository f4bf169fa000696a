"""The ``groupclip`` command line."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from groupclip import accounting
from groupclip.cli import main


def rows(out: str) -> dict[str, float]:
    """The ``method value`` rows of a printed table."""
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("rdp", "pld"):
            table[parts[0]] = float(parts[1])
    return table


def test_epsilon_table_both_methods(capsys):
    assert (
        main(["epsilon", "--noise-multiplier", "1.0", "--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5"])
        == 0
    )
    table = rows(capsys.readouterr().out)
    for method in ("rdp", "pld"):
        expected = accounting.epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5, method=method)
        assert table[method] == pytest.approx(expected, rel=1e-5)


def test_epsilon_single_method_from_epochs(capsys):
    assert (
        main(
            [
                "epsilon",
                "--noise-multiplier",
                "1.2",
                "--batch-size",
                "256",
                "--sample-size",
                "50000",
                "--epochs",
                "3",
                "--method",
                "rdp",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    q = 256 / 50000
    steps = 3 * round(1 / q)  # epochs x batches per pass of the Poisson loader, as the engine counts
    assert f"steps={steps}" in out and "delta=2e-06" in out  # default delta min(1e-5, 1/(10 N))
    expected = accounting.epsilon(noise_multiplier=1.2, sample_rate=q, steps=steps, delta=2e-6)
    assert rows(out) == {"rdp": pytest.approx(expected, rel=1e-5)}


def test_calibrated_noise_multiplier(capsys):
    assert (
        main(
            [
                "epsilon",
                "--epsilon",
                "3",
                "--sample-rate",
                "0.01",
                "--steps",
                "1000",
                "--delta",
                "1e-5",
                "--method",
                "rdp",
            ]
        )
        == 0
    )
    sigma = rows(capsys.readouterr().out)["rdp"]
    expected = accounting.noise_multiplier(epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=1000)
    assert sigma == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required"),
        (["epsilon", "--sample-rate", "0.1", "--steps", "10", "--delta", "1e-5"], "--noise-multiplier"),
        (
            ["epsilon", "--noise-multiplier", "1", "--sample-rate", "2", "--steps", "10", "--delta", "1e-5"],
            "sample_rate must be in",
        ),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "0", "--delta", "1e-5"], "--steps"),
        (
            ["epsilon", "--noise-multiplier", "x", "--sample-rate", "0.1", "--steps", "5", "--delta", "1e-5"],
            "--noise-multiplier",
        ),
        (
            [
                "epsilon",
                "--noise-multiplier",
                "1",
                "--sample-rate",
                "0.1",
                "--steps",
                "5",
                "--delta",
                "1e-5",
                "--method",
                "gdp",
            ],
            "invalid choice",
        ),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "5"], "--delta is required"),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1"], "--steps"),
        (
            [
                "epsilon",
                "--noise-multiplier",
                "1",
                "--sample-rate",
                "0.1",
                "--steps",
                "5",
                "--epochs",
                "2",
                "--delta",
                "1e-5",
            ],
            "not both",
        ),
        (
            [
                "epsilon",
                "--epsilon",
                "1e-5",
                "--sample-rate",
                "1",
                "--steps",
                "1",
                "--delta",
                "1e-5",
                "--method",
                "rdp",
            ],
            "no noise multiplier",
        ),
        (["nonsense"], "invalid choice"),
    ],
)
def test_user_errors_are_one_line_exit_2(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("groupclip: error: ") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert captured.out == ""


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "epsilon" in capsys.readouterr().out


def test_demo_missing_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "groupclip.demo", None)  # makes `import groupclip.demo` fail
    assert main(["demo", "--anything"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("groupclip: error: ") and "demo" in err and len(err.splitlines()) == 1


def test_demo_is_dispatched(monkeypatch, capsys):
    fake = types.ModuleType("groupclip.demo")
    fake.add_arguments = lambda parser: parser.add_argument("--epochs", type=int, default=1)
    fake.run = lambda args: print(f"ran with epochs={args.epochs}") or 0
    monkeypatch.setitem(sys.modules, "groupclip.demo", fake)
    assert main(["demo", "--epochs", "3"]) == 0
    assert "ran with epochs=3" in capsys.readouterr().out


def test_console_script_no_traceback():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "groupclip.cli",
            "epsilon",
            "--noise-multiplier",
            "-1",
            "--sample-rate",
            "0.1",
            "--steps",
            "5",
            "--delta",
            "1e-5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("groupclip: error: noise_multiplier must be")
    assert "Traceback" not in proc.stderr
