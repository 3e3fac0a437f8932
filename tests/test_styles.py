"""The world's rendering styles, their example photos and the pixel style score (world/styles.py,
eval/style_score.py), and the style benchmark's plumbing on a random tiny model."""
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_fmnist
from PIL import Image

from quantdream.eval.style_score import block_grid_fraction, mean_style_score, style_score
from quantdream.world.styles import STYLES, apply_style, outline_ring, pixelated

ROOT = Path(__file__).resolve().parent.parent


def synthetic():
    """A 64 px scene by hand: a shaded red-to-blue disc on a green background, and its mask."""
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    img[...] = (40, 160, 55)
    yy, xx = np.mgrid[0:64, 0:64]
    disc = (xx - 31.5) ** 2 + (yy - 30.2) ** 2 <= 14.3 ** 2
    img[disc] = np.stack([230 - 3 * xx, 60 + 0 * xx, 40 + 4 * yy], -1)[disc]
    return img, disc.astype(np.float32)


def test_styles_are_exact_functions_of_the_render():
    img, mask = synthetic()
    for name in STYLES:
        a, b = apply_style(name, img, mask), apply_style(name, img.copy(), mask.copy())
        assert a.dtype == np.uint8 and a.shape == img.shape and np.array_equal(a, b), name
        assert not np.array_equal(a, img), name
    p = apply_style("pastel", img).astype(int)
    assert p.min() >= 140                                             # 0.55 of the way to white at least
    assert (p.max(-1) - p.min(-1)).max() < 0.6 * (img.max(-1).astype(int) - img.min(-1)).max()
    assert tuple(p[0, 0]) == tuple(int(np.floor(v + 0.5)) for v in
                                   np.mean(255 - 0.45 * (255 - np.array([40., 160, 55]))) +
                                   0.6 * ((255 - 0.45 * (255 - np.array([40., 160, 55]))) -
                                          np.mean(255 - 0.45 * (255 - np.array([40., 160, 55])))))
    o = apply_style("outlined", img, mask)
    ring = outline_ring(mask, 2)
    disc = mask > 0.5
    near = np.zeros_like(disc)                                        # pixels within 2 px (Chebyshev) of the disc
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            near |= np.roll(np.roll(disc, dy, 0), dx, 1)
    assert ring.sum() > 100 and np.array_equal(ring, near & ~disc)    # a 2 px ring just outside the disc
    assert (o[ring] == 16).all() and np.array_equal(o[~ring], img[~ring])
    px = pixelated(img, 5)
    for by in range(0, 64, 5):
        for bx in range(0, 64, 5):
            block = px[by:by + 5, bx:bx + 5].reshape(-1, 3)
            assert (block == block[0]).all()
            assert np.abs(block[0] - img[by:by + 5, bx:bx + 5].reshape(-1, 3).mean(0)).max() <= 0.5
    with pytest.raises(ValueError, match="needs the object mask"):
        apply_style("outlined", img)
    with pytest.raises(ValueError, match="unknown style 'sepia'"):
        apply_style("sepia", img)


def test_score_separates_hand_made_cases():
    img, mask = synthetic()
    for name in STYLES:
        styled = apply_style(name, img, mask)
        assert style_score(styled, name) >= 0.8, name
        assert style_score(img, name) <= 0.2, name
        assert 0.0 <= style_score(Image.fromarray(styled), name) <= 1.0
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert style_score(pixelated(noise, 5), "pixelated") == pytest.approx(1.0)
    assert style_score(noise, "pixelated") < 0.05                     # energy spread evenly: f about 1/k
    assert block_grid_fraction(np.full((64, 64, 3), 90, np.uint8)) == 0.0
    assert style_score(np.full((64, 64, 3), 240, np.uint8), "pastel") == 1.0
    assert style_score(np.full((64, 64, 3), 240, np.uint8), "outlined") == 0.0
    assert mean_style_score([[img, apply_style("pastel", img)]], "pastel") == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="no style score for 'sepia'"):
        style_score(img, "sepia")


@needs_fmnist
def test_score_separates_plain_and_styled_renders_of_the_example_scenes():
    from quantdream.world.fmnist import load_fmnist
    from quantdream.world.render import render
    from quantdream.world.styles import style_photos
    items, labels = load_fmnist("test")
    for name in STYLES:
        photos, scenes = style_photos(name, items, labels)
        styled = [style_score(p, name) for p in photos]
        plain = [style_score(render(sc, items), name) for sc in scenes]
        assert min(styled) > max(plain), (name, styled, plain)
        assert np.mean(styled) - np.mean(plain) > 0.5, (name, styled, plain)
        others = [s for s in STYLES if s != name]                     # a style's photos do not read as another's
        for o in others:
            assert np.mean([style_score(p, o) for p in photos]) < 0.5, (name, o)


@needs_fmnist
def test_example_styles_on_disk_equal_a_fresh_regeneration(tmp_path):
    from quantdream.world.styles import load_style, write_styles
    write_styles(tmp_path)
    for name in STYLES:
        disk, fresh = ROOT / "examples" / "styles" / name, tmp_path / name
        assert sorted(p.name for p in disk.iterdir()) == sorted(p.name for p in fresh.iterdir()) == \
            ["00.png", "01.png", "02.png", "03.png", "04.png", "style.json"]
        for i in range(5):
            a, b = (np.asarray(Image.open(d / f"{i:02d}.png").convert("RGB")) for d in (disk, fresh))
            assert np.array_equal(a, b), (name, i)
        meta = load_style(disk)
        assert json.loads((disk / "style.json").read_text()) == json.loads((fresh / "style.json").read_text())
        assert meta["params"] == STYLES[name].params and len({p["class"] for p in meta["photos"]}) == 5
        assert sum(f.stat().st_size for f in disk.iterdir()) < 20_000             # small files
    with pytest.raises(FileNotFoundError, match="not a style folder"):
        load_style(tmp_path)


@pytest.mark.slow
def test_style_benchmark_end_to_end_and_resume(tiny_model, tmp_path, capsys):
    from test_benchmarks import load_script
    bench = load_script("styles")
    argv = ["--styles", "pastel", "--methods", "ti,zoodip", "--ti-steps", "2", "--zoodip-steps", "2",
            "--classes", "top,bag", "--images-per-class", "1", "--eval-steps", "2", "--threads", "1",
            "--model", str(tiny_model), "--out", str(tmp_path / "b")]
    assert bench.main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    row = res["styles"]["pastel"]
    assert res["steps"] == {"ti": 2, "zoodip": 2} and res["generation"]["classes"] == ["top", "bag"]
    assert row["ceiling"] == 1.0 and set(row["floor"]) == {"none", "int8"}
    assert row["ti"]["weights"] == "none" and row["zoodip"]["weights"] == "int8"
    assert row["zoodip"]["unet_forward_passes"] == 2 * 3          # a diffusers folder: the paper's n = 2, + the centre
    for m in ("ti", "zoodip"):
        r = row[m]
        assert len(r["scores"]) == 2 and r["score"] == pytest.approx(np.mean(r["scores"]))
        assert r["floor"] == row["floor"][r["weights"]] and r["above_floor"] == (r["score"] > r["floor"])
    assert res["bar"]["pass"] == (row["ti"]["above_floor"] and row["zoodip"]["above_floor"])
    files = sorted((tmp_path / "b" / "images" / "pastel" / "ti").glob("*.png"))
    assert [f.name for f in files] == ["p0_0.png", "p1_0.png"]
    assert Image.open(tmp_path / "b" / "grids" / "pastel.png").size == (5 * 66 + 2, 5 * 66 + 2)   # photos, 2 floors, 2 methods
    assert json.loads((tmp_path / "b" / "images" / "floor" / "int8" / "images.json").read_text())["prompts"] == \
        ["a top in the style of painting", "a bag in the style of painting"]
    run_json = tmp_path / "b" / "runs" / "pastel" / "zoodip" / "run.json"
    cfg = (run_json.parent / "config.toml").read_text()
    assert 'learnable_property = "style"' in cfg and 'init_word = "painting"' in cfg
    stamps = [run_json.stat().st_mtime_ns, files[0].stat().st_mtime_ns]
    assert bench.main(argv) == 0                              # a rerun keeps the runs and their images
    assert [run_json.stat().st_mtime_ns, files[0].stat().st_mtime_ns] == stamps
    again = json.loads(capsys.readouterr().out)
    assert again["styles"] == res["styles"]
    with pytest.raises(SystemExit, match="no style 'sepia'"):
        bench.main(argv[:1] + ["sepia"] + argv[2:])
