"""`quantdream batch`: a jobs file checked before Ray starts; jobs as Ray tasks; a killed worker's job
continues from its checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantdream.cli.main import main

SUBJECTS = Path(__file__).resolve().parent.parent / "examples" / "subjects"


def write_jobs(path: Path, body: str, defaults: str = 'steps = 6\ncheckpoint_every = 3\n'
                                                     'set = ["sample_steps=2", "sample_images=1"]\n') -> Path:
    path.write_text(f"[defaults]\n{defaults}\n{body}")
    return path


def job(subject: str, method: str, extra: str = "") -> str:
    return f'[[job]]\nsubject = "{SUBJECTS / subject}"\nmethod = "{method}"\n{extra}\n'


def batch_error(capsys, jobs: Path, out: Path) -> str:
    assert main(["batch", str(jobs), "--out", str(out)]) == 2
    assert not out.exists()                       # nothing written, Ray never started
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err              # one line
    return err


def test_bad_jobs_files(tmp_path, capsys):
    out = tmp_path / "out"
    err = batch_error(capsys, write_jobs(tmp_path / "a.toml", '[[job]]\nmethod = "ti"\n'), out)
    assert "job 1: missing key 'subject'" in err
    err = batch_error(capsys, write_jobs(tmp_path / "b.toml", job("teal_bag", "magic")), out)
    assert "job 1: unknown method 'magic'" in err
    err = batch_error(capsys, write_jobs(tmp_path / "c.toml", job("teal_bag", "ti") + job("nope", "ti")), out)
    assert "job 2: subject" in err and "does not exist" in err
    err = batch_error(capsys, write_jobs(tmp_path / "d.toml", job("teal_bag", "ti") + job("teal_bag", "ti")), out)
    assert "duplicate job name 'teal_bag-ti'" in err
    err = batch_error(capsys, write_jobs(tmp_path / "e.toml", job("teal_bag", "ti", "stpes = 3")), out)
    assert "unknown key 'stpes'; did you mean 'steps'?" in err
    err = batch_error(capsys, write_jobs(tmp_path / "f.toml", job("teal_bag", "zoodip", 'set = ["zoodip.lrr=1"]')), out)
    assert "teal_bag-zoodip" in err and "lrr" in err
    err = batch_error(capsys, write_jobs(tmp_path / "g.toml", ""), out)
    assert "no [[job]] entries" in err
    assert "does not exist" in batch_error(capsys, tmp_path / "missing.toml", out)


def test_memory_requests():
    from quantdream.batch import MARGIN, SD15_PEAK_MIB, TINY_PEAK_MIB, estimate_memory_mib
    assert estimate_memory_mib("dreambooth", "/models/sd15") == int(SD15_PEAK_MIB["dreambooth"] * MARGIN)
    assert estimate_memory_mib("zoodip", "/models/sd15") < estimate_memory_mib("ti", "/models/sd15")
    assert estimate_memory_mib("ti", "tiny") == int(TINY_PEAK_MIB * MARGIN)


@pytest.mark.slow
def test_two_jobs_on_local_ray_one_worker_killed(tmp_path, monkeypatch, capsys):
    """Two jobs on a 1-CPU local Ray; the zoodip job's first worker dies right after its step-3 checkpoint,
    Ray starts it again and the new attempt continues at step 3 (not 0); the batch completes. Workers are
    kept between jobs: three attempts ran in two processes, and the resumed token equals, bit for bit, the
    token of the same run done in one go by personalize (nothing leaks from one job to the next)."""
    pytest.importorskip("ray")
    from safetensors.torch import load_file
    monkeypatch.setenv("QUANTDREAM_TEST_KILL_AFTER_CHECKPOINT", "teal_bag-zoodip")
    jobs = write_jobs(tmp_path / "jobs.toml", job("teal_bag", "zoodip") + job("coral_top", "ti", 'name = "top"'),
                      defaults='steps = 6\ncheckpoint_every = 3\nthreads = 1\n'
                               'set = ["sample_steps=2", "sample_images=1"]\n')
    out = tmp_path / "out"
    assert main(["batch", str(jobs), "--out", str(out), "--num-cpus", "1", "--retries", "1"]) == 0
    report = json.loads((out / "batch.json").read_text())
    rows = {r["job"]: r for r in report["rows"]}
    assert list(rows) == ["teal_bag-zoodip", "top"] and report["cluster"]["cpus"] == 1
    pids = [json.loads(line)["pid"] for name in rows
            for line in (out / "attempts" / f"{name}.jsonl").read_text().splitlines()]
    assert len(pids) == 3 and len(set(pids)) == 2, pids      # the killed worker's replacement ran the rest
    for name, r in rows.items():
        assert r["status"] == "ok" and r["steps"] == 6, r
        run = json.loads((out / "runs" / name / "run.json").read_text())
        assert run["steps"] == 6 and r["output"] == str(out / "runs" / name)
        assert r["peak_mib"] > 0 and r["num_cpus"] == 1 and r["memory_request_mib"] > r["peak_mib"]
    assert rows["teal_bag-zoodip"]["attempts"] == 2
    assert rows["teal_bag-zoodip"]["resumed_from"] == [0, 3]     # the retry continued from the checkpoint
    assert rows["top"]["attempts"] == 1 and rows["top"]["resumed_from"] == [0]
    assert (out / "runs" / "teal_bag-zoodip" / "learned_embeds.safetensors").is_file()
    md = (out / "batch.md").read_text()
    assert "| teal_bag-zoodip | zoodip | ok | 6 |" in md and "| top | ti | ok | 6 |" in md
    run = json.loads((out / "runs" / "teal_bag-zoodip" / "run.json").read_text())
    alone = tmp_path / "alone"
    assert main(["personalize", "--images", str(SUBJECTS / "teal_bag"), "--token", run["token"], "--init-word",
                 run["init_word"], "--method", "zoodip", "--steps", "6", "--threads", "1", "--out", str(alone),
                 "--set", "sample_steps=2", "--set", "sample_images=1"]) == 0
    a = load_file(out / "runs" / "teal_bag-zoodip" / "learned_embeds.safetensors")
    b = load_file(alone / "learned_embeds.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_a_job_larger_than_the_cluster_is_refused():
    from types import SimpleNamespace

    from quantdream.batch import check_fits
    jobs = [SimpleNamespace(name="small", num_cpus=1, memory_mib=1000), SimpleNamespace(name="big", num_cpus=1,
                                                                                        memory_mib=9000)]
    check_fits(jobs[:1], {"CPU": 2, "memory": 4096 * 2**20})
    with pytest.raises(ValueError, match="job 'big' asks for 1 CPUs and 9000 MiB but the Ray cluster has 2 CPUs "
                                         "and 4096 MiB"):
        check_fits(jobs, {"CPU": 2, "memory": 4096 * 2**20})
    with pytest.raises(ValueError, match="job 'small' asks for 1 CPUs"):
        check_fits(jobs[:1], {"CPU": 0.5, "memory": 4096 * 2**20})

