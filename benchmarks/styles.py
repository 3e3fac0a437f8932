"""Style personalization on the embedded model: TI and ZOODiP learn each example style. Prints one JSON object.

    python benchmarks/styles.py                                   # 3 styles x (ti, zoodip) at their embedded defaults
    python benchmarks/styles.py --styles pastel --ti-steps 100 --zoodip-steps 300 --out out/bench_styles

For each style under examples/styles (world/styles.py: pastel, outlined, pixelated):
    train     ``quantdream personalize --learnable-property style --init-word painting`` with every method
              (the style photos, captioned by the style templates; the methods' embedded defaults unless
              --steps / --ti-steps / --zoodip-steps)
    generate  "a {class} in the style of <token>" for --classes, --images-per-class seeds each (image j of every
              prompt starts from seed + j, as in ``quantdream evaluate``), on the model the run trained on
    floor     the same prompts with the init word in place of the token (nothing learned), on the same model
              and weights (int8 for zoodip, fp32 for ti) and the same seeds
    ceiling   the style photos' own score; ``plain`` the same scenes rendered without the style
Rows of --out/grids/<style>.png: the photos, then per floor and method the first image of every class.
Every image is scored with eval/style_score.py (a pixel statistic in [0, 1]); a method passes on a style
when its mean score is above its floor's. Finished runs, floor images and scores are kept under --out,
so an interrupted benchmark continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # benchmarks/: the shared harness
from personalization import mean, model_defaults, prepare_run_dir  # noqa: E402

METHODS = ("ti", "zoodip")
CLASSES = ("top", "trousers", "dress", "coat", "sneaker", "bag")
PROMPT = "a {cls} in the style of {word}"


class GenSettings(NamedTuple):
    """What the images of one row depend on, besides the run: stored images made otherwise are redone."""
    classes: tuple
    images_per_class: int
    seed: int
    steps: int
    guidance: float

    def key(self) -> dict:
        return json.loads(json.dumps(self._asdict()))


def style_dirs(names: str) -> list[Path]:
    """--styles (default: every example style) as folders; an unknown name stops before any training."""
    root = ROOT.parent / "examples" / "styles"
    chosen = [s for s in names.split(",") if s] or sorted(d.name for d in root.iterdir() if (d / "style.json").is_file())
    for name in chosen:
        if not (root / name / "style.json").is_file():
            raise SystemExit(f"no style {name!r} under examples/styles")
    return [root / n for n in chosen]


def run_config(style: Path, method: str, steps: int, out: Path, init_word: str, seed: int, threads: int, model: str):
    """The personalize settings of one style run into ``out``, or None when a finished, current run is there
    (a stale one is removed; an interrupted one is resumed)."""
    from quantdream.train import build_config
    resume = prepare_run_dir(out, method, {}, steps, model)
    if resume is None:
        return None
    overrides = {"images": str(style), "token": f"<{style.name}-style>", "init_word": init_word,
                 "learnable_property": "style", "captions": "templates", "out": str(out), "model": model,
                 "method": method, "seed": seed, "threads": threads, "sample_every": 0, "resume": resume}
    if steps:
        overrides["steps"] = steps
    return build_config(overrides=overrides)


def train(style: Path, method: str, steps: int, out: Path, init_word: str, seed: int, threads: int, model: str) -> Path:
    from quantdream.train import personalize
    cfg = run_config(style, method, steps, out, init_word, seed, threads, model)
    if cfg is None:
        return out
    t = time.perf_counter()
    if not personalize(cfg).completed:
        raise KeyboardInterrupt
    print(f"  trained {method} on style {style.name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return out


def prompts(classes, word: str) -> list[str]:
    return [PROMPT.format(cls=c, word=word) for c in classes]


def generate(pipe, texts: list[str], gs: GenSettings, out: Path) -> list[Path]:
    """Render ``texts`` x images_per_class into ``out`` as PNGs (p<prompt>_<seed>.png); returns the files."""
    from quantdream.models.sample import generate_images
    images = generate_images(pipe, texts, gs.images_per_class, gs.seed, gs.steps, gs.guidance)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, row in enumerate(images):
        for j, im in enumerate(row):
            f = out / f"p{i}_{gs.seed + j}.png"
            im.save(f)
            files.append(f)
    (out / "images.json").write_text(json.dumps({"settings": gs.key(), "prompts": texts,
                                                 "files": [f.name for f in files]}, indent=1) + "\n")
    return files


def stored_images(out: Path, gs: GenSettings, texts: list[str], newer_than: Path | None = None) -> list[Path] | None:
    """The images a previous call rendered into ``out`` with the same settings and prompts (after
    ``newer_than``, the run's run.json, was written), else None."""
    f = out / "images.json"
    if not f.is_file():
        return None
    info = json.loads(f.read_text())
    if info["settings"] != gs.key() or info["prompts"] != texts:
        return None
    if newer_than is not None and newer_than.stat().st_mtime > f.stat().st_mtime:
        return None
    files = [out / n for n in info["files"]]
    return files if all(p.is_file() for p in files) else None


def run_images(run_dir: Path, gs: GenSettings, out: Path) -> tuple[list[Path], dict]:
    """The learned token's images of a run (rendered once, then kept) and the run's summary."""
    from quantdream.eval.protocol import adapter_for, read_run
    run = read_run(run_dir)
    texts = prompts(gs.classes, run.token)
    files = stored_images(out, gs, texts, run_dir / "run.json")
    if files is None:
        shutil.rmtree(out, ignore_errors=True)
        files = generate(adapter_for(run).load(run), texts, gs, out)
    return files, run.summary


def floor_images(run_dir: Path, gs: GenSettings, out: Path) -> list[Path]:
    """The init word's images on the model and weights the run renders on (nothing learned)."""
    from quantdream.eval.protocol import adapter_for, read_run
    run = read_run(run_dir)
    texts = prompts(gs.classes, run.init_word)
    files = stored_images(out, gs, texts)
    if files is None:
        shutil.rmtree(out, ignore_errors=True)
        files = generate(adapter_for(run).load_floor(run), texts, gs, out)
    return files


def scores(files, style: str) -> list[float]:
    from quantdream.eval.style_score import style_score
    return [round(style_score(f, style), 6) for f in files]


def photo_scores(style_dir: Path) -> tuple[list[float], list[float] | None]:
    """The style photos' scores (the ceiling) and those of the same scenes rendered plain (None without
    Fashion-MNIST)."""
    from quantdream.world.styles import load_style
    meta = load_style(style_dir)
    ceiling = scores([style_dir / p["file"] for p in meta["photos"]], meta["name"])
    try:
        from quantdream.eval.style_score import style_score
        from quantdream.world.fmnist import load_fmnist
        from quantdream.world.render import Scene, render
        items, _ = load_fmnist("test")
    except (FileNotFoundError, OSError):
        return ceiling, None
    return ceiling, [round(style_score(render(Scene.from_dict(p["scene"]), items), meta["name"]), 6)
                     for p in meta["photos"]]


def save_grid(style_dir: Path, rows: dict[str, list[Path]], per_class: int, out: Path) -> None:
    """One row per entry (the photos, each floor, each method): the first image of every class."""
    from PIL import Image

    from quantdream.models.sample import make_grid
    photos = [Image.open(style_dir / f"{i:02d}.png").convert("RGB") for i in range(5)]
    grid = [photos] + [[Image.open(f).convert("RGB") for f in files[::per_class]] for files in rows.values()]
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(grid).save(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--styles", default="", help="comma-separated names under examples/styles (default all)")
    a("--methods", default=",".join(METHODS), help=f"comma-separated token methods (default {','.join(METHODS)})")
    a("--init-word", dest="init_word", default="painting", help="one-token word the style token starts from")
    a("--steps", type=int, default=0, help="every method's steps (default: each method's embedded-model default)")
    a("--ti-steps", dest="ti_steps", type=int, default=0, help="textual inversion's steps (overrides --steps)")
    a("--zoodip-steps", dest="zoodip_steps", type=int, default=0, help="zoodip's steps (overrides --steps)")
    a("--classes", default=",".join(CLASSES), help="the classes of the prompts 'a {class} in the style of <token>'")
    a("--images-per-class", dest="images_per_class", type=int, default=4)
    a("--eval-steps", dest="eval_steps", type=int, default=0,
      help="DDIM steps of the images (default: the model's, 25 on the embedded model)")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=1)
    a("--model", default="tiny", help="tiny (the embedded model, default) or a diffusers folder")
    a("--out", default="out/bench_styles")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    known = ("ti", "zoodip", "zoodip-fast", "gf-ti")
    bad = [m for m in methods if m not in known]
    if bad:
        raise SystemExit(f"unknown or non-token methods {bad}; choose from {', '.join(known)}")
    if args.images_per_class < 1:
        raise SystemExit(f"--images-per-class must be >= 1, got {args.images_per_class}")
    classes = tuple(c for c in args.classes.split(",") if c)
    if not classes:
        raise SystemExit("--classes is empty")
    styles = style_dirs(args.styles)
    import torch
    torch.set_num_threads(args.threads)
    from quantdream.models.load import SAMPLING_DEFAULTS, is_tiny, resolve_model
    steps0, guidance = SAMPLING_DEFAULTS["tiny" if is_tiny(resolve_model(args.model)) else "sd"]
    gs = GenSettings(classes, args.images_per_class, args.seed, args.eval_steps or steps0, guidance)
    defaults = model_defaults(args.model)
    steps = {m: {"ti": args.ti_steps, "zoodip": args.zoodip_steps}.get(m) or args.steps or defaults[m]["steps"]
             for m in methods}
    out = Path(args.out)
    t0 = time.perf_counter()
    res: dict = {"command": " ".join(["python benchmarks/styles.py", *(argv if argv is not None else sys.argv[1:])]),
                 "model": args.model, "init_word": args.init_word, "prompt": PROMPT.format(cls="{class}", word="<token>"),
                 "floor_prompt": PROMPT.format(cls="{class}", word=args.init_word), "generation": gs.key(),
                 "threads": args.threads, "steps": steps, "styles": {}}
    for style in styles:
        name = style.name
        ceiling, plain = photo_scores(style)
        row: dict = {"ceiling": mean(ceiling), "ceiling_per_photo": ceiling,
                     "plain": mean(plain) if plain else None, "floor": {}}
        shown: dict[str, list[Path]] = {}
        for m in methods:
            run_dir = train(style, m, steps[m], out / "runs" / name / m, args.init_word, args.seed, args.threads,
                            args.model)
            files, summary = run_images(run_dir, gs, out / "images" / name / m)
            weights = summary.get("weights", "none")
            if weights not in row["floor"]:           # the floor's images do not depend on the style: kept once
                fl = floor_images(run_dir, gs, out / "images" / "floor" / weights)
                row["floor"][weights] = mean(scores(fl, name))
                shown[f"floor ({weights})"] = fl
            shown[m] = files
            s = scores(files, name)
            row[m] = {"score": mean(s), "scores": s, "weights": weights, "floor": row["floor"][weights],
                      "above_floor": mean(s) > row["floor"][weights],
                      **{k: summary.get(k) for k in ("steps", "unet_forward_passes", "seconds")}}
            print(f"{name} {m}: {row[m]['score']:.3f} (floor {row[m]['floor']:.3f}, ceiling {row['ceiling']:.3f})",
                  file=sys.stderr)
        save_grid(style, shown, gs.images_per_class, out / "grids" / f"{name}.png")
        res["styles"][name] = row
    res["bar"] = {f"{m}_above_floor_on_every_style": all(r[m]["above_floor"] for r in res["styles"].values())
                  for m in methods}
    res["bar"]["pass"] = all(res["bar"].values())
    res["seconds_this_call"] = round(time.perf_counter() - t0, 1)      # kept runs and images cost nothing here
    print(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
