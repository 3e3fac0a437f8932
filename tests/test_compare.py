"""`quantdream compare`: two methods end to end on a random tiny model and a random world evaluator (the
numbers are meaningless, the plumbing is not): one report whose numbers are the runs', the bench's and
the evaluation's; --resume keeps finished methods; clear errors for bad inputs; the report functions."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from quantdream.cli.main import build_parser, main
from quantdream.eval import report as rep

SUBJECT = Path(__file__).resolve().parent.parent / "examples" / "subjects" / "teal_bag"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def compare_args(model, out, *extra, methods="zoodip,peqa", evaluator=None):
    args = ["compare", "--subject", str(SUBJECT), "--methods", methods, "--out", str(out), "--model", str(model),
            "--steps", "2", "--threads", "1", "--images-per-prompt", "1", "--prompts", "property", "--eval-steps", "2",
            "--set", "sample_steps=2", "--set", "sample_images=1"]
    if evaluator is not None:
        args += ["--evaluator", str(evaluator)]
    return args + list(extra)


@pytest.fixture(scope="module")
def compared(tiny_model, random_evaluator, tmp_path_factory):
    """zoodip (token, gradient-free) and peqa (weights, identifier prompt), 2 steps each, memory on tiny."""
    out = tmp_path_factory.mktemp("cmp") / "teal_bag"
    rc = main(compare_args(tiny_model, out, "--memory-arch", "tiny", "--memory-steps", "1",
                           evaluator=random_evaluator))
    assert rc == 0
    return out


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_report_has_table1_row_per_method(compared):
    md = (compared / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    for col in ("train memory (MiB)", "bench storage", "storage", "world CLIP-T", "world CLIP-I", "DINO stand-in (EffNet-Lite0)",
                "prompt acc.", "UNet passes", "time (s)"):
        assert col in header, col
    ncols = header.count("|")
    for m in ("zoodip", "peqa"):
        line = next(line for line in md.splitlines() if line.startswith(f"| {m} |"))
        assert line.count("|") == ncols
    assert "![training memory vs world_clip_i](figure1.png)" in md
    assert "eval/grids/zoodip__teal_bag.png" in md and "grids/prompt_00_a_red_bag.png" in md


@pytest.mark.slow
def test_figure_and_grids_are_pngs(compared):
    fig = compared / "figure1.png"
    assert fig.read_bytes()[:8] == PNG_MAGIC
    with Image.open(fig) as im:
        im.verify()
    report = json.loads((compared / "report.json").read_text())
    assert report["figure"]["x"] == "memory_mib" and report["figure"]["y"] == "world_clip_i"
    assert "zoodip" in report["figure"]["plotted"]
    assert [g["prompt"] for g in report["prompt_grids"]] == ["a red bag", "a purple bag", "a small bag", "a large bag"]
    for g in report["prompt_grids"]:
        with Image.open(compared / g["file"]) as im:        # rows: the 2 methods, columns: 1 image (64 px)
            assert im.height == 2 * 66 + 2
    for m, grid in report["method_grids"].items():
        assert (compared / grid).is_file(), m


@pytest.mark.slow
def test_report_numbers_are_the_runs_bench_and_evaluation(compared):
    report = json.loads((compared / "report.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["zoodip", "peqa"]
    metrics = json.loads((compared / "eval" / "metrics.json").read_text())
    memory = json.loads((compared / "memory" / "memory.json").read_text())
    for m, row in rows.items():
        run = json.loads((compared / "runs" / m / "run.json").read_text())
        assert row["status"] == "ok" and row["steps"] == run["steps"] == 2
        assert row["unet_forward_passes"] == run["unet_forward_passes"]
        assert row["seconds"] == run["seconds"] and row["storage_bytes"] == run["output_bytes"] > 0
        assert row["weights"] == run["weights"] == "int8"
        assert row["run_peak_mib"] == run["peak_memory_training"]["vmhwm_mib"]
        ev = next(r for r in metrics["rows"] if r["method"] == m)
        for k in ("world_clip_i", "world_clip_t", "effnet", "prompt_accuracy"):
            assert row[k] == ev["metrics"][k], k
    assert rows["zoodip"]["unet_forward_passes"] == 6 and rows["zoodip"]["gradient_free"]
    assert not rows["peqa"]["gradient_free"]
    # memory rows land in the table: zoodip's is the bench's training VmHWM
    bench = next(r for r in memory["rows"] if r["method"] == "zoodip")
    assert rows["zoodip"]["memory_mib"] == bench["training_peak"]["vmhwm_mib"] > 0
    assert rows["zoodip"]["memory_arch"] == "tiny" and report["memory_ratio_to_zoodip"]["zoodip"] == 1.0
    assert (compared / "memory" / "memory.md").is_file()
    md = (compared / "report.md").read_text()
    assert f"| zoodip | int8 | yes | {bench['training_peak']['vmhwm_mib']:.0f} |" in md


@pytest.mark.slow
def test_resume_keeps_finished_methods(compared, tiny_model, random_evaluator, tmp_path, capsys):
    out = tmp_path / "cmp"
    shutil.copytree(compared, out)
    kept = (out / "runs" / "zoodip" / "run.json").stat().st_mtime_ns
    (out / "runs" / "peqa" / "run.json").unlink()            # peqa stopped after its checkpoint
    capsys.readouterr()
    # without --resume the folder is refused
    assert main(compare_args(tiny_model, out, "--memory-arch", "none", evaluator=random_evaluator)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(compare_args(tiny_model, out, "--memory-arch", "none", "--resume", evaluator=random_evaluator)) == 0
    err = capsys.readouterr().err
    assert "zoodip: finished earlier, kept" in err and "peqa: continuing" in err
    assert (out / "runs" / "zoodip" / "run.json").stat().st_mtime_ns == kept
    assert json.loads((out / "runs" / "peqa" / "run.json").read_text())["steps"] == 2
    report = json.loads((out / "report.json").read_text())
    assert [r["status"] for r in report["rows"]] == ["ok", "ok"] and report["settings"]["memory_arch"] == "none"
    # all finished: a second --resume only rewrites the report
    assert main(compare_args(tiny_model, out, "--memory-arch", "none", "--resume", evaluator=random_evaluator)) == 0
    err = capsys.readouterr().err
    assert "peqa: finished earlier, kept" in err and "evaluated earlier: kept" in err
    # a finished run that differs from what is asked is refused, not silently reused
    assert main(compare_args(tiny_model, out, "--memory-arch", "none", "--resume", "--method-steps", "zoodip=3",
                             evaluator=random_evaluator)) == 2
    assert "steps: 2 (asked 3)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad inputs
def run_error(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(["compare", *argv]) == 2
    return capsys.readouterr().err


def test_unknown_methods_are_named_with_the_valid_ones(tmp_path, capsys):
    err = run_error(capsys, "--subject", str(SUBJECT), "--methods", "zoodip,magic", "--out", str(tmp_path / "o"))
    assert "unknown method 'magic'" in err and "zoodip, zoodip-fast, ti, gf-ti, dreambooth" in err and "or all" in err
    err = run_error(capsys, "--subject", str(SUBJECT), "--methods", " , ", "--out", str(tmp_path / "o"))
    assert "--methods is empty" in err
    err = run_error(capsys, "--subject", str(SUBJECT), "--methods", "zoodip", "--method-steps", "ti=3",
                    "--out", str(tmp_path / "o"))
    assert "not among --methods" in err
    assert not (tmp_path / "o").exists()


def test_bad_subject_folders(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert "does not exist" in run_error(capsys, "--subject", str(tmp_path / "nope"), "--out", out)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    err = run_error(capsys, "--subject", str(tmp_path / "empty"), "--out", out)
    assert "no images in" in err and "notes.txt" in err
    (tmp_path / "file.png").write_bytes(b"")
    assert "is a file" in run_error(capsys, "--subject", str(tmp_path / "file.png"), "--out", out)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "00.png")
    err = run_error(capsys, "--subject", str(photos), "--out", out)
    assert "has no subject.json; give --init-word" in err
    assert not (tmp_path / "o").exists()


def test_bad_out_and_settings(tiny_model, tmp_path, capsys):
    base = ["--subject", str(SUBJECT), "--methods", "zoodip,peqa", "--model", str(tiny_model)]
    (tmp_path / "f").write_text("x")
    assert "is a file; give a folder" in run_error(capsys, *base, "--out", str(tmp_path / "f"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not empty" in run_error(capsys, *base, "--out", str(tmp_path / "full"))
    out = str(tmp_path / "o")
    err = run_error(capsys, *base, "--out", out, "--set", "zoodip.lrr=1")
    assert "unknown setting zoodip.lrr" in err and "zoodip.lr" in err
    assert "unknown setting 'sample_step'" in run_error(capsys, *base, "--out", out, "--set", "sample_step=2")
    assert "--memory-steps must be >= 1" in run_error(capsys, *base, "--out", out, "--memory-steps", "0")
    assert "unknown kind" in run_error(capsys, *base, "--out", out, "--prompts", "colour")
    assert "does not exist" in run_error(capsys, *base[:-1], str(tmp_path / "no-model"), "--out", out)
    assert not (tmp_path / "o").exists()


def test_plain_photos_get_a_subject_file(tiny_model, tmp_path):
    from quantdream.cli.compare import make_plan, start
    from quantdream.eval.protocol import reference_images, select_prompts
    from quantdream.world.subjects import load_subject
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(photos / f"{i:02d}.png")
    args = build_parser().parse_args(["compare", "--subject", str(photos), "--init-word", "bag", "--methods",
                                      "zoodip,dreambooth", "--model", str(tiny_model), "--out",
                                      str(tmp_path / "o"), "--memory-arch", "none"])
    plan = make_plan(args)
    assert not (tmp_path / "o").exists()                    # validate, then write
    assert plan.configs["zoodip"].token == "<photos>" and plan.configs["dreambooth"].token == ""
    assert plan.configs["dreambooth"].out == str(tmp_path / "o" / "runs" / "dreambooth")
    start(plan)
    subj = load_subject(plan.subject_dir)
    assert subj["class_word"] == "bag" and len(reference_images(subj)) == 3
    assert {p["kind"] for p in select_prompts(subj, None)} == {"context", "property", "composition"}


def test_method_weights_reach_runs_and_bench(tiny_model, tmp_path, capsys):
    from quantdream.cli.compare import make_plan
    argv = ["compare", "--subject", str(SUBJECT), "--methods", "zoodip,ti,peqa", "--model", str(tiny_model),
            "--out", str(tmp_path / "o"), "--memory-arch", "tiny"]
    plan = make_plan(build_parser().parse_args(argv))                 # default: each method's own (ti unquantized)
    assert {m: c.weights for m, c in plan.configs.items()} == {"zoodip": "auto", "ti": "auto", "peqa": "auto"}
    assert [s.weights for s in plan.memory_specs] == ["int8", "none", "int8"]     # what each run trains on
    plan = make_plan(build_parser().parse_args(argv + ["--method-weights", "zoodip=int4"]))
    assert plan.configs["zoodip"].weights == "int4" and plan.configs["ti"].weights == "auto"
    assert plan.memory_specs[0].weights == "int4"
    assert "not one of auto" in run_error(capsys, *argv[1:], "--method-weights", "zoodip=int3")
    assert "--weights none does not apply to --method peqa" in run_error(capsys, *argv[1:], "--method-weights",
                                                                         "peqa=none")
    assert "not among --methods" in run_error(capsys, *argv[1:], "--method-weights", "lora=nf4")


def test_run_folder_states(tmp_path):
    from quantdream.cli.compare import _run_state
    from quantdream.train import build_config
    cfg = build_config(overrides=dict(method="zoodip", model="m", seed=0))
    assert _run_state(tmp_path / "new", cfg, "int8") == "new"
    d = tmp_path / "run"
    (d / "samples").mkdir(parents=True)
    (d / "config.toml").write_text("")
    assert _run_state(d, cfg, "int8") == "stale"                     # died before its first checkpoint: start again
    (d / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match=r"holds \['mine.txt'\] but neither run.json nor checkpoint.pt"):
        _run_state(d, cfg, "int8")
    (d / "checkpoint.pt").write_bytes(b"")
    assert _run_state(d, cfg, "int8") == "checkpoint"
    (d / "run.json").write_text(json.dumps({"method": "zoodip", "model": "m", "seed": 0, "steps": 5,
                                            "weights": "int8"}))
    assert _run_state(d, cfg, "int8") == "finished"
    with pytest.raises(ValueError, match=r"seed: 0 \(asked 1\)"):
        _run_state(d, build_config(overrides=dict(method="zoodip", model="m", seed=1)), "int8")
    with pytest.raises(ValueError, match=r"weights: 'int8' \(asked 'int4'\)"):
        _run_state(d, cfg, "int4")


def test_a_failing_method_does_not_stop_the_others(tiny_model, tmp_path, monkeypatch):
    from types import SimpleNamespace
    from quantdream.cli.compare import make_plan, train_all
    plan = make_plan(build_parser().parse_args(["compare", "--subject", str(SUBJECT), "--methods", "peqa,zoodip",
                                                "--model", str(tiny_model), "--out", str(tmp_path / "o")]))
    calls = []

    def fake_personalize(cfg, progress=False):
        calls.append(cfg.method)
        if cfg.method == "peqa":
            raise RuntimeError("no kernel for this device")
        return SimpleNamespace(completed=cfg.steps != 7, step=1,
                               summary={"method": cfg.method, "steps": 2, "unet_forward_passes": 6, "seconds": 0.1})
    monkeypatch.setattr("quantdream.train.personalize", fake_personalize)
    runs, interrupted = train_all(plan)
    assert calls == ["peqa", "zoodip"] and not interrupted
    assert runs["peqa"] == {"status": "failed", "note": "RuntimeError: no kernel for this device",
                            "run_dir": str(tmp_path / "o" / "runs" / "peqa")}
    rows = rep.method_rows(runs)
    assert [r["status"] for r in rows] == ["failed", "ok"] and rows[1]["unet_forward_passes"] == 6
    plan.configs["zoodip"].steps = 7                         # personalize reports an interruption: stop there
    runs, interrupted = train_all(plan)
    assert interrupted and "zoodip" not in runs


# ----------------------------------------------------------------------------- report functions
def fake_inputs():
    runs = {"zoodip": {"method": "zoodip", "weights": "int8", "steps": 10, "unet_forward_passes": 30, "seconds": 2.0,
                       "output_bytes": 3152, "peak_memory_training": {"vmhwm_mib": 600.0}, "run_dir": "r/zoodip"},
            "dreambooth": {"method": "dreambooth", "weights": "none", "steps": 10, "unet_forward_passes": 10,
                           "seconds": 5.0, "output_bytes": 10_000_000,
                           "peak_memory_training": {"vmhwm_mib": 900.0, "cuda_max_allocated_mib": 4000.0},
                           "run_dir": "r/dreambooth"},
            "qlora": {"status": "failed", "note": "ValueError: no bitsandbytes", "run_dir": "r/qlora"}}
    evaluation = {"rows": [
        {"name": "zoodip", "method": "zoodip", "run_dir": "r/zoodip", "grid": "grids/zoodip__s.png",
         "metrics": {"world_clip_i": 0.7, "effnet": 0.5, "prompt_accuracy": 0.4, "prompt_accuracy_attributes": {}}},
        {"name": "dreambooth", "method": "dreambooth", "run_dir": "r/dreambooth", "grid": "grids/dreambooth__s.png",
         "metrics": {"world_clip_i": 0.8, "effnet": 0.6, "prompt_accuracy": 0.5}}], "notes": ["a note"]}
    memory = {"rows": [
        {"method": "zoodip", "arch": "sd15", "status": "ok", "training_peak": {"vmhwm_mib": 1000.0},
         "whole_process_peak_mib": 1100.0, "storage_bytes": 3160},
        {"method": "dreambooth", "arch": "sd15", "status": "ok", "training_peak": {"vmhwm_mib": 9000.0}},
        {"method": "qlora", "arch": "sd15", "status": "not implemented", "note": "not in this build"}]}
    return runs, evaluation, memory


def test_rows_ratios_and_means():
    runs, evaluation, memory = fake_inputs()
    rows = rep.method_rows(runs, evaluation, memory)
    z, db, q = rows
    assert z["memory_mib"] == 1000.0 and z["run_peak_mib"] == 600.0 and db["run_peak_mib"] == 4000.0
    assert z["world_clip_i"] == 0.7 and z["grid"] == "eval/grids/zoodip__s.png"
    assert "prompt_accuracy_attributes" not in z
    assert q["status"] == "failed" and q["memory_note"] == "not in this build" and q["memory_mib"] is None
    assert rep.ratios_to(rows, "memory_mib", "zoodip") == {"zoodip": 1.0, "dreambooth": 9.0}
    assert rep.fidelity_key(rows) == "world_clip_i" and rep.memory_key(rows) == "memory_mib"
    other = [dict(r, world_clip_i=(r["world_clip_i"] or 0) + 0.1) if r["status"] == "ok" else r for r in rows]
    means = {r["method"]: r for r in rep.mean_rows([rows, other])}
    assert means["zoodip"]["world_clip_i"] == pytest.approx(0.75) and means["zoodip"]["subjects"] == 2
    assert means["qlora"]["subjects"] == 0 and means["qlora"]["status"] == "failed"
    md = "\n".join(rep.table_markdown(list(means.values())))
    assert "| qlora (failed:" in md and md.startswith("| method | subjects | quant |")


def test_report_markdown_and_figure_without_memory(tmp_path):
    runs, evaluation, _ = fake_inputs()
    rows = rep.method_rows(runs, evaluation)                 # no bench: the in-run peak is plotted
    fig = rep.figure1(rows, tmp_path / "f.png")
    assert fig["x"] == "run_peak_mib" and fig["plotted"] == ["zoodip", "dreambooth"] and "qlora" in fig["left_out"]
    assert (tmp_path / "f.png").read_bytes()[:8] == PNG_MAGIC
    report = rep.build_report(rows, subject={"name": "s", "class_word": "bag"}, settings={"seed": 0},
                              evaluation=evaluation, figure=fig)
    md = rep.report_markdown(report)
    assert "| zoodip | int8 | yes |" in md and "10.0 MB" in md and "- a note" in md
    assert report["memory_ratio_to_zoodip"]["dreambooth"] == pytest.approx(4000 / 600)
    # nothing measurable: the figure still exists and says why
    empty = rep.figure1([rep.empty_row("zoodip")], tmp_path / "g.png")
    assert empty["plotted"] == [] and (tmp_path / "g.png").is_file()
