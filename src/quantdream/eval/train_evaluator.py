"""Train the world evaluator's networks, and measure them.

    python -m quantdream.eval.train_evaluator reader [--minutes M] [--steps N]   # attribute reader
    python -m quantdream.eval.train_evaluator clip   [--minutes M] [--steps N]   # world CLIP
    python -m quantdream.eval.train_evaluator report [--n N]                      # test-split accuracies

Training draws scenes from the Fashion-MNIST **train** split with the evaluator's own seed (1234; the
generator uses 0/1), renders them on the fly and augments them mildly (``images.augment``). It
checkpoints to ``runs/evaluator/<model>/checkpoint.pt`` (atomic writes) every ``--save-every``
seconds, on Ctrl-C, and when ``--minutes`` runs out; running the same command again resumes where it
stopped, draws the same scenes and continues the same schedule. When the last step is done the
weights are exported (fp16 safetensors + JSON) to ``src/quantdream/assets/evaluator/``.

``report`` renders scenes from the **test** split (seed 4321, items the evaluator never saw) and
writes ``assets/evaluator/report.json``: reader accuracy per attribute (clean and augmented renders),
world-CLIP text retrieval, and the CLIP-I / EffNet same-subject vs other-subject similarities.

Commands (2 CPU cores, ``torch.set_num_threads(1)``); ``--minutes`` stops a run after that long with a
checkpoint, and the same command resumes it from runs/evaluator/<model>/. The shipped weights and the
settings they were trained with are in ``assets/evaluator/*.json``:

    python -m quantdream.eval.train_evaluator reader --batch-size 64 --steps 2000 --minutes 15
    python -m quantdream.eval.train_evaluator clip --batch-size 64 --steps 1000 --lr 1e-3 --minutes 15
    python -m quantdream.eval.train_evaluator report --n 2000
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from quantdream.checkpoint import atomic_json, graceful_interrupt, load_checkpoint, save_checkpoint
from quantdream.world.captions import caption
from quantdream.world.render import COLOURS, PATTERNS, POSITIONS, SIZES, Scene, _jitter_rgb
from quantdream.world.render import COLOUR_NAMES

from .data import EVAL_SEED, SceneStream
from .images import augment, to_tensor
from .io import ASSET_DIR, export_weights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    model: str  # "reader", "clip" or "classifier"
    seed: int = EVAL_SEED  # data draw and augmentation; distinct from the generator's 0/1
    batch_size: int = 128  # scenes per step (clip renders two views of each)
    steps: int = 1300  # total optimizer steps: the length of the cosine schedule
    lr: float = 2e-3  # AdamW peak learning rate
    weight_decay: float = 1e-4
    warmup: int = 50  # linear warm-up steps
    grad_clip: float = 1.0
    instance_weight: float = 0.5  # clip only: weight of the same-object, different-scene term
    curriculum: tuple[float, float] = (0.1, 0.5)  # patterned backgrounds: none before this fraction of the
    #   steps, all (the world's own share) after the second; see `curriculum`
    widths: tuple[int, ...] | None = None  # classifier only: stage widths (default ClassifierConfig's)
    run_dir: str = "runs/evaluator"
    export_dir: str = str(ASSET_DIR)


def get_lr(step: int, c: TrainConfig) -> float:
    """1. linear warm-up, 2. cosine decay to 0 at ``c.steps``."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    return c.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - c.warmup) / max(1, c.steps - c.warmup))))


# --------------------------------------------------------------------------------------------- tasks
def restage(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same object(s) (item, colouring, print) in a freshly drawn scene: new background, size,
    position and placement jitter. The background colour avoids the objects' colour words."""
    s = copy.deepcopy(scene)
    taken = {o.colour for o in s.objects}
    s.bg_colour = int(rng.choice([c for c in range(len(COLOURS)) if c not in taken]))
    s.bg_rgb = _jitter_rgb(rng, COLOUR_NAMES[s.bg_colour], 10)
    s.bg_pattern, s.stripe_dir = int(rng.integers(len(PATTERNS))), int(rng.integers(3))
    s.size, s.position = int(rng.integers(len(SIZES))), int(rng.integers(len(POSITIONS)))
    s.jitter = (int(rng.integers(-2, 3)), int(rng.integers(-2, 3)))
    return s


def curriculum(scenes: list[Scene], step: int, c: TrainConfig, rng: np.random.Generator) -> list[Scene]:
    """Patterned backgrounds are phased in: a scene keeps its drawn pattern with probability rising
    linearly from 0 at ``c.curriculum[0] * steps`` to 1 at ``c.curriculum[1] * steps``; the others get a
    plain background. Measured: with every pattern from step 0, class accuracy stayed at chance for 200
    steps of 64 scenes (stripes, checks and dots drown the silhouette); on plain backgrounds it learns."""
    start, end = (f * c.steps for f in c.curriculum)
    p_keep = min(1.0, max(0.0, (step - start) / max(1.0, end - start)))
    for s in scenes:
        if rng.random() >= p_keep:
            s.bg_pattern = PATTERNS.index("plain")
    return scenes


class ReaderTask:
    name = "reader"

    def build(self, c: TrainConfig) -> torch.nn.Module:
        from .reader import AttributeReader, ReaderConfig
        self.model_config = ReaderConfig()
        return AttributeReader(self.model_config)

    def loss(self, model, stream: SceneStream, gen: torch.Generator, c: TrainConfig, step: int) -> tuple[torch.Tensor, dict]:
        from .reader import reader_loss, scene_targets
        scenes = curriculum(stream.scenes(c.batch_size), step, c, stream.rng)
        x = augment(to_tensor(stream.render(scenes)), gen).contiguous(memory_format=torch.channels_last)
        loss = reader_loss(model(x), scene_targets(scenes))
        return loss, {}


class ClipTask:
    name = "clip"

    def build(self, c: TrainConfig) -> torch.nn.Module:
        from transformers import CLIPTokenizer

        from quantdream.models.embedded import TOKENIZER_DIR

        from .worldclip import WorldClip, WorldClipConfig
        self.tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
        self.model_config = WorldClipConfig(vocab_size=len(self.tokenizer))
        return WorldClip(self.model_config)

    def loss(self, model, stream: SceneStream, gen: torch.Generator, c: TrainConfig, step: int) -> tuple[torch.Tensor, dict]:
        from .worldclip import clip_loss, instance_loss
        scenes_a = curriculum(stream.scenes(c.batch_size), step, c, stream.rng)
        scenes_b = curriculum([restage(s, stream.rng) for s in scenes_a], step, c, stream.rng)
        scenes = scenes_a + scenes_b  # (2B,): view a of every scene, then view b
        texts = [caption(s, stream.rng)[0] for s in scenes]
        x = augment(to_tensor(stream.render(scenes)), gen).contiguous(memory_format=torch.channels_last)
        tok = self.tokenizer(texts, padding="max_length", max_length=self.model_config.max_length,
                             truncation=True, return_tensors="pt")
        img = model.encode_image(x)  # (2B, D)
        txt = model.encode_text(tok.input_ids, tok.attention_mask)  # (2B, D)
        l_clip = clip_loss(img, txt, model.logit_scale)
        l_inst = instance_loss(img[: c.batch_size], img[c.batch_size:])
        return l_clip + c.instance_weight * l_inst, {"clip": l_clip, "inst": l_inst}


class ClassifierTask:
    name = "classifier"

    def build(self, c: TrainConfig) -> torch.nn.Module:
        from .classifier import ClassifierConfig, CropClassifier
        self.model_config = ClassifierConfig(widths=tuple(c.widths)) if c.widths else ClassifierConfig()
        return CropClassifier(self.model_config)

    def loss(self, model, stream: SceneStream, gen: torch.Generator, c: TrainConfig, step: int) -> tuple[torch.Tensor, dict]:
        from .classifier import crop_objects, scene_boxes
        scenes = curriculum(stream.scenes(c.batch_size), step, c, stream.rng)
        x = augment(to_tensor(stream.render(scenes)), gen)
        crops, owner = crop_objects(x, scene_boxes(scenes))      # at the true geometry
        seen: set[int] = set()
        y = []
        for i in owner:
            y.append(scenes[i].objects[1 if i in seen else 0].cls)
            seen.add(i)
        loss = torch.nn.functional.cross_entropy(model(crops.contiguous(memory_format=torch.channels_last)),
                                                 torch.tensor(y), label_smoothing=0.05)
        return loss, {}


TASKS = {"reader": ReaderTask, "clip": ClipTask, "classifier": ClassifierTask}


# ---------------------------------------------------------------------------------------------- loop
def train(c: TrainConfig, minutes: float | None = None, save_every: float = 120.0, callback=None) -> dict:
    """Train (or resume) ``c.model``. Returns {"step", "done", "seconds"}; exports weights when done."""
    torch.set_num_threads(1)  # the generator trains beside us on a 2-core machine
    task = TASKS[c.model]()
    run = Path(c.run_dir) / c.model
    ckpt_path = run / "checkpoint.pt"
    torch.manual_seed(c.seed)
    model = task.build(c).to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=c.lr)
    stream = SceneStream("train", seed=c.seed)
    gen = torch.Generator().manual_seed(c.seed + 1)  # augmentation stream, apart from the scene draw
    step, elapsed = 0, 0.0

    ckpt = load_checkpoint(ckpt_path)
    if ckpt is not None:
        if ckpt["config"] != asdict(c):
            raise ValueError(f"{ckpt_path} was made with config {ckpt['config']}, not {asdict(c)}; "
                             f"pass the same flags to resume, or delete {run} to start over")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        stream.set_state(ckpt["data_rng"])
        gen.set_state(ckpt["aug_rng"])
        if "torch_rng" in ckpt:  # dropout
            torch.set_rng_state(ckpt["torch_rng"])
        step, elapsed = ckpt["step"], ckpt["seconds"]
        logger.info("resumed %s from step %d (%.1f min trained)", ckpt_path, step, elapsed / 60)

    def save() -> None:
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                    "seconds": elapsed, "data_rng": stream.state(), "aug_rng": gen.get_state(),
                                    "torch_rng": torch.get_rng_state(),
                                    "config": asdict(c), "model_config": task.model_config.to_dict()})

    n_params = sum(p.numel() for p in model.parameters())
    logger.info("***** Running training: %s *****", c.model)
    logger.info("  parameters = %.2fM, batch = %d scenes, steps = %d (from %d), lr = %g, seed = %d",
                n_params / 1e6, c.batch_size, c.steps, step, c.lr, c.seed)
    t_start, t_saved = time.time(), time.time()
    time_limit = minutes * 60 if minutes else float("inf")
    bar = tqdm(total=c.steps, initial=step, desc=c.model, dynamic_ncols=True)
    model.train()
    with graceful_interrupt() as stop:
        while step < c.steps and not stop:
            t0 = time.time()
            lr = get_lr(step, c)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, parts = task.loss(model, stream, gen, c, step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            elapsed += time.time() - t0
            if step % 10 == 0 or step == c.steps:  # .item() only on logging steps
                logs = {"loss": f"{loss.item():.3f}", "lr": f"{lr:.2e}", **{k: f"{v.item():.3f}" for k, v in parts.items()}}
                bar.set_postfix(logs)
                if callback:
                    callback({"step": step, "loss": loss.item(), "lr": lr})
            bar.update(1)
            if time.time() - t_start >= time_limit:  # after the step: a run makes >= 1 step
                break
            if time.time() - t_saved > save_every:
                save()
                t_saved = time.time()
    bar.close()
    save()
    done = step >= c.steps
    if done:
        model.eval()
        path = export_weights(model, task.model_config.to_dict(), c.export_dir, c.model,
                              meta={"train": asdict(c), "steps": step, "train_minutes": round(elapsed / 60, 1)})
        logger.info("done: exported %s", path)
    else:
        logger.info("stopped at step %d/%d; run the same command again to resume", step, c.steps)
    return {"step": step, "done": done, "seconds": elapsed}


# -------------------------------------------------------------------------------------------- report
def report(n: int = 2000, seed: int = 4321, out: str | Path | None = None) -> dict:
    """Measure the packaged evaluator on test-split renders (see the module docstring)."""
    from . import load_evaluator
    from .metrics import reader_accuracy, pairwise_cosine

    torch.set_num_threads(1)
    ev = load_evaluator()
    stream = SceneStream("test", seed=seed)
    scenes = stream.scenes(n)
    imgs = stream.render(scenes)
    truths = [s.attributes() for s in scenes]
    res: dict = {"n": n, "split": "test", "seed": seed}
    res["reader_clean"] = reader_accuracy(ev.read(imgs), truths)
    x_aug = augment(to_tensor(imgs), torch.Generator().manual_seed(seed))
    res["reader_augmented"] = reader_accuracy(ev.read(x_aug), truths)

    # CLIP-T retrieval: true caption vs the same caption with a wrong class / a wrong colour
    rng = np.random.default_rng(seed)
    m = min(n, 500)
    caps = [caption(s, rng) for s in scenes[:m]]
    texts = [t for t, _ in caps]
    img_f = ev.clip_image(imgs[:m])
    txt_f = ev.clip_text(texts)
    res["clip_t_true"] = float((img_f * txt_f).sum(-1).mean())
    for attr, names in (("class", None), ("colour", COLOUR_NAMES)):
        wrong = [_swap(t, named, attr, rng) for t, named in caps]
        keep = [i for i, w in enumerate(wrong) if w is not None]
        w_f = ev.clip_text([wrong[i] for i in keep])
        s_true = (img_f[keep] * txt_f[keep]).sum(-1)
        s_wrong = (img_f[keep] * w_f).sum(-1)
        res[f"clip_t_rank_vs_wrong_{attr}"] = float((s_true > s_wrong).float().mean())
    sim = img_f @ txt_f.T  # (m, m)
    res["clip_t_top1_retrieval"] = float((sim.argmax(1) == torch.arange(m)).float().mean())

    # CLIP-I / EffNet sanity: one object (item + colouring + print) in 4 scenes, 60 subjects
    subj = stream.scenes(60, p_two=0.0, p_print=0.6)
    views = [restage(s, stream.rng) for s in subj for _ in range(4)]
    vimgs = stream.render(views)
    sid = torch.arange(60).repeat_interleave(4)
    cls = torch.tensor([s.objects[0].cls for s in subj]).repeat_interleave(4)
    for name, fn in (("clip_i", ev.clip_image), ("effnet", ev.effnet)):
        try:
            f = fn(vimgs)
        except ImportError as e:  # EffNet is optional
            res[f"{name}_sanity"] = str(e)
            continue
        s = pairwise_cosine(f, f)
        eye = torch.eye(len(f), dtype=torch.bool)
        same = (sid[:, None] == sid[None]) & ~eye
        same_cls = (cls[:, None] == cls[None]) & (sid[:, None] != sid[None])
        diff_cls = cls[:, None] != cls[None]
        res[f"{name}_sanity"] = {"same_subject": float(s[same].mean()), "other_subject_same_class": float(s[same_cls].mean()),
                                 "other_class": float(s[diff_cls].mean()),
                                 "nearest_is_same_subject": float((s.masked_fill(eye, -2).argmax(1).div(4, rounding_mode="floor") == sid).float().mean())}
    res["subjects"] = subject_similarity(ev)
    if out is not None:
        atomic_json(out, res)
    return res


def subject_similarity(ev, root: str | Path | None = None) -> dict:
    """For the committed subjects (examples/subjects/<name>/*.png): mean similarity of a subject's photos
    among themselves vs to other subjects' photos, per encoder. Own > others for every subject is what
    lets CLIP-I / EffNet tell a personalized subject from its class."""
    from PIL import Image

    from .metrics import clip_i, self_similarity
    root = Path(root) if root else Path(__file__).resolve().parents[3] / "examples" / "subjects"
    photos = {d.name: [Image.open(f).convert("RGB") for f in sorted(d.glob("*.png"))]
              for d in sorted(root.glob("*")) if d.is_dir()}
    photos = {k: v for k, v in photos.items() if len(v) >= 2}
    if not photos:
        return {"error": f"no subject photos under {root}"}
    out = {}
    for name, fn in (("clip_i", ev.clip_image), ("effnet", ev.effnet)):
        try:
            feats = {k: fn(v) for k, v in photos.items()}
        except ImportError as e:
            out[name] = str(e)
            continue
        rows = {}
        for k, f in feats.items():
            others = [clip_i(f, g) for j, g in feats.items() if j != k]
            rows[k] = {"own": round(self_similarity(f), 4), "others_mean": round(float(np.mean(others)), 4),
                       "others_max": round(float(np.max(others)), 4)}
        out[name] = {"per_subject": rows, "own_above_every_other": sum(r["own"] > r["others_max"] for r in rows.values()),
                     "n_subjects": len(rows)}
    return out


def _swap(text: str, named: dict, attr: str, rng: np.random.Generator) -> str | None:
    """``text`` with the named ``attr`` (class or colour) word replaced by another one; None if not named."""
    from quantdream.world.render import CLASSES
    if attr not in named:
        return None
    vocab = CLASSES if attr == "class" else COLOUR_NAMES
    new = str(rng.choice([w for w in vocab if w != named[attr]]))
    words = text.split(" ")
    i = words.index(named[attr])  # the first object's word comes first in the grammar
    words[i] = new
    if i > 0 and words[i - 1] in ("a", "an"):  # keep the article right
        words[i - 1] = "an" if new[0] in "aeiou" else "a"
    return " ".join(words)


# ----------------------------------------------------------------------------------------------- cli
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quantdream.eval.train_evaluator", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=[*TASKS, "report"], help="network to train (reader, clip, classifier: the class "
                   "reader on object crops), or `report` to measure the packaged evaluator")
    p.add_argument("--minutes", type=float, default=None, help="stop this run after M minutes (checkpoint saved; rerun to resume)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (sets the cosine schedule; keep it fixed across resumes)")
    p.add_argument("--batch-size", type=int, default=None, help="scenes per step (default 128)")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default 2e-3)")
    p.add_argument("--widths", default=None, help="classifier: stage widths, e.g. 48,96,192 (default 32,64,128)")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="seed of the data draw and augmentations (default 1234)")
    p.add_argument("--run-dir", default="runs/evaluator", help="checkpoint folder (default runs/evaluator)")
    p.add_argument("--export-dir", default=str(ASSET_DIR), help="where finished weights go (default: the package assets)")
    p.add_argument("--save-every", type=float, default=120.0, help="seconds between checkpoints (default 120)")
    p.add_argument("--n", type=int, default=2000, help="report: number of test-split scenes (default 2000)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if a.what == "report":
        import json
        res = report(a.n, out=Path(a.export_dir) / "report.json")
        print(json.dumps(res, indent=2))
        return 0
    widths = tuple(int(w) for w in a.widths.split(",")) if a.widths else None
    c = TrainConfig(model=a.what, seed=a.seed, run_dir=a.run_dir, export_dir=a.export_dir, widths=widths)
    overrides = {k: v for k, v in (("steps", a.steps), ("batch_size", a.batch_size), ("lr", a.lr)) if v is not None}
    c = replace(c, **overrides)
    train(c, minutes=a.minutes, save_every=a.save_every)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
