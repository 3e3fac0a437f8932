"""The benchmark scripts' plumbing on a random tiny model and a random world evaluator (their numbers
are meaningless here; the benchmarks themselves run on the trained embedded model)."""
import importlib.util
import json
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def harness_argv(model, evaluator, out, *extra) -> list[str]:
    """personalization.add_harness_args' options for a smoke run: teal_bag, 1 image of the composition prompts,
    2 evaluation steps, one thread, the test model and evaluator."""
    return ["--subjects", "teal_bag", "--images-per-prompt", "1", "--prompts", "composition", "--eval-steps", "2",
            "--threads", "1", "--model", str(model), "--evaluator", str(evaluator), "--out", str(out), *extra]


def load_script(name: str):
    """A benchmark by name: benchmarks/<name>.py, or a study, benchmarks/studies/<name>.py."""
    path = ROOT / "benchmarks" / f"{name}.py"
    if not path.is_file():
        path = ROOT / "benchmarks" / "studies" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_budget_variants_stay_within_the_budget():
    for n in (2, 8):                             # the paper's n and the embedded default's
        table = load_script("personalization").variants(1500, 1e-2, 1 / 3, zoodip_n=n, fast_steps=500)
        assert table["zoodip"] == ("zoodip", {}, 1500)
        per_step = {"budget-paper": n + 1, "budget-cosine": 3, "budget-cosine-subspace": 3,
                    "budget-cosine-antithetic": 4, "budget-cosine-n8": 9, "budget-vocab16": 3}
        for name, passes in per_step.items():
            method, section, steps = table[name]
            assert method == "zoodip" and 0 < steps * passes <= 1500 * (n + 1) / 3, name
            assert section.get("n", n) == passes - 1 or name == "budget-cosine-antithetic", name
    assert table["zoodip-vocab16"] == ("zoodip", {"vocab_directions": 16, "n": 2}, 1500)   # at ZOODiP's interval
    assert table["budget-cosine-n8"][1]["n"] == 8 and table["budget-cosine-antithetic"][1]["scheme"] == "central"


def test_budget_vocab16_is_zoodip_fast():
    """The benchmark's budget-vocab16 trains exactly what `--method zoodip-fast` ships on the embedded model."""
    import dataclasses

    from quantdream.methods.zoodip import ZoodipConfig, ZoodipFastConfig
    from quantdream.train import EMBEDDED_DEFAULTS
    z = EMBEDDED_DEFAULTS["zoodip"]
    method, section, steps = load_script("personalization").variants(
        z["steps"], z["section"]["lr"], 1 / 3, zoodip_n=z["section"]["n"],
        fast_steps=EMBEDDED_DEFAULTS["zoodip-fast"]["steps"])["budget-vocab16"]
    bench = ZoodipConfig(**{**EMBEDDED_DEFAULTS[method]["section"], **section})
    fast = ZoodipFastConfig(**EMBEDDED_DEFAULTS["zoodip-fast"]["section"])
    assert dataclasses.asdict(bench) == dataclasses.asdict(fast) and steps == EMBEDDED_DEFAULTS["zoodip-fast"]["steps"]
    assert (ZoodipConfig(**EMBEDDED_DEFAULTS["zoodip"]["section"]).t_low, fast.t_low) == (800, 800)


def test_stale_run_follows_a_changed_method_default(tmp_path):
    """A kept run made under another default of the method itself (tuneqdm's num_experts was 2 for a while)
    is trained again; a setting added to the method since the run (absent from its run.json) is not a reason."""
    import dataclasses

    from quantdream.methods.tuneqdm import TuneQDMConfig
    from quantdream.train import EMBEDDED_DEFAULTS
    stale = load_script("personalization").stale
    now = dataclasses.asdict(TuneQDMConfig(**{**EMBEDDED_DEFAULTS["tuneqdm"]["section"], "file_dtype": "float32"}))
    steps = EMBEDDED_DEFAULTS["tuneqdm"]["steps"]

    def run(config):
        (tmp_path / "run.json").write_text(json.dumps({"method": "tuneqdm", "steps": steps,
                                                       "method_config": json.loads(json.dumps(config))}))
        return stale(tmp_path, "tuneqdm", {"file_dtype": "float32"}, 0, "tiny")

    assert run(now) is None
    assert "num_experts" in run({**now, "num_experts": 2})
    assert run({k: v for k, v in now.items() if k not in ("num_experts", "lr_in")}) is None     # older run.json
    assert "file_dtype" in run({k: v for k, v in now.items() if k != "file_dtype"})            # asked for


@pytest.mark.slow
def test_personalization_benchmark_end_to_end_and_resume(tiny_model, random_evaluator, tmp_path, capsys):
    bench = load_script("personalization")
    argv = harness_argv(tiny_model, random_evaluator, tmp_path / "b", "--variants", "zoodip,ti,budget-cosine",
                        "--zoodip-steps", "6", "--ti-steps", "3")
    assert bench.main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    V = res["variants"]
    assert V["zoodip"]["unet_forward_passes"] == 18 and V["budget-cosine"]["unet_forward_passes"] == 6
    assert V["zoodip"]["weights"] == "int8" and V["ti"]["weights"] == "none"
    assert {"floor (int8)", "floor (none)"} <= set(V)
    for k in ("world_clip_i", "subject_attr_acc", "effnet", "world_clip_t", "prompt_accuracy"):
        assert isinstance(V["zoodip"][k], float)
    ceiling = res["ceiling"]["per_subject"]["teal_bag"]
    assert ceiling["subject_attr_acc"] > 0.8 and isinstance(ceiling["world_clip_i"], float)
    for v in ("zoodip", "ti"):
        f = V[f"floor ({V[v]['weights']})"]
        want = (V[v]["subject_attr_acc"] - f["subject_attr_acc"]) / (ceiling["subject_attr_acc"] - f["subject_attr_acc"])
        assert res["gap_closed"][v]["subject_attr_acc"] == pytest.approx(want)
    b = res["bars"]
    assert b["best_budget_variant"] == "budget-cosine" and b["best_budget_passes_fraction"] == pytest.approx(1 / 3)
    assert "zoodip_world_clip_i_ratio_to_ti>=0.97" in b and "zoodip_prompt_accuracy>=ti-0.02" in b
    stamp = (tmp_path / "b" / "runs" / "teal_bag" / "zoodip" / "run.json").stat().st_mtime_ns
    assert bench.main(argv) == 0                       # a rerun keeps the finished runs and evaluation
    assert (tmp_path / "b" / "runs" / "teal_bag" / "zoodip" / "run.json").stat().st_mtime_ns == stamp
    assert json.loads(capsys.readouterr().out)["variants"] == V
    # a new variant is trained (as a Ray task, where Ray is installed) and evaluated alone, then merged: the
    # earlier rows are kept as they were, and Ray gets only the run that is missing
    ev = tmp_path / "b" / "eval" / "teal_bag"
    before = {r["name"]: r["metrics"] for r in json.loads((ev / "metrics.json").read_text())["rows"]}
    argv[argv.index("zoodip,ti,budget-cosine")] = "zoodip,ti,budget-cosine,budget-paper"
    ray = importlib.util.find_spec("ray") is not None
    assert bench.main(argv + ["--ray"] * ray) == 0
    if ray:
        jobs = json.loads((tmp_path / "b" / "ray" / "batch.json").read_text())["rows"]
        assert [(r["job"], r["status"]) for r in jobs] == [("teal_bag-budget-paper", "ok")]
    after = {r["name"]: r["metrics"] for r in json.loads((ev / "metrics.json").read_text())["rows"]}
    assert set(after) == set(before) | {"budget-paper"} and all(after[k] == before[k] for k in before)
    assert (ev / "grids" / "budget_paper__teal_bag.png").is_file() and not (ev / "partial").exists()
    assert json.loads(capsys.readouterr().out)["variants"]["budget-paper"]["unet_forward_passes"] == 6


@pytest.mark.slow
def test_quantization_quality_runs_every_setting_against_fp32(tiny_model, random_evaluator):
    bench = load_script("quantization")
    q = bench.quality(str(tiny_model), n_captions=2, n_images=1, evaluator=str(random_evaluator))
    assert list(q["settings"]) == ["fp32", "W8A16", "W4A16", "W4A8"]
    for name, row in q["settings"].items():
        assert 0.0 <= row["prompt_accuracy"] <= 1.0 and "class" in row, name
    base = q["settings"]["fp32"]["prompt_accuracy"]
    for name in ("W8A16", "W4A16", "W4A8"):
        assert q["drop_points"][name] == pytest.approx(100 * (base - q["settings"][name]["prompt_accuracy"]), abs=0.01)
    bars = bench.check_bars({"quality": q})
    assert set(bars) == {"quality_W8A16_drop_points", "quality_W4A16_drop_points", "quality_W4A8_drop_points"}
    assert bench.quality(str(tiny_model / "nowhere"), 1, 1)["status"].startswith("skipped")


def test_tuneqdm_s2_bar_needs_prompt_accuracy_and_fidelity():
    cmp = load_script("comparison")

    def rows(s2, peqa):
        return {"a": [{"method": "tuneqdm-s2", "status": "ok", "prompt_accuracy": s2[0], "world_clip_i": s2[1]},
                      {"method": "peqa", "status": "ok", "prompt_accuracy": peqa[0], "world_clip_i": peqa[1]}]}

    def bar(s2, peqa):
        means = {"tuneqdm-s2": {"prompt_accuracy": s2[0], "world_clip_i": s2[1]},
                 "peqa": {"prompt_accuracy": peqa[0], "world_clip_i": peqa[1]}}
        return cmp.tuneqdm_s2_vs_peqa(means, rows(s2, peqa), "world_clip_i")

    assert bar((0.7, 0.40), (0.6, 0.38))["pass"] is True
    lower = bar((0.7, 0.36), (0.6, 0.38))                      # better prompts, worse subject: not the claim
    assert lower["pass"] is False and lower["fidelity_difference"] == pytest.approx(-0.02)
    assert bar((0.5, 0.40), (0.6, 0.38))["pass"] is False


@pytest.mark.slow
def test_comparison_benchmark_end_to_end(tiny_model, random_evaluator, tmp_path, capsys):
    """Two methods on one subject: the JSON, the bars and the mean report, whose notes carry the evaluation's."""
    cmp = load_script("comparison")
    out = tmp_path / "c"
    argv = ["--subjects", "teal_bag", "--methods", "zoodip,ti", "--steps", "2", "--memory-arch", "none",
            "--images-per-prompt", "1", "--prompts", "composition", "--eval-steps", "2", "--threads", "1",
            "--model", str(tiny_model), "--evaluator", str(random_evaluator), "--out", str(out)]
    assert cmp.main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["subjects"] == ["teal_bag"] and res["methods"] == ["zoodip", "ti"] and not res["failed_subjects"]
    assert res["steps"] == {"zoodip": 2, "ti": 2}
    for m in ("zoodip", "ti"):
        assert isinstance(res["means"][m]["world_clip_i"], float)
    assert set(res["bars"]) >= {"memory_ordering", "zoodip_vs_dreambooth", "storage", "gfti_below_zoodip",
                                "tuneqdm_s2_vs_peqa"}
    report = (out / "report.md").read_text()
    assert "| zoodip | 1 | int8 | yes |" in report and (out / "figure1.png").is_file()
    assert "no evaluation" not in report and "meaningful on the embedded model only" in report
    # --refresh-memory: new memory rows in the same report, the quality columns and bars untouched
    before = json.loads((out / "report.json").read_text())
    assert cmp.main(["--refresh-memory", "--memory-arch", "tiny", "--memory-steps", "1", "--threads", "1",
                     "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    after = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in after["rows"]] == ["zoodip", "ti"]
    for b, r in zip(before["rows"], after["rows"]):
        assert r["world_clip_i"] == b["world_clip_i"] and r["steps"] == b["steps"]
        assert b.get("memory_mib") is None and r["memory_mib"] > 0 and r["memory_arch"] == "tiny"
    assert after["bars"]["tuneqdm_s2_vs_peqa"] == before["bars"]["tuneqdm_s2_vs_peqa"]
    assert res["bars"]["zoodip_vs_dreambooth"] == after["bars"]["zoodip_vs_dreambooth"]
    assert after["settings"]["memory_arch"] == "tiny" and after["settings"]["subjects"] == ["teal_bag"]
    assert sum(n.startswith(("train memory:", "memory columns measured again")) for n in after["notes"]) == 2
    assert set(after["notes"]) >= set(before["notes"])
    # --refresh-memory --methods ti: ti's memory row measured again, zoodip's kept from memory.json
    mem_before = json.loads((out / "memory-tiny" / "memory.json").read_text())
    assert cmp.main(["--refresh-memory", "--methods", "ti", "--memory-arch", "tiny", "--memory-steps", "1",
                     "--threads", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    mem = json.loads((out / "memory-tiny" / "memory.json").read_text())
    assert [r["method"] for r in mem["rows"]] == ["zoodip", "ti"] and mem["rows"][0] == mem_before["rows"][0]
    assert mem["rows"][1]["process_seconds"] != mem_before["rows"][1]["process_seconds"]    # measured again
    assert set(mem["summary"]["whole_process_ratio_to_lowest"]) == {"zoodip (int8)", "ti (none)"}
    part = json.loads((out / "report.json").read_text())
    assert part["rows"][0]["memory_mib"] == after["rows"][0]["memory_mib"]
    assert [n for n in part["notes"] if n.startswith("memory rows of ti measured again")]
    assert not [n for n in part["notes"] if n.startswith("memory columns measured again")]
    assert cmp.main(["--refresh-memory", "--methods", "dreambooth", "--memory-arch", "tiny", "--out", str(out)]) == 2
    assert "not in the report" in json.loads(capsys.readouterr().out)["error"]
    assert json.loads((out / "report.json").read_text()) == part                    # nothing overwritten
    after = part
    assert cmp.main(["--refresh-memory", "--out", str(tmp_path / "nowhere")]) == 2
    assert "no report.json" in json.loads(capsys.readouterr().out)["error"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "report.json").write_text("{not json")
    assert cmp.main(["--refresh-memory", "--out", str(tmp_path / "bad")]) == 2
    assert "is not a comparison report" in json.loads(capsys.readouterr().out)["error"]
    assert (tmp_path / "bad" / "report.json").read_text() == "{not json"      # nothing overwritten
    # --refresh-methods: ti trained again (other steps) on the report's subjects and protocol; zoodip's row kept
    refresh = ["--refresh-methods", "ti", "--steps", "3", "--prompts", "composition", "--eval-steps", "2",
               "--threads", "1", "--evaluator", str(random_evaluator), "--out", str(out)]
    assert cmp.main(refresh) == 0
    res = json.loads(capsys.readouterr().out)
    again = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in again["rows"]] == ["zoodip", "ti"] and res["steps"] == {"zoodip": 2, "ti": 3}
    assert again["rows"][0] == after["rows"][0]                                    # zoodip untouched
    assert again["rows"][1]["memory_mib"] == after["rows"][1]["memory_mib"]        # memory columns kept
    assert (out / "refresh" / "teal_bag" / "runs" / "ti" / "run.json").is_file()
    assert any("trained and evaluated again" in n for n in again["notes"])
    assert cmp.main(["--refresh-methods", "dreambooth", "--out", str(out)]) == 2
    assert "not in the report" in json.loads(capsys.readouterr().out)["error"]
    assert json.loads((out / "report.json").read_text()) == again                 # nothing overwritten


@pytest.mark.slow
def test_tuneqdm_interval_study_trains_every_interval(tiny_model, random_evaluator, tmp_path, capsys):
    bench = load_script("tuneqdm_study")
    argv = harness_argv(tiny_model, random_evaluator, tmp_path / "s1", "--steps", "2")
    assert bench.main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["study"] == "interval" and set(res["variants"]) == {"floor", "peqa", *bench.INTERVALS}
    assert res["variants"]["s1-low"]["t_low"] == 0 and res["shipped"] == "s1-high"
    assert res["best_by_prompt_accuracy_plus_clip_i"] in bench.INTERVALS
    for v in ("peqa", *bench.INTERVALS):
        assert isinstance(res["variants"][v]["world_clip_i"], float), v
        cfg = tomllib.loads((tmp_path / "s1" / "runs" / "teal_bag" / v / "config.toml").read_text())
        if v == "peqa":
            assert cfg["method"] == "peqa"
        else:
            assert cfg["method"] == "tuneqdm-s1"
            assert [cfg["tuneqdm_s1"]["t_low"], cfg["tuneqdm_s1"]["t_high"]] == list(bench.INTERVALS[v])


@pytest.mark.slow
def test_tuneqdm_experts_study_stores_one_set_per_expert(tiny_model, random_evaluator, tmp_path, capsys):
    bench = load_script("tuneqdm_study")
    argv = harness_argv(tiny_model, random_evaluator, tmp_path / "n", "--study", "experts", "--steps", "2")
    assert bench.main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["variants"]) == {"floor", "peqa", *bench.EXPERTS} and res["shipped"] == "tuneqdm-n4"
    for v, n in bench.EXPERTS.items():
        cfg = tomllib.loads((tmp_path / "n" / "runs" / "teal_bag" / v / "config.toml").read_text())
        assert cfg["method"] == "tuneqdm" and cfg["tuneqdm"]["num_experts"] == n
        assert isinstance(res["variants"][v]["prompt_accuracy"], float), v
    size = {v: res["variants"][v]["storage_bytes"] for v in bench.EXPERTS}
    per_set = size["tuneqdm-n2"] - size["tuneqdm-n1"]        # file = header + N output+input scale sets
    assert per_set > 0 and abs(size["tuneqdm-n4"] - size["tuneqdm-n1"] - 3 * per_set) < 0.02 * per_set
    assert res["variants"]["peqa"]["storage_bytes"] < size["tuneqdm-n1"]     # PEQA: output scales only


def test_early_stopping_patience_rule():
    replay = load_script("early_stopping").replay
    curve = [(1, 1.0), (100, 0.9), (200, 0.8), (300, 0.85), (400, 0.82), (500, 0.81), (600, 0.7)]
    assert replay(curve, 3, 1500) == {"stop_step": 500, "best_step": 200, "evaluations": 6}
    assert replay(curve, 1, 1500) == {"stop_step": 300, "best_step": 200, "evaluations": 4}
    assert replay(curve, 5, 1500) == {"stop_step": 1500, "best_step": 600, "evaluations": 7}


@pytest.mark.slow
def test_early_stopping_benchmark_end_to_end(tiny_model, random_evaluator, tmp_path, capsys):
    bench = load_script("early_stopping")
    argv = ["--subjects", "teal_bag", "--steps", "6", "--every", "2", "--draws", "2", "--patience", "1",
            "--images-per-prompt", "1", "--prompts", "composition", "--eval-steps", "2", "--threads", "1",
            "--model", str(tiny_model), "--evaluator", str(random_evaluator), "--out", str(tmp_path / "e")]
    assert bench.main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    row = res["per_subject"][0]
    assert [s for s, _ in row["curve"]] == [1, 2, 4, 6]
    # the held-out passes are counted in the run: 6 steps x 3 + 4 evaluations x 2 draws
    assert row["recorded_passes"] == 6 * 3 + 4 * 2 and row["final_passes"] == 18
    r = row["rules"]["1"]
    assert r["passes"] == 3 * r["stop_step"] + 2 * r["evaluations"]
    assert set(row["scores"]) >= {"floor", "early", "final"}
    assert isinstance(res["means"]["world_clip_i"]["final"], float)
    assert bench.main(argv) == 0                          # a rerun reuses the run and its curve
    assert json.loads(capsys.readouterr().out)["per_subject"][0]["curve"] == row["curve"]


def test_zoodip_study_variants_keep_zoodips_budget():
    studies = load_script("zoodip_study").STUDIES
    for name, (method, section, steps) in studies["sweep"].items():
        passes = (steps or 1500) * (section.get("n", 2) + 1)
        assert method == "ti" or passes == 4500, name                # ZOODiP's n = 2 embedded budget: 1500 x 3
    assert studies["sweep"]["zoodip"] == ("zoodip", {"t_low": 500, "t_high": 900, "n": 2}, 0)   # the paper's interval
    assert studies["sweep"]["zoodip-t800-1000"][1] == {"t_low": 800, "t_high": 1000, "n": 2}
    assert studies["best"]["zoodip-t800-n8"] == ("zoodip", {"t_low": 800, "t_high": 1000, "n": 8}, 500)
    from quantdream.train import EMBEDDED_DEFAULTS
    # every study before "oracle" ran at the then embedded default, n = 2 (the references' "zoodip" rows)
    default = {**EMBEDDED_DEFAULTS["zoodip"]["section"], "n": 2}
    for name, (method, section, steps) in studies["long"].items():   # the default, only longer (one variant also
        assert method == "zoodip" and steps > EMBEDDED_DEFAULTS["zoodip"]["steps"], name  # decays its step size):
        changed = {k for k, v in section.items() if default.get(k) != v}   # the reference's "zoodip" rows are its
        assert changed <= {"schedule"}, name                                # 1,500-step point
    assert studies["long"]["zoodip-t800-9000"] == ("zoodip", {"t_low": 800, "t_high": 1000, "n": 2}, 9000)
    assert studies["fast"]["zoodip-fast-t800"] == ("zoodip-fast", {"t_low": 800, "t_high": 1000, "n": 2}, 0)
    for name, (method, section, steps) in studies["mu"].items():      # the default with only mu moved
        changed = {k for k, v in section.items() if default.get(k) != v}
        assert method == "zoodip" and steps == 0 and changed <= {"mu"}, name
    assert sorted(s.get("mu", 1e-3) for _, s, _ in studies["mu"].values()) == [1e-4, 1e-3, 1e-2, 1e-1]
    oracle = studies["oracle"]                                        # n -> infinity (the expectation), n = 8
    expected = {"t_low": 800, "t_high": 1000, "n": 2, "estimator": "expected"}
    assert oracle["zoodip-t800-expected"] == ("zoodip", expected, 0)
    assert oracle["zoodip-t800-n8-1500"] == ("zoodip", {"t_low": 800, "t_high": 1000, "n": 8}, 1500)
    now = EMBEDDED_DEFAULTS["zoodip"]                                 # ... which is the embedded default now
    assert {**now["section"], **oracle["zoodip-t800-n8-1500"][1]} == now["section"]
    assert oracle["zoodip-t800-n8-1500"][2] == now["steps"]


@pytest.mark.slow
def test_zoodip_study_takes_reference_rows_and_resumes(tiny_model, random_evaluator, tmp_path, capsys):
    bench = load_script("zoodip_study")
    row = {"world_clip_i": 0.2, "effnet": 0.4, "world_clip_t": 0.3, "prompt_accuracy": 0.5, "unet_forward_passes": None}
    ref = {"per_subject": [{**row, "variant": "ti", "subject": "teal_bag", "world_clip_i": 0.4},
                           {**row, "variant": "zoodip", "subject": "teal_bag"},
                           {**row, "variant": "floor (int8)", "subject": "teal_bag", "world_clip_i": 0.1},
                           {**row, "variant": "ti", "subject": "olive_coat", "world_clip_i": 0.9},   # not studied
                           {**row, "variant": "budget-paper", "subject": "teal_bag"}]}
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    argv = ["--study", "best", "--variants", "zoodip-t800", "--reference", str(tmp_path / "ref.json"),
            *harness_argv(tiny_model, random_evaluator, tmp_path / "z", "--steps", "2")]
    assert bench.main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    V = res["variants"]
    assert list(V) == ["reference floor (int8)", "reference ti", "reference zoodip", "zoodip-t800"]
    assert V["reference ti"]["world_clip_i"] == 0.4 and V["reference zoodip"]["world_clip_i_ratio_to_ti"] == 0.5
    assert V["zoodip-t800"]["world_clip_i_ratio_to_ti"] == pytest.approx(V["zoodip-t800"]["world_clip_i"] / 0.4)
    assert V["zoodip-t800"]["settings"] == {"t_low": 800, "t_high": 1000, "n": 2}
    run = tmp_path / "z" / "runs" / "teal_bag" / "zoodip-t800"
    cfg = tomllib.loads((run / "config.toml").read_text())
    assert cfg["method"] == "zoodip" and [cfg["zoodip"]["t_low"], cfg["zoodip"]["t_high"]] == [800, 1000]
    assert cfg["steps"] == 2
    metrics = json.loads((tmp_path / "z" / "eval" / "teal_bag" / "metrics.json").read_text())
    assert [r["run_dir"] for r in metrics["rows"]] == [str(run)]          # no floor: the reference has it
    stamp = (run / "run.json").stat().st_mtime
    assert bench.main(argv) == 0                                            # a rerun reuses run and evaluation
    assert json.loads(capsys.readouterr().out)["variants"] == V
    assert (run / "run.json").stat().st_mtime == stamp
    with pytest.raises(SystemExit, match="unknown variants"):
        bench.main([*argv[:2], "--variants", "nope"])
    (tmp_path / "bad.json").write_text("{not json")
    for bad in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(SystemExit, match="not a benchmarks/personalization.py JSON"):
            bench.main([*argv[:2], "--reference", str(bad)])


@pytest.mark.slow
def test_scale_file_dtype_scores_both_files_of_the_same_scales(tiny_model, random_evaluator, tmp_path, capsys):
    from safetensors import safe_open
    bench = load_script("scale_file_dtype")
    argv = harness_argv(tiny_model, random_evaluator, tmp_path / "d", "--steps", "2")
    assert bench.main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    encodings = {"float32": "absolute", "float16": "delta", "int8": "delta-int8"}
    for m in bench.METHODS:
        r = res["methods"][m]
        assert r["file_bytes"]["int8"] < r["file_bytes"]["float16"] < r["file_bytes"]["float32"]
        for d in bench.COPIES:
            assert isinstance(r[d]["world_clip_i"], float)
            assert abs(r["minus_float32"][d]["world_clip_i"]) < 0.01
            assert 0 < r["rounding"][d]["error_over_change"] < 0.05 and r["rounding"][d]["values"] > 0
        for d, encoding in encodings.items():
            with safe_open(str(tmp_path / "d" / "runs" / "teal_bag" / f"{m}-{d}" / "scales.safetensors"), "pt") as f:
                assert f.metadata()["encoding"] == encoding


def test_token_geometry_measures_moves_against_ti(tmp_path, capsys):
    """TI's own move has cosine 1 with itself; a move orthogonal to it 0; lengths as written."""
    import torch
    from safetensors.torch import save_file
    from quantdream.models.load import load_pipeline
    bench = load_script("token_geometry")
    pipe = load_pipeline("tiny")
    e0 = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer("bag", add_special_tokens=False).input_ids[0]]
    move = torch.zeros(768)
    move[0] = 3.0
    other = torch.zeros(768)
    other[1] = 4.0
    for name, d in (("ti", move), ("half", 0.5 * move), ("orth", other)):
        (tmp_path / name).mkdir()
        save_file({"<teal_bag>": (e0.detach() + d).reshape(1, -1).contiguous()},
                  str(tmp_path / name / "learned_embeds.safetensors"))
    argv = ["--subjects", "teal_bag", "--ti", str(tmp_path / "ti"), "--variant", f"half={tmp_path}/half",
            "--variant", f"orth={tmp_path}/orth"]
    assert bench.main(argv) == 0
    v = json.loads(capsys.readouterr().out)["variants"]
    assert v["ti"]["cosine_with_ti_change"] == pytest.approx(1.0) and v["ti"]["change_norm"] == pytest.approx(3.0)
    assert v["half"]["cosine_with_ti_change"] == pytest.approx(1.0) and v["half"]["change_norm"] == pytest.approx(1.5)
    assert v["orth"]["cosine_with_ti_change"] == pytest.approx(0.0, abs=1e-6)
    assert v["orth"]["change_norm"] == pytest.approx(4.0)


def test_one_off_studies_live_apart_from_the_benchmarks():
    studies = {"zoodip_study", "early_stopping", "token_geometry", "scale_file_dtype", "tuneqdm_study"}
    assert {p.stem for p in (ROOT / "benchmarks" / "studies").glob("*.py")} >= studies
    assert not studies & {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    readme = (ROOT / "benchmarks" / "studies" / "README.md").read_text()
    assert all(f"{s}.py" in readme for s in studies)


def test_latent_probe_crops_cover_every_object_and_score_by_size():
    import numpy as np
    import torch
    from quantdream.world.render import render, sample_scene
    lp = load_script("latent_probe")
    rng = np.random.default_rng(0)
    items = rng.integers(40, 255, (50, 28, 28), dtype=np.uint8)
    scenes = [sample_scene(rng, np.arange(50) % 10) for _ in range(30)]
    boxes = lp.object_crops(scenes)
    assert len(boxes) == sum(len(s.objects) for s in scenes)
    for s in scenes:                             # every object pixel inside its object's box
        _, mask = render(s, items, return_mask=True)
        inside = np.zeros_like(mask, dtype=bool)
        for i, x0, y0, side, _, _ in boxes:
            if scenes[i] is s:
                inside[y0:y0 + side, x0:x0 + side] = True
        assert not (mask > 0)[~inside].any()
    assert {b[5] for b in boxes} <= {"small", "large", "two objects"}
    x = torch.randn(30, 8, 16, 16)
    assert lp.crop(x, boxes, 4, lp.LATENT_CROP).shape == (len(boxes), 8, 8, 8)
    assert lp.probe(3, lp.PIXEL_CROP)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    keys = ["small", "large", "small", "large"]
    assert lp.score(torch.tensor([1, 2, 0, 0]), torch.tensor([1, 2, 3, 3]), keys) == {"all": 0.5, "large": 0.5, "small": 0.5}
