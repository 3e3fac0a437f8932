"""`quantdream bench memory`: every method in its own subprocess, numbers that are there and positive,
'not implemented' rows for methods the build does not have, clear errors for bad settings."""
import json

import pytest

from quantdream.bench.memory import BenchSpec, check_spec, memory_markdown, summarize
from quantdream.cli.main import main


@pytest.mark.slow
def test_tiny_zoodip_and_ti_in_subprocesses(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "memory", "--arch", "tiny", "--methods", "zoodip,ti,peqa", "--steps", "2", "--threads", "1",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((out / "memory.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    for name, weights, passes in (("zoodip", "int8", 3), ("ti", "none", 1)):
        r = rows[name]
        assert r["status"] == "ok" and r["weights"] == weights and r["resolution"] == 64
        assert r["training_peak"]["vmhwm_mib"] > 0 and r["training_peak"]["rss_anon_mib"] > 0
        assert r["whole_process_peak_mib"] >= r["training_peak"]["vmhwm_mib"]
        assert r["storage_bytes"] > 3072 and r["storage_files"] == ["learned_embeds.safetensors"]
        assert r["seconds_per_step"] > 0 and r["unet_forward_passes_per_step"] == passes
    assert rows["peqa"]["status"] == "not implemented" and "issue 5" in rows["peqa"]["note"]
    md = (out / "memory.md").read_text()
    assert "| zoodip | tiny | int8 | 64 | ok |" in md and "not implemented" in md
    assert set(result["summary"]["whole_process_ratio_to_lowest"]) == {"zoodip (int8)", "ti (none)"}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="--arch 'sd3'"):
        check_spec(BenchSpec(arch="sd3"))
    with pytest.raises(ValueError, match="--weights 'int3'"):
        check_spec(BenchSpec(weights="int3"))
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        check_spec(BenchSpec(steps=0))
    with pytest.raises(ValueError, match="multiple of 8"):
        check_spec(BenchSpec(arch="sd15", resolution=500))


def test_cli_errors(tmp_path, capsys):
    assert main(["bench", "memory", "--arch", "sd3", "--out", str(tmp_path / "o")]) == 2
    assert "--arch 'sd3'" in capsys.readouterr().err
    assert main(["bench", "memory", "--methods", " ,", "--out", str(tmp_path / "o")]) == 2
    assert "--methods is empty" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["bench"]) == 2


def test_markdown_and_summary_from_rows():
    rows = [{"method": "zoodip", "arch": "sd15", "weights": "int8", "resolution": 512, "status": "ok",
             "training_peak": {"vmhwm_mib": 2000.0, "rss_anon_mib": 1800.0, "rss_file_mib": 150.0},
             "whole_process_peak_mib": 2500.0, "storage_bytes": 3160, "seconds_per_step": 40.0,
             "unet_forward_passes_per_step": 3.0},
            {"method": "ti", "arch": "sd15", "weights": "none", "resolution": 512, "status": "ok",
             "training_peak": {"vmhwm_mib": 10000.0, "rss_anon_mib": 9800.0, "rss_file_mib": 150.0},
             "whole_process_peak_mib": 10000.0, "storage_bytes": 3160, "seconds_per_step": 60.0,
             "unet_forward_passes_per_step": 1.0},
            {"method": "dreambooth", "arch": "sd15", "weights": "", "resolution": 512, "status": "not implemented",
             "note": "not in this build"}]
    s = summarize(rows)
    assert s["lowest_whole_process"] == "zoodip (int8)" and s["whole_process_ratio_to_lowest"]["ti (none)"] == 4.0
    md = memory_markdown({"rows": rows, "summary": s})
    assert "| ti | sd15 | none | 512 | ok | 10000 |" in md and "3.1 KB" in md and "ti (none) 4.00x" in md
