"""The GPU benchmark end to end on the CPU with tiny models (`gpu.py --device cpu --tiny`), so the script the README's
results come from keeps running between GPU sessions: its oracle check passes, every timed row has what the
README table is generated from, and `table.py` renders one row per configuration with every column filled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("nonprivate", "groupclip-layer-wise", "groupclip-all-layer")


def _script_env() -> dict:
    """The environment a benchmark script runs in: src on PYTHONPATH, keeping an existing PYTHONPATH (where Opacus or
    transformers are installed into a directory on it, the script must see them as the test does)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH"))
                                                        if p)}


def _gpu_py(tmp_path, *args: str) -> dict:
    """`benchmarks/gpu.py --device cpu --tiny ...args` into tmp_path/result.json; the result."""
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--out", str(out), "--device", "cpu",
                          "--tiny", *args], cwd=tmp_path, env=_script_env(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


def test_gpu_benchmark_tiny_run_and_table(tmp_path):
    result = _gpu_py(tmp_path, "--phases", "check,time", "--workloads", "vit", "--precisions", "fp32", "--modes",
                     ",".join(MODES), "--rounds", "2", "--steps", "2", "--warmup", "1")
    out, env = tmp_path / "result.json", _script_env()

    # the oracle check: both models, both group styles, eager and through the graph wrapper
    check = result["check"]
    assert {(c["model"], c["groups"], c["via"]) for c in check} == {
        (m, g, v) for m in ("gpt2", "vit") for g in ("all-layer", "layer-wise") for v in ("eager", "graph")}
    assert all(c["ok"] and c["rel_err"] <= 1e-3 for c in check), check

    rows = result["time"]
    assert sorted((r["mode"], r["round"]) for r in rows) == sorted((m, k) for m in MODES for k in (0, 1))
    for r in rows:
        assert "error" not in r, r
        assert len(r["step_s_all"]) == 2 and r["step_s"] > 0
        assert r["samples_per_s"] == r["batch"] / r["step_s"]
        assert r["host_probe_ms"] > 0 and r["host_probe_after_ms"] > 0
    assert result["command"].startswith("python benchmarks/gpu.py") and result["settings"]["rounds"] == 2

    text = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "table.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=60, check=True).stdout
    table = text.splitlines()
    header, body = table[0], [line for line in table if line.startswith("| vit |")]
    assert [line.split(" | ")[2] for line in body] == list(MODES)
    for line in body:
        assert line.count("|") == header.count("|")
        assert " / " in line.split(" | ")[3]  # both rounds' samples/s
        assert " / " in line.split(" | ")[7] and " / " in line.split(" | ")[8]  # both rounds' memory


def test_maxbatch_searches_the_tails_mode_with_three_steps_a_trial(tmp_path):
    """`--phases maxbatch` on the CPU (nothing runs out of memory: every search reaches its cap): the `-tails` mode is
    searched too, three steps a trial (its tails are captured at the second), the default mode two; the batch grows
    by 1.5x to the cap."""
    result = _gpu_py(tmp_path, "--phases", "maxbatch", "--workloads", "vit", "--precisions", "fp32", "--modes",
                     "groupclip-layer-wise-tails,groupclip-layer-wise")
    rows = {r["mode"]: r for r in result["maxbatch"]}
    assert rows["groupclip-layer-wise-tails"]["steps_per_trial"] == 3
    assert rows["groupclip-layer-wise"]["steps_per_trial"] == 2
    for r in rows.values():
        assert "error" not in r, r
        batches = [b for b, ok in r["trials"]]
        assert all(ok for _, ok in r["trials"]) and r["capped"] and r["max_batch"] == r["cap"] == batches[-1]
        assert all(b2 == min(int(b1 * 1.5), r["cap"]) for b1, b2 in zip(batches, batches[1:], strict=False))


def test_table_shows_each_rounds_memory():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import table

    def row(mode, rnd, sps, gib):
        return {"workload": "w", "precision": "bf16", "mode": mode, "round": rnd, "samples_per_s": sps,
                "peak_mem_gib": gib}

    result = {"time": [row("nonprivate", 0, 100.0, 10.0), row("groupclip-layer-wise", 0, 95.0, 10.0),
                       row("nonprivate", 1, 100.0, 10.0), row("groupclip-layer-wise", 1, 96.0, 10.3)]}
    line = next(x for x in table.table(result).splitlines() if "groupclip-layer-wise" in x).split(" | ")
    assert line[4] == "0.95 / 0.96" and line[7] == "10.0 / 10.3" and line[8] == "1.00 / 1.03"


def test_pin_to_core():
    """`gpu.py --pin-core fastest|slowest`: every allowed core probed, the process left on the one with the lowest
    (highest) median."""
    import pytest

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    before = os.sched_getaffinity(0)
    try:
        for which, pick in (("fastest", min), ("slowest", max)):
            got = gpu.pin_to_core(which, probes=2)
            by_core = got["probe_ms_by_core"]
            assert set(by_core) == {str(c) for c in before} and got["which"] == which
            assert by_core[str(got["core"])] == pick(by_core.values())
            assert os.sched_getaffinity(0) == {got["core"]}
            os.sched_setaffinity(0, before)
    finally:
        os.sched_setaffinity(0, before)


def test_host_proxy_tiny_run(tmp_path):
    """The CPU proxy of host time (`benchmarks/host_proxy.py`): every mode measured, the tail modes really replay."""
    import pytest

    pytest.importorskip("transformers")
    out = tmp_path / "proxy.json"
    env = _script_env()
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_proxy.py"), "--out", str(out), "--steps", "2",
                          "--rounds", "1", "--warmup", "3"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["nonprivate", "layer-wise", "layer-wise-tails", "all-layer-tails"]
    for r in rows:
        assert r["forward_ms"] > 0 and r["backward_ms"] > 0 and r["step_ms"] > 0
    assert rows[1]["tail_replays"] == 0 and rows[2]["tail_replays"] > 0 and rows[3]["tail_replays"] > 0


def test_step_jitter_tiny_run(tmp_path):
    """The per-step probe (`benchmarks/step_jitter.py`) on the CPU with tiny models: every mode, every step recorded
    with its host time no longer than the step and no tail graphs off the GPU."""
    import pytest

    pytest.importorskip("transformers")
    out = tmp_path / "jitter.json"
    env = _script_env()
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_jitter.py"), "--out", str(out), "--device",
                          "cpu", "--tiny", "--steps", "3", "--settle", "2"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["nonprivate", "groupclip-layer-wise", "groupclip-all-layer"]
    for r in rows:
        assert len(r["steps"]) == 3
        assert all(0 < s["host_ms"] <= s["step_ms"] and s["replays"] == 0 for s in r["steps"])
