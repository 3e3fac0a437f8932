"""`quantdream serve`: every API endpoint and the safety rules, with a stand-in for the CLI jobs (tests/fake_cli.py)
so that queue, stop, resume, kill -9 and restart are exercised in seconds. The real commands run in the browser
test (test_server_browser.py)."""
import io
import json
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from quantdream.cli.main import main  # noqa: E402
from quantdream.server.app import create_app  # noqa: E402
from quantdream.server.store import ServeConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "subjects"
H = {"X-Quantdream": "1"}


@pytest.fixture
def fake_python(tmp_path):
    """An 'interpreter' that runs tests/fake_cli.py with the server's arguments."""
    w = tmp_path / "fake-python"
    w.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests' / 'fake_cli.py'} \"$@\"\n")
    w.chmod(w.stat().st_mode | stat.S_IEXEC)
    return str(w)


@pytest.fixture
def serve(tmp_path, fake_python, monkeypatch):
    """serve(**config) -> a TestClient on a fresh app (queue running); closed at the end."""
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.03")
    clients = []

    def make(**kw):
        cfg = ServeConfig(**{"data": str(tmp_path / "data"), "examples": str(EXAMPLES), "python": fake_python, **kw})
        c = TestClient(create_app(cfg), base_url="http://127.0.0.1")
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def wait(client, run_id, pred, timeout=60.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        r = client.get(f"/api/runs/{run_id}").json()
        if pred(r):
            return r
        time.sleep(0.05)
    raise AssertionError(f"timed out; last state {r['state']} step {r['progress']['step']} error {r.get('error')}; log {r.get('log_tail')}")


def new_run(client, **fields):
    data = {"subject": "teal_bag", "method": "zoodip-fast", "steps": "40", "sample_every": "10",
            "checkpoint_every": "10", "sample_images": "1", "sample_steps": "2", **fields}
    r = client.post("/api/runs", data=data, headers=H)
    assert r.status_code == 201, r.text
    return r.json()


def photos(n=3):
    return [("photos", (p.name, p.read_bytes(), "image/png")) for p in sorted((EXAMPLES / "teal_bag").glob("*.png"))[:n]]


def run_dirs(client):
    return sorted(p.name for p in (client.app.state.store.runs_dir).iterdir())


# ----------------------------------------------------------------------------- pages, options, plan
def test_pages_options_plan(serve):
    c = serve()
    for path in ("/", "/new", "/compare", "/static/style.css", "/static/app.js"):
        r = c.get(path)
        assert r.status_code == 200, path
    assert "<title>New run" in c.get("/new").text
    o = c.get("/api/options").json()
    assert [m["name"] for m in o["models"]] == ["embedded"] and "zoodip" in o["methods"]
    assert {"name": "teal_bag", "class_word": "bag"}.items() <= next(e for e in o["examples"] if e["name"] == "teal_bag").items()
    assert o["default_steps"]["embedded"]["zoodip"] == 1500 and o["default_steps"]["sd"]["zoodip"] == 30000
    p = c.get("/api/plan", params={"method": "zoodip-fast", "model": "embedded", "steps": 100}).json()
    assert p["steps"] == 100 and p["total_seconds"] == pytest.approx(p["setup_seconds"] + 100 * p["seconds_per_step"], abs=0.1)
    assert p["memory_mib"] > 100
    assert c.get("/api/plan", params={"method": "dreambooth", "model": "embedded"}).json()["total_seconds"] is None
    assert c.get("/api/plan", params={"method": "nope"}).status_code == 400
    assert c.get("/api/plan", params={"model": "../../etc"}).status_code == 400
    assert c.get("/runs/no-such-run").status_code == 404
    assert c.get("/static/..%2f..%2fapp.py").status_code == 404


# ----------------------------------------------------------------------------- the whole life of a run
def test_run_lifecycle(serve):
    c = serve()
    run = new_run(c, name="Teal bag")
    rid = run["id"]
    assert run["state"] in ("queued", "running") and run["params"]["token"] == "<teal-bag>"
    assert run["params"]["init_word"] == "bag" and run["photos"][:2] == ["00.png", "01.png"]
    r = wait(c, rid, lambda r: r["state"] == "done")
    p = r["progress"]
    assert p["step"] == p["steps"] == 40 and p["samples"][-1] == "step_000040.png" and len(p["curve"]) == 2
    assert r["downloads"][:1] == ["learned_embeds.safetensors"] and "run.json" in r["downloads"]
    d = c.get(f"/api/runs/{rid}/files/out/learned_embeds.safetensors", params={"download": 1})
    assert d.status_code == 200 and d.content == b"fake" and "attachment" in d.headers["content-disposition"]
    assert c.get(f"/api/runs/{rid}/files/photos/00.png").headers["content-type"] == "image/png"
    assert "--method zoodip-fast" in c.get(f"/api/runs/{rid}/log").text
    assert [x["id"] for x in c.get("/api/runs").json()["runs"]] == [rid]
    with c.stream("GET", f"/api/runs/{rid}/events") as s:          # server-sent events: the same record
        line = next(l for l in s.iter_lines() if l.startswith("data: "))
    assert json.loads(line[6:])["state"] == "done"
    with c.stream("GET", "/api/events") as s:
        line = next(l for l in s.iter_lines() if l.startswith("data: "))
    assert json.loads(line[6:])["runs"][0]["id"] == rid
    # generate
    g = c.post(f"/api/runs/{rid}/generate", json={"prompts": ["a photo of a {}"], "num_images": 2, "seed": 3}, headers=H)
    assert g.status_code == 201, g.text
    r = wait(c, rid, lambda r: r["generations"] and r["generations"][0]["state"] == "done")
    assert r["generations"][0]["images"] == ["000_prompt_0.png", "000_prompt_1.png"]
    assert c.get(f"/api/runs/{rid}/files/generations/001/000_prompt_0.png").status_code == 200
    for bad in ({"prompts": []}, {"prompts": ["x"] * 9}, {"prompts": ["--out /etc"]}, {"prompts": ["a {}"], "num_images": 99}):
        assert c.post(f"/api/runs/{rid}/generate", json=bad, headers=H).status_code == 400, bad
    # evaluate, compare, delete
    assert c.get(f"/api/runs/{rid}").json()["evaluable"]
    assert c.post(f"/api/runs/{rid}/evaluate", headers=H).status_code == 201
    r = wait(c, rid, lambda r: r.get("evaluation", {}).get("state") == "done")
    assert r["evaluation"]["metrics"] == {"world_clip_i": 0.25, "prompt_accuracy": 0.5}
    row = c.get("/api/compare").json()["runs"][0]
    assert row["id"] == rid and row["peak_mib"] == 123.0 and row["grid"] == "out/samples/step_000040.png"
    assert row["fidelity"]["world_clip_i"] == 0.25
    assert c.get("/api/compare", params={"ids": "../x"}).status_code == 404
    assert c.delete(f"/api/runs/{rid}", headers=H).json() == {"deleted": rid}
    assert run_dirs(c) == [] and c.get(f"/api/runs/{rid}").status_code == 404


def test_stop_then_resume_continues_from_checkpoint(serve):
    c = serve()
    rid = new_run(c, steps="120")["id"]
    wait(c, rid, lambda r: r["progress"]["step"] >= 25)
    assert c.post(f"/api/runs/{rid}/stop", headers=H).json()["state"] == "stopping"
    r = wait(c, rid, lambda r: r["state"] == "stopped")
    at = r["progress"]["step"]
    assert r["returncode"] == 130 and r["progress"]["checkpoint"] and 25 <= at < 120
    assert c.post(f"/api/runs/{rid}/stop", headers=H).status_code == 409
    assert c.post(f"/api/runs/{rid}/resume", headers=H).json()["state"] == "queued"
    r = wait(c, rid, lambda r: r["state"] == "done")
    assert f"resuming from step {at}" in c.get(f"/api/runs/{rid}/log").text
    assert r["starts"] == 2 and c.post(f"/api/runs/{rid}/resume", headers=H).status_code == 409


def test_kill9_fails_with_log_and_resume_continues(serve):
    c = serve()
    rid = new_run(c, steps="120")["id"]
    wait(c, rid, lambda r: r["progress"]["step"] >= 15)
    os.kill(c.app.state.store.runs[rid]["pid"], signal.SIGKILL)
    r = wait(c, rid, lambda r: r["state"] == "failed")
    assert "signal 9 (SIGKILL)" in r["error"] and "fake <tok>" in r["log_tail"]
    ckpt = json.loads((c.app.state.store.run_dir(rid) / "out" / "checkpoint.pt").read_text())["step"]
    assert ckpt >= 10
    c.post(f"/api/runs/{rid}/resume", headers=H)
    wait(c, rid, lambda r: r["state"] == "done")
    assert f"resuming from step {ckpt}" in c.get(f"/api/runs/{rid}/log").text


def test_queue_one_job_at_a_time_and_restart_finds_runs(serve, tmp_path):
    c = serve()
    a = new_run(c, steps="100")["id"]
    b = new_run(c, steps="20", subject="olive_coat")["id"]
    wait(c, a, lambda r: r["state"] == "running")
    assert c.get(f"/api/runs/{b}").json()["state"] == "queued"
    c.__exit__(None, None, None)          # the server goes away; job a keeps running in its own session
    c2 = serve()                          # a new server on the same data folder adopts it by pid
    assert {r["id"] for r in c2.get("/api/runs").json()["runs"]} == {a, b}
    wait(c2, a, lambda r: r["state"] == "done")
    wait(c2, b, lambda r: r["state"] == "done")
    c2.post(f"/api/runs/{b}/generate", json={"prompts": ["a {}"]}, headers=H)
    c3 = serve()
    assert [g["id"] for g in c3.get(f"/api/runs/{b}").json()["generations"]] == ["001"]


def test_failed_job_shows_its_error_line(serve):
    c = serve()
    rid = new_run(c, init_word="failword")["id"]
    r = wait(c, rid, lambda r: r["state"] == "failed")
    assert r["error"] == "the class word 'failword' is not one token" and r["returncode"] == 2
    assert c.post(f"/api/runs/{rid}/generate", json={"prompts": ["a {}"]}, headers=H).status_code == 409
    assert c.post(f"/api/runs/{rid}/evaluate", headers=H).status_code == 409


# ----------------------------------------------------------------------------- safety
def test_upload_checks(serve):
    c = serve(max_upload_mib=0.05)
    ok = photos(3)
    r = c.post("/api/runs", data={"subject": "upload", "init_word": "bag", "steps": "5"},
               files=[("photos", ("../../evil name.png", ok[0][1][1], "image/png"))] + ok[1:], headers=H)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    assert r.json()["photos"] == ["00.png", "01.png", "02.png"]
    wait(c, rid, lambda r: r["state"] == "done")
    assert not c.get(f"/api/runs/{rid}").json()["evaluable"]
    assert "subject.json" in c.post(f"/api/runs/{rid}/evaluate", headers=H).json()["error"]
    assert sorted(p.name for p in (c.app.state.store.run_dir(rid) / "photos").iterdir()) == ["00.png", "01.png", "02.png"]
    before = run_dirs(c)
    big = io.BytesIO()
    from PIL import Image
    Image.effect_noise((256, 256), 64).convert("RGB").save(big, format="PNG")   # ~190 KiB of noise
    cases = {
        413: ok[:2] + [("photos", ("big.png", big.getvalue(), "image/png"))],
        415: ok[:2] + [("photos", ("notes.png", b"#!/bin/sh\nrm -rf /\n", "image/png"))],
        400: ok[:2],                                                                # too few
    }
    for status, files in cases.items():
        r = c.post("/api/runs", data={"subject": "upload", "init_word": "bag"}, files=files, headers=H)
        assert r.status_code == status, (status, r.text)
        assert "error" in r.json()
    r = c.post("/api/runs", data={"subject": "upload", "init_word": "bag"}, files=photos(5) + photos(2), headers=H)
    assert r.status_code == 400 and "3-6 photos" in r.json()["error"]
    assert run_dirs(c) == before          # nothing written by a refused upload


def test_no_path_outside_the_data_folder(serve, tmp_path):
    c = serve()
    (tmp_path / "secret.txt").write_text("secret")
    rid = new_run(c, steps="5")["id"]
    wait(c, rid, lambda r: r["state"] == "done")
    for path in (f"/api/runs/{rid}/files/../../../secret.txt", f"/api/runs/{rid}/files/..%2F..%2F..%2Fsecret.txt",
                 f"/api/runs/{rid}/files/%2Fetc%2Fpasswd", f"/api/runs/{rid}/files/photos/../../../../secret.txt",
                 "/api/runs/..%2F..%2Fsecret.txt", f"/api/runs/{rid}/files/"):
        r = c.get(path)
        assert r.status_code in (403, 404), path
        assert "secret" not in r.text and "root:" not in r.text
    os.symlink(tmp_path / "secret.txt", c.app.state.store.run_dir(rid) / "link.txt")
    assert c.get(f"/api/runs/{rid}/files/link.txt").status_code == 403
    for field, value in (("subject", "../teal_bag"), ("subject", str(EXAMPLES / "teal_bag")), ("model", "/tmp"),
                         ("method", "../x"), ("weights", "int3"), ("init_word", "--resume"), ("token", "-x"),
                         ("steps", "-1"), ("steps", "lots")):
        r = c.post("/api/runs", data={"subject": "teal_bag", field: value}, headers=H)
        assert r.status_code == 400, (field, value, r.text)


def test_bad_model_path_is_a_clear_error(serve, tmp_path):
    (tmp_path / "notamodel").mkdir()
    c = serve(models={"gone": str(tmp_path / "nowhere"), "junk": str(tmp_path / "notamodel")})
    m = {x["name"]: x for x in c.get("/api/options").json()["models"]}
    assert "does not exist" in m["gone"]["error"] and "model_index.json" in m["junk"]["error"]
    r = c.post("/api/runs", data={"subject": "teal_bag", "model": "gone"}, headers=H)
    assert r.status_code == 400 and r.json()["error"].startswith("model 'gone' cannot be used: model folder")
    assert "Traceback" not in r.text


def test_token_on_every_request(serve):
    c = serve(token="s3cret", host="0.0.0.0")
    for path in ("/", "/api/runs", "/static/style.css", "/api/runs?token=wrong"):
        r = c.get(path)
        assert r.status_code == 401 and "token" in r.text, path
    assert c.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    r = c.get("/?token=s3cret")
    assert r.status_code == 200 and "quantdream_token" in r.headers["set-cookie"]
    assert c.get("/api/runs").status_code == 200          # the cookie set above
    c.cookies.clear()
    assert c.post("/api/runs", data={"subject": "teal_bag"}, headers=H).status_code == 401


def test_loopback_host_and_write_header(serve):
    c = serve()
    assert c.get("/api/runs", headers={"Host": "evil.example:7860"}).status_code == 403   # DNS rebinding
    assert c.get("/api/runs", headers={"Host": "localhost:7860"}).status_code == 200
    assert c.get("/api/runs", headers={"Host": "[::1]:7860"}).status_code == 200
    r = c.post("/api/runs", data={"subject": "teal_bag"})                                   # no X-Quantdream header
    assert r.status_code == 403 and run_dirs(c) == []


def test_cli_refuses_public_bind_without_token(capsys, tmp_path):
    assert main(["serve", "--host", "0.0.0.0", "--data", str(tmp_path / "d")]) == 2
    assert "--token" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    assert main(["serve", "--model", "no-equals-sign", "--data", str(tmp_path / "d")]) == 2
    from quantdream.cli.serve import is_loopback
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")


@pytest.mark.slow
def test_first_page_within_5_seconds(tmp_path):
    """`quantdream serve` answers its first page within 5 s of start (the server imports no torch)."""
    import socket
    import subprocess
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "quantdream.cli.main", "serve", "--port", str(port), "--data",
                             str(tmp_path / "d")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                    assert r.status == 200 and b"Runs" in r.read()
                break
            except OSError:
                assert time.perf_counter() - t0 < 5, "no answer within 5 s"
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.05)
        assert time.perf_counter() - t0 < 5
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)


def test_parse_log_reads_personalize_progress():
    """The tqdm line `personalize` writes (unit step, postfix loss every 20 steps), over a resume."""
    from quantdream.server.jobs import START, parse_log
    log = ("Loading pipeline components...: 100%|##########| 5/5 [00:01<00:00,  4.99it/s]\n"
           "zoodip-fast <b>:  33%|###3      | 20/60 [00:10<00:20,  1.96step/s, loss=0.0057, lr=1.0e-02]\r"
           "zoodip-fast <b>:  35%|###5      | 21/60 [00:10<00:20,  1.96step/s, loss=0.0057, lr=1.0e-02]\n"
           "interrupted at step 21; continue with the same command plus --resume\n"
           f"{START}2026-01-01: personalize ... --resume\n")
    p = parse_log(log)
    assert (p["step"], p["steps"], p["step_before"], p["steps_before"]) == (None, None, 21, 60)
    assert p["curve"] == [(20, 0.0057)]
    log += ("zoodip-fast <b>:  67%|######6   | 40/60 [00:10<00:05,  2.50s/step, loss=0.0041, lr=1.0e-02]\r"
            "quantdream personalize: error: something clear\n")
    p = parse_log(log)
    assert (p["step"], p["steps"]) == (40, 60) and p["steps_per_second"] == pytest.approx(0.4)
    assert p["curve"] == [(20, 0.0057), (40, 0.0041)] and p["error"] == "something clear"


def test_parse_log_reads_the_line_personalize_writes():
    """The bar personalize shows (train.PROGRESS_FORMAT, the time plan's ETA in the postfix) is what the server parses."""
    import io

    from tqdm import tqdm

    from quantdream.server.jobs import parse_log
    from quantdream.train import PROGRESS_FORMAT
    buf = io.StringIO()
    bar = tqdm(total=60, initial=0, desc="zoodip <b>", unit="step", bar_format=PROGRESS_FORMAT, file=buf,
               mininterval=0, ncols=100)
    bar.update(20)
    bar.set_postfix(loss="0.0057", lr="1.0e-02", eta="20s")
    bar.update(1)
    bar.close()
    p = parse_log(buf.getvalue())
    assert (p["step"], p["steps"]) == (21, 60) and p["curve"] == [(20, 0.0057)]   # the loss first shown at step 20
    assert p["steps_per_second"] is not None and p["steps_per_second"] > 0


def test_server_imports_no_torch():
    """The server process stays light (the 5-second start): torch and diffusers load only in the jobs."""
    import subprocess
    code = ("import sys; from quantdream.cli.main import build_parser; build_parser(); "
            "from quantdream.server.app import create_app; import uvicorn; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
