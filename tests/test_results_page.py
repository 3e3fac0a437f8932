"""docs/results.md is what benchmarks/results_page.py makes of the committed JSONs (it cannot drift from them)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def page_script():
    spec = importlib.util.spec_from_file_location("results_page", ROOT / "benchmarks" / "results_page.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_results_page_is_the_generated_one():
    mod = page_script()
    assert (ROOT / "docs" / "results.md").read_text() == mod.render(), \
        "docs/results.md is out of date: run python benchmarks/results_page.py"


def test_every_json_the_page_names_exists_and_the_figures_come_from_them():
    mod = page_script()
    for rel in list(mod.CURRENT.values()) + [h[0] for h in mod.HISTORY]:
        assert (mod.RESULTS / rel).is_file(), rel
    zoodip = mod.load(mod.CURRENT["personalization"])["variants"]["zoodip"]["world_clip_i"]
    assert f"{zoodip:.3f}" in mod.render()


def test_check_mode_reports_a_stale_page(tmp_path, monkeypatch, capsys):
    mod = page_script()
    monkeypatch.setattr(mod, "PAGE", tmp_path / "results.md")
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    assert mod.main(["--check"]) == 1
    assert mod.main([]) == 0 and mod.main(["--check"]) == 0
    (tmp_path / "results.md").write_text("edited by hand\n")
    assert mod.main(["--check"]) == 1
