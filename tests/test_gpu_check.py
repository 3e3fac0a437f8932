"""scripts/gpu_check.sh: the plan, the budget, failures recorded per run, the JSON schema, and the CPU
dry run of the whole plan (tiny stand-ins, 1 step, forked processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantdream.bench import gpu_check as gc
from quantdream.bench.memory import BenchSpec
from quantdream.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def test_plan_runs_every_method_on_both_models_embedded_first():
    runs = gc.plan(steps=3)
    assert [f"{r.model}/{r.method}" for r in runs[:len(METHODS)]] == [f"embedded/{m}" for m in METHODS]
    sd = [r.method for r in runs[len(METHODS):]]
    assert sd[:6] == ["zoodip", "ti", "dreambooth", "lora", "peqa", "tuneqdm"] and sorted(sd) == sorted(METHODS)
    assert {(r.model, r.resolution, r.steps) for r in runs} == {("embedded", 64, 3), ("sd15", 512, 3)}
    dry = gc.plan(steps=3, dry_run=True)
    assert [(r.model, r.method) for r in dry] == [(r.model, r.method) for r in runs]     # same structure
    assert {(r.resolution, r.steps) for r in dry} == {(64, 1)}


def test_qlora_is_skipped_with_the_reason_when_bitsandbytes_is_missing(monkeypatch):
    monkeypatch.setattr(gc, "find_spec", lambda name: None if name == "bitsandbytes" else object())
    assert "bitsandbytes is not installed" in gc.skip_reason("qlora", "cuda")
    assert gc.skip_reason("zoodip", "cuda") is None and gc.skip_reason("lora", "cuda") is None


def test_dry_run_stand_in_keeps_sd15_classes_and_layout(monkeypatch):
    from quantdream.models import arch
    monkeypatch.setattr(arch, "_spec", arch._spec)          # restored after the test
    full = arch.arch_config("sd15", "unet")["config"]
    gc.use_dry_run_archs()
    small = arch.arch_config("sd15", "unet")["config"]
    assert small["down_block_types"] == full["down_block_types"] and small["block_out_channels"][-1] == 64
    assert arch.arch_config("sd15", "text_encoder")["config"]["max_position_embeddings"] == 77
    assert arch.arch_config("sdxl", "unet")["config"]["block_out_channels"][0] == 320      # others untouched


def test_a_failing_run_becomes_a_row_with_the_errors_last_line():
    row = gc.measure(BenchSpec(arch="tiny", method="zoodip", steps=0, device="cpu"), dry_run=False)
    assert row["status"] == "failed" and row["error"] == "ValueError: --steps must be >= 1, got 0"
    r = gc._row(gc.Run("embedded", "zoodip", 64, 1), "int8", row)
    assert r["status"] == "failed" and r["error"].startswith("ValueError") and r["seconds_per_step"] is None


def _fake_runs(monkeypatch, run):
    """Launcher.run replaced (no process starts, no forkserver)."""
    monkeypatch.setattr(gc.Launcher, "run", run)
    monkeypatch.setattr(gc.Launcher, "warm_up", lambda self: None)


def _args(tmp_path, *extra):
    return gc.parse_args(["--out", str(tmp_path), "--device", "cpu", "--dry-run", *extra])


def test_budget_records_runs_not_started_and_failures_do_not_stop_the_rest(tmp_path, monkeypatch):
    calls = []

    def fake_run(self, spec, name, timeout):
        calls.append(spec.method)
        if spec.method == "ti":
            return {"status": "failed", "error": "RuntimeError: CUDA out of memory"}
        return {"status": "ok", "seconds_per_step": 0.5, "unet_forward_passes_per_step": 3.0,
                "training_peak": {"vmhwm_mib": 100.0}, "whole_process_peak_mib": 120.0}
    _fake_runs(monkeypatch, fake_run)
    check = gc.Check(_args(tmp_path, "--models", "embedded", "--methods", "ti,zoodip,lora"))
    assert check.run() == 1                                   # one run failed
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert gc.validate(doc) == [] and calls == ["zoodip", "ti", "lora"]
    rows = {r["method"]: r for r in doc["runs"]}
    assert rows["ti"]["error"] == "RuntimeError: CUDA out of memory" and rows["lora"]["status"] == "ok"
    assert rows["zoodip"]["iterations_per_second"] == 2.0 and rows["zoodip"]["unet_forward_passes"] == 3.0
    assert doc["summary"] == {"ok": 2, "failed": 1, "skipped": 0, "not run (budget)": 0} and doc["finished"]
    assert "embedded/ti (none): failed: RuntimeError: CUDA out of memory" in (tmp_path / "gpu_check.log").read_text()

    calls.clear()
    out2 = tmp_path / "budget"
    check = gc.Check(_args(out2, "--models", "embedded", "--methods", "ti,zoodip", "--budget-s", "1"))
    assert check.run() == 0 and calls == []                   # nothing fits in 1 s: nothing is started
    doc = json.loads((out2 / "gpu_check.json").read_text())
    assert gc.validate(doc) == [] and {r["status"] for r in doc["runs"]} == {"not run (budget)"}
    assert all("s left of the budget" in r["note"] for r in doc["runs"])


def test_json_after_every_run_survives_a_kill(tmp_path, monkeypatch):
    seen = []

    def fake_run(self, spec, name, timeout):
        seen.append(json.loads((tmp_path / "gpu_check.json").read_text()))   # what a kill now would leave
        return {"status": "ok", "seconds_per_step": 1.0, "unet_forward_passes_per_step": 1.0}
    _fake_runs(monkeypatch, fake_run)
    gc.Check(_args(tmp_path, "--models", "embedded", "--methods", "ti,lora")).run()
    assert [r["status"] for r in seen[1]["runs"]] == ["ok", "not run (budget)"] and not seen[1]["finished"]
    assert gc.validate(seen[1]) == []


def test_validate_names_what_is_wrong():
    assert gc.validate({"schema": gc.SCHEMA}) and "missing 'runs'" in gc.validate({"schema": gc.SCHEMA})
    row = {k: None for k in gc.ROW_KEYS} | {"model": "embedded", "method": "ti", "status": "ok", "wall_s": 1.0,
                                            "seconds_per_step": 1.0, "iterations_per_second": 1.0,
                                            "unet_forward_passes_per_step": 1.0}
    doc = {"schema": gc.SCHEMA, "dry_run": False, "device": "cuda", "settings": {}, "plan": ["embedded/ti"],
           "runs": [row], "finished": True, "elapsed_s": 1.0,
           "summary": {"ok": 1, "failed": 0, "skipped": 0, "not run (budget)": 0}}
    assert gc.validate(doc) == ["embedded/ti: cuda_max_allocated_mib = None", "embedded/ti: process_total_mib = None"]
    assert gc.validate({**doc, "device": "cpu"}) == []


def test_cli_refuses_bad_input(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for argv, msg in ((["--out", str(tmp_path / "file")], "is a file"), (["--out", "x", "--methods", "zoodp"],
                      "unknown method 'zoodp'"), (["--out", "x", "--models", "sdxl"], "unknown model 'sdxl'"),
                      (["--out", "x", "--budget-s", "0"], "must be > 0")):
        with pytest.raises(SystemExit) as e:
            gc.parse_args(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not Path("x").exists()


@pytest.mark.slow
def test_cpu_dry_run_of_the_whole_plan(tmp_path):
    """scripts/gpu_check.sh --device cpu --dry-run: every (model, method) of the plan, 1 step each."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert gc.validate(doc) == [] and doc["finished"] and doc["dry_run"]
    assert doc["plan"] == [f"{r.model}/{r.method}" for r in gc.plan(dry_run=True)]
    for r in doc["runs"]:
        if r["method"] == "qlora" and r["status"] == "skipped":       # without bitsandbytes
            assert "bitsandbytes" in r["note"]
            continue
        assert r["status"] == "ok", r
        assert r["seconds_per_step"] > 0 and r["unet_forward_passes_per_step"] >= 1
        assert r["cpu_whole_process_peak_mib"] > 0
    rows = {(r["model"], r["method"]): r for r in doc["runs"]}
    assert rows[("sd15", "zoodip")]["model_source"] == "quantized folder, loaded as --model DIR"
    assert rows[("embedded", "zoodip")]["unet_forward_passes_per_step"] == 3          # n + 1, n = 2 directions
    assert (tmp_path / "gpu_check.log").read_text().count(": ok,") >= 20


def test_a_cuda_init_error_in_the_first_forked_run_falls_back_to_fresh_interpreters(tmp_path, monkeypatch):
    calls = []

    def fake_run(self, spec, name, timeout):
        calls.append((self.kind, spec.method))
        if self.kind == "fork":
            return {"status": "failed", "error": "RuntimeError: CUDA error: initialization error"}
        return {"status": "ok", "seconds_per_step": 0.1, "unet_forward_passes_per_step": 1.0,
                "cuda_max_allocated_mib": 300.0, "process_total_mib": 900.0}
    _fake_runs(monkeypatch, fake_run)
    args = gc.parse_args(["--out", str(tmp_path), "--device", "cuda", "--models", "embedded", "--methods", "ti,zoodip"])
    assert gc.Check(args).run() == 0
    assert calls == [("fork", "zoodip"), ("subprocess", "zoodip"), ("subprocess", "ti")]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert gc.validate(doc) == [] and doc["settings"]["launcher"].startswith("fork, then subprocess")


def test_an_interrupted_check_keeps_its_json_and_names_the_run(tmp_path, monkeypatch):
    def fake_run(self, spec, name, timeout):
        if spec.method == "ti":
            raise KeyboardInterrupt
        return {"status": "ok", "seconds_per_step": 1.0, "unet_forward_passes_per_step": 1.0}
    _fake_runs(monkeypatch, fake_run)
    with pytest.raises(KeyboardInterrupt):
        gc.Check(_args(tmp_path, "--models", "embedded", "--methods", "zoodip,ti,lora")).run()
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["interrupted"] == "KeyboardInterrupt during embedded/ti" and not doc["finished"]
    assert [r["status"] for r in doc["runs"]] == ["ok", "failed", "not run (budget)"] and gc.validate(doc) == []


def test_cuda_without_a_gpu_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gc, "has_gpu", lambda: False)
    assert gc.main(["--out", str(tmp_path / "out")]) == 2
    assert "no GPU here" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_runs_that_need_a_folder_still_being_written_let_the_others_go_first(tmp_path, monkeypatch):
    calls = []

    class SlowFolder(gc.FolderWriter):
        def __init__(self, arch, weights, out, dry_run, log):
            self.out, self.started, self.polls = out, 0.0, 0
            self.proc = self

        def poll(self):                     # written once three runs have gone
            return 0 if len(calls) >= 3 else None

        def wait(self, timeout):
            return None

        def kill(self):
            pass
    monkeypatch.setattr(gc, "FolderWriter", SlowFolder)
    _fake_runs(monkeypatch, lambda self, spec, name, timeout: calls.append(
        (spec.arch, spec.method, bool(spec.model_dir))) or {"status": "ok", "seconds_per_step": 1.0,
                                                            "unet_forward_passes_per_step": 1.0})
    gc.Check(_args(tmp_path, "--models", "embedded,sd15", "--methods", "zoodip,ti,lora")).run()
    assert calls == [("tiny", "zoodip", False), ("tiny", "ti", False), ("tiny", "lora", False),
                     ("sd15", "zoodip", True), ("sd15", "ti", False), ("sd15", "lora", False)]
    calls.clear()
    monkeypatch.setattr(SlowFolder, "poll", lambda self: None if len(calls) < 5 else 0)
    gc.Check(_args(tmp_path / "b", "--models", "embedded,sd15", "--methods", "zoodip,ti,lora")).run()
    assert [c[:2] for c in calls[3:]] == [("sd15", "ti"), ("sd15", "lora"), ("sd15", "zoodip")]
    doc = json.loads((tmp_path / "b" / "gpu_check.json").read_text())
    assert doc["plan"][3:] == ["sd15/zoodip", "sd15/ti", "sd15/lora"] and gc.validate(doc) == []


def test_a_run_past_its_time_limit_is_killed_and_recorded(tmp_path):
    launcher = gc.Launcher("subprocess", True, tmp_path)
    m = launcher.run(BenchSpec(arch="tiny", method="ti", steps=1, device="cpu"), "slow", 0.5)
    assert m["status"] == "failed" and m["error"] == "killed after 0 s (time limit)"
    assert not (tmp_path / "slow.json").exists()
