"""scripts/gpu_check.sh in its small CPU mode (tiny model, gloo): end to end, one JSON, every part."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402


@pytest.mark.slow
def test_cpu_mode_runs_every_part_and_writes_one_json(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--mode", "cpu", "--output", str(out)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["check.json"]  # one JSON, no leftovers
    r = json.loads(out.read_text())
    assert r["ok"] and r["mode"] == "cpu" and set(r["parts"]) == {*gpu_check.BENCH_PARTS, "ddp"}
    for phase in ("train", "inference"):
        for kind in ("eager", "compile"):
            numbers = r["benchmark"][phase][kind]
            assert numbers["fast_img_s"] > 0 and numbers["naive_img_s"] > 0 and numbers["speedup"] > 0
            assert 0 < numbers["fast_frac_bf16_peak"] <= 1 and 0 < numbers["fast_frac_fp32_peak"] <= 1
    assert r["host_syncs"] == {"train_step": None, "scoring_batch": None}  # counted on CUDA only
    ddp = r["ddp"]
    assert ddp["backend"] == "gloo" and ddp["world_size"] == 1 and ddp["steps"] == gpu_check.MODES["cpu"].ddp_steps
    assert ddp["frozen_stored_as"] == "bfloat16" and ddp["checkpoint_frozen_exact"] is True
    assert all(v > 0 for v in r["peak_memory_mib"].values()) and "ddp_train" in r["peak_memory_mib"]


def test_gpu_mode_without_a_gpu_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    args = gpu_check.get_args_parser().parse_args(["--output", str(tmp_path / "x.json")])
    assert gpu_check.run_cli(gpu_check.main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --mode gpu") and err.count("\n") == 1 and not (tmp_path / "x.json").exists()


def test_gpu_mode_fits_in_eight_minutes():
    """The parts' own limits fit in the budget the check promises (8 minutes, with room for start-up)."""
    limits = gpu_check.MODES["gpu"].limits_s
    assert set(limits) == {*gpu_check.BENCH_PARTS, "ddp"}
    assert sum(limits.values()) <= 8 * 60 - 10
    assert gpu_check.get_args_parser().parse_args([]).budget_s <= 8 * 60 - 10
