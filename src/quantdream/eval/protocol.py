"""The DreamBooth evaluation protocol (Ruiz et al. 2023, §4.1) over personalization runs of any method.

    result = evaluate_runs(["runs/zoodip-bag", "runs/ti-bag"], out="eval/", baseline=True)

For each run: its ``run.json`` (+ ``config.toml``) names the method, model, weights, token and training
photos; an :class:`Adapter` for the method loads the model it was trained on (quantized as in training)
plus its learned output; every prompt of the subject's list (``subject.json``) is rendered
``images_per_prompt`` times with seeds ``seed + j`` (the same starting noise for every run and prompt).

Prompts. TI-style methods (ti, zoodip, gf-ti) put the token alone where ``{}`` is ("a <bag> on a green
background"); DreamBooth-style methods put "<token> <class word>" ("a sks bag ..."); the baseline (the
floor) puts the init word there with no personalization. CLIP-T scores every image against the prompt
with the CLASS WORD in place of ``{}`` ("a bag on a green background"): a text encoder that never saw the
token cannot read it, and the class-word prompt is what the image should show (the DreamBooth paper's
convention of scoring against the prompt's content; stated in every report).

Metrics per run and subject, then the mean over subjects of each method:
    world_clip_i, world_clip_t   world CLIP of the embedded world (quantdream.eval)
    effnet                       EfficientNet-Lite0 generated-vs-reference similarity (the DINO stand-in)
    prompt_accuracy              the attribute reader against each prompt's ``expect`` (subject class always
                                 expected), overall and per kind (context / property / composition)
    clip_i, clip_t, dino         real encoders from local folders (``clip=`` / ``dino=``), when given
World metrics are meaningful only on the embedded model (its world); on other models they run but say little.

New methods plug in with :func:`register_adapter`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

KINDS = ("context", "property", "composition")
WORLD_NOTE = "world metrics (world CLIP, EfficientNet-Lite0, prompt accuracy) are meaningful on the embedded model only"
CLIP_T_NOTE = "CLIP-T scores each image against its prompt with the class word in place of the token"


# ----------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class RunInfo:
    """What evaluation needs to know about one personalization run."""

    dir: Path
    name: str                  # unique label in the report (the folder name)
    method: str
    model: str
    weights: str               # int8 | int4 | none (as trained)
    token: str
    init_word: str
    images: str | None         # the training photos (config.toml), used to find subject.json
    summary: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def group(self) -> str:
        """Runs that are averaged together over subjects: same method, weights and model."""
        model = "embedded" if self.model == "tiny" else Path(self.model).name
        return f"{self.method} ({self.weights}, {model})"


def read_run(run_dir: str | Path) -> RunInfo:
    """Read ``run.json`` (required: a finished run) and ``config.toml`` of a run folder."""
    d = Path(run_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"run folder {str(d)!r} does not exist" if not d.exists()
                                else f"{str(d)!r} is a file; give a run folder (the --out of quantdream personalize)")
    rj = d / "run.json"
    if not rj.is_file():
        hint = (" (it has a checkpoint: the run was interrupted; finish it with `quantdream personalize ... --resume`)"
                if (d / "checkpoint.pt").is_file() else "")
        raise FileNotFoundError(f"{str(d)!r} is not a finished personalization run: no run.json{hint}")
    try:
        summary = json.loads(rj.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{rj} is not valid JSON ({e})") from None
    missing = [k for k in ("method", "model", "token") if not summary.get(k)]
    if missing:
        raise ValueError(f"{rj} lacks {', '.join(missing)}; it was not written by quantdream personalize")
    config = {}
    if (d / "config.toml").is_file():
        config = tomllib.loads((d / "config.toml").read_text())
    return RunInfo(dir=d, name=d.name, method=summary["method"], model=str(summary["model"]),
                   weights=summary.get("weights", config.get("weights", "none")), token=summary["token"],
                   init_word=summary.get("init_word") or config.get("init_word", ""),
                   images=config.get("images") or summary.get("images_dir"), summary=summary)


# ----------------------------------------------------------------------------- adapters
def load_base(run: RunInfo, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The pipeline the run was trained on (its model, quantized as in training): the token methods' frozen
    model, i.e. the base ``Method.prepare_model`` (UNet at ``run.weights``, VAE and text encoder int8 when
    the UNet is quantized: ZOODiP's setting). Weight methods bring their own (``Adapter.load_base``)."""
    from ..methods.base import Method
    from ..models.load import load_pipeline
    pipe = load_pipeline(run.model, device=device, dtype=dtype)
    Method.prepare_model(pipe.text_encoder, pipe.vae, pipe.unet, run.weights, None)
    return pipe


@dataclass(frozen=True)
class Adapter:
    """How ``evaluate`` renders a method's runs.

    prompt_style: "token" (TI-style: the token alone replaces {}) or "class" (DreamBooth-style: "<token> <class>").
    check(run): raise a clear error if the run's learned output is missing (runs before anything is loaded).
    load(run, device, dtype) -> pipeline with the learned output applied.
    base_weights(run) -> a label for the weights of the model the output renders on (the --baseline
    floor's); default the run's own.
    load_base(run, device, dtype) -> that model with nothing learned applied (the floor); default
    :func:`load_base` at ``base_weights(run)``.
    """

    prompt_style: str
    check: Callable[[RunInfo], None]
    load: Callable[[RunInfo, str, torch.dtype], Any]
    base_weights: Callable[[RunInfo], str] = lambda run: run.weights
    load_base: Callable[[RunInfo, str, torch.dtype], Any] | None = None

    def load_floor(self, run: RunInfo, device: str = "cpu", dtype: torch.dtype = torch.float32):
        if self.load_base is not None:
            return self.load_base(run, device, dtype)
        return load_base(dataclasses.replace(run, weights=self.base_weights(run)), device, dtype)

    def subject_text(self, run: RunInfo, class_word: str) -> str:
        return run.token if self.prompt_style == "token" else f"{run.token} {class_word}"


def _check_embedding(run: RunInfo) -> None:
    if not (run.dir / "learned_embeds.safetensors").is_file():
        raise FileNotFoundError(f"run {str(run.dir)!r} ({run.method}) has no learned_embeds.safetensors")


def _load_embedding(run: RunInfo, device: str = "cpu", dtype: torch.dtype = torch.float32):
    pipe = load_base(run, device, dtype)
    # stock diffusers loader: what a user of the file does; multi-vector tokens expand in the prompt
    pipe.load_textual_inversion(str(run.dir / "learned_embeds.safetensors"), token=run.token)
    return pipe


def _as_trained(run: RunInfo) -> str:
    """The token methods render on the model they trained on, quantized as in training."""
    return run.weights


TOKEN_ADAPTER = Adapter("token", _check_embedding, _load_embedding, base_weights=_as_trained)
ADAPTERS: dict[str, Adapter] = {"zoodip": TOKEN_ADAPTER, "zoodip-fast": TOKEN_ADAPTER, "ti": TOKEN_ADAPTER, "gf-ti": TOKEN_ADAPTER}


def register_adapter(method: str, adapter: Adapter) -> None:
    """Teach ``evaluate`` a method (dreambooth folders, LoRA, PEQA/TuneQDM scale files...)."""
    ADAPTERS[method] = adapter


def weight_method_adapter() -> Adapter:
    """The weight methods (DreamBooth, LoRA, QLoRA, PEQA, TuneQDM*): DreamBooth-style prompts ("sks <class>") on
    the run's model with its output applied; methods/adapters.py says which base each output renders on."""
    from ..methods import adapters as out

    def load(run: RunInfo, device: str = "cpu", dtype: torch.dtype | None = None):
        return out.load_applied(run.model, run.dir, device, dtype)

    def load_base_of(run: RunInfo, device: str = "cpu", dtype: torch.dtype | None = None):
        return out.load_base(run.method, run.model, run.weights, device, dtype)

    return Adapter("class", lambda run: out.detect(run.dir), load, lambda run: out.base_weights(run.weights),
                   load_base_of)


def register_weight_methods() -> None:
    """Register :func:`weight_method_adapter` for every weight method (methods/adapters.WEIGHT_METHODS)."""
    from ..methods.adapters import WEIGHT_METHODS
    adapter = weight_method_adapter()
    for name in WEIGHT_METHODS:
        ADAPTERS.setdefault(name, adapter)


def adapter_for(run: RunInfo) -> Adapter:
    if run.method not in ADAPTERS:
        try:
            register_weight_methods()
        except ImportError:
            pass
    if run.method not in ADAPTERS:
        raise ValueError(f"run {str(run.dir)!r} was trained with method {run.method!r}, which evaluate cannot load "
                         f"yet; it knows {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[run.method]


# ----------------------------------------------------------------------------- subjects and prompts
def subject_for(run: RunInfo, subject: str | Path | None) -> dict:
    """``subject`` if given, else the subject.json beside the run's training photos."""
    from ..world.subjects import load_subject
    if subject is not None:
        return load_subject(subject)
    if not run.images or not (Path(run.images) / "subject.json").is_file():
        raise FileNotFoundError(f"run {str(run.dir)!r}: no subject to evaluate against; its training photos "
                                f"({run.images or 'unknown'}) have no subject.json. Pass --subject DIR "
                                f"(a folder with subject.json, e.g. examples/subjects/teal_bag)")
    return load_subject(run.images)


def select_prompts(subject: dict, kinds: tuple[str, ...] | None) -> list[dict]:
    prompts = subject.get("prompts") or []
    if not prompts:
        raise ValueError(f"subject {subject['dir']!r} has no prompts in subject.json")
    for p in prompts:
        if "{}" not in p["prompt"]:
            raise ValueError(f"subject {subject['dir']!r}: prompt {p['prompt']!r} has no '{{}}' for the subject")
    if kinds:
        prompts = [p for p in prompts if p.get("kind") in kinds]
        if not prompts:
            raise ValueError(f"subject {subject['dir']!r} has no prompts of kind {', '.join(kinds)}")
    return prompts


def parse_kinds(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"--prompts {text!r}: unknown kind(s) {bad}; choose from {', '.join(KINDS)}")
    return kinds


def reference_images(subject: dict) -> list:
    from PIL import Image
    out = []
    for p in subject["photos"]:
        path = Path(subject["dir"]) / p["file"]
        if not path.is_file():
            raise FileNotFoundError(f"subject {subject['dir']!r}: photo {p['file']} is missing")
        out.append(Image.open(path).convert("RGB"))
    return out


# ----------------------------------------------------------------------------- scoring
@dataclass
class Encoders:
    """What scores images. Any of them may be None (that metric is skipped, with a note)."""

    world: Any = None          # quantdream.eval.Evaluator
    clip: Any = None           # real_encoders.RealClip
    dino: Any = None           # real_encoders.RealDino
    notes: list[str] = field(default_factory=list)

    def has(self, part: str) -> bool:
        return part not in self._missing

    _missing: set = field(default_factory=set)


def load_encoders(evaluator_dir: str | Path | None = None, clip: str | Path | None = None,
                  dino: str | Path | None = None, device: str = "cpu") -> Encoders:
    """The world evaluator (whatever of it exists) and the real encoders asked for; notes say what is skipped."""
    from .evaluator import Evaluator
    from .io import ASSET_DIR
    enc = Encoders()
    d = Path(evaluator_dir) if evaluator_dir else ASSET_DIR
    enc.world = Evaluator(d)
    for part, files, what in (("reader", ("reader.json", "reader.safetensors"), "prompt accuracy"),
                              ("clip", ("clip.json", "clip.safetensors"), "world CLIP-I / CLIP-T")):
        if not all((d / f).is_file() for f in files):
            enc._missing.add(part)
            enc.notes.append(f"{what} skipped: no world evaluator {part} in {d} "
                             f"(train it with `python -m quantdream.eval.train_evaluator {part}`)")
    try:
        from .effnet import _import
        _import()
    except ImportError as e:
        enc._missing.add("effnet")
        enc.notes.append(f"EfficientNet-Lite0 similarity skipped: {e}")
    if clip:
        from .real_encoders import RealClip
        enc.clip = RealClip(clip, device=device)
    else:
        enc.notes.append("real CLIP-I / CLIP-T skipped: no --clip folder given (a local transformers CLIP folder; "
                         "nothing is downloaded)")
    if dino:
        from .real_encoders import RealDino
        enc.dino = RealDino(dino, device=device)
    else:
        enc.notes.append("real DINO skipped: no --dino folder given (a local transformers DINOv2 folder)")
    return enc


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def score(images: list[list], prompts: list[dict], class_word: str, reference: list, enc: Encoders,
          subject: dict | None = None) -> dict:
    """Metrics of rendered ``images[prompt][j]`` against the subject's ``reference`` photos, and, for a
    world subject (``subject["object"]``), subject attribute accuracy (``subject_attr.py``)."""
    from .metrics import clip_i, clip_t, prompt_accuracy
    from ..models.sample import to_uint8
    n = len(images[0])
    flat = to_uint8([im for row in images for im in row])                        # (P*n, H, W, 3)
    texts = [p["prompt"].format(class_word) for p in prompts]                     # CLIP-T text: class word in
    texts_rows = [t for t in texts for _ in range(n)]
    out: dict[str, Any] = {}
    if enc.world is not None and enc.has("clip"):
        g = enc.world.clip_image(flat)
        out["world_clip_i"] = clip_i(g, enc.world.clip_image(reference))
        out["world_clip_t"] = clip_t(g, enc.world.clip_text(texts_rows))
    if enc.world is not None and enc.has("effnet"):
        out["effnet"] = clip_i(enc.world.effnet(flat), enc.world.effnet(reference))
    if enc.world is not None and enc.has("reader"):
        preds = enc.world.read(flat)
        named = [p["expect"] for p in prompts for _ in range(n)]
        acc = prompt_accuracy(preds, named)
        out["prompt_accuracy"] = acc["overall"]
        out["prompt_accuracy_attributes"] = {k: v for k, v in acc.items() if k not in ("overall",)}
        for kind in KINDS:
            idx = [i for i, p in enumerate(prompts) for _ in range(n) if p.get("kind") == kind]
            if idx:
                out[f"prompt_accuracy_{kind}"] = prompt_accuracy([preds[i] for i in idx],
                                                                 [named[i] for i in idx])["overall"]
    if enc.clip is not None:
        g = enc.clip.image(flat)
        out["clip_i"] = clip_i(g, enc.clip.image(reference))
        out["clip_t"] = clip_t(g, enc.clip.text(texts_rows))
    if enc.dino is not None:
        out["dino"] = clip_i(enc.dino.image(flat), enc.dino.image(reference))
    if subject is not None:
        out.update(attribute_scores(flat, [p.get("expect", {}) for p in prompts for _ in range(n)], subject))
    return out


def attribute_scores(flat, expects: list[dict], subject: dict) -> dict:
    """``subject_attr_acc`` and its parts over the images whose prompt keeps the subject's colour (a
    prompt naming a colour asks it to change); {} when the subject is not a world object. Images of
    "next to a ..." prompts are read on their left half, where the subject is drawn."""
    from .subject_attr import subject_attribute_accuracy, subject_items
    items = subject_items(subject)
    keep = [i for i, e in enumerate(expects) if "colour" not in e]
    if items is None or not keep:
        return {}
    r = subject_attribute_accuracy(flat[keep], subject["object"], items, left_only=["class2" in expects[i] for i in keep])
    return {"subject_attr_acc": r.pop("subject_attr_acc"), "subject_attr_parts": r}


def subject_ceiling(reference: list, enc: Encoders, subject: dict | None = None) -> dict:
    """Similarity of the subject's photos among themselves: the most CLIP-I / EffNet / DINO can say; and
    the photos' own subject attribute accuracy (for a world subject)."""
    from .metrics import self_similarity
    from ..models.sample import to_uint8
    ref = to_uint8(reference)
    out = {}
    if len(reference) < 2:
        return out
    if enc.world is not None and enc.has("clip"):
        out["world_clip_i"] = self_similarity(enc.world.clip_image(ref))
    if enc.world is not None and enc.has("effnet"):
        out["effnet"] = self_similarity(enc.world.effnet(ref))
    if enc.clip is not None:
        out["clip_i"] = self_similarity(enc.clip.image(reference))
    if enc.dino is not None:
        out["dino"] = self_similarity(enc.dino.image(reference))
    if subject is not None:
        a = attribute_scores(ref, [{}] * len(ref), subject)
        if a:
            out["subject_attr_acc"] = a["subject_attr_acc"]
    return out


# ----------------------------------------------------------------------------- the protocol
@dataclass(frozen=True)
class EvalSettings:
    images_per_prompt: int = 4
    kinds: tuple[str, ...] | None = None   # None: every prompt of the subject
    seed: int = 0
    steps: int = 0                         # 0: 25 on the embedded model, 50 otherwise (DDIM)
    guidance: float = 0.0                  # 0: 4.0 on the embedded model, 7.5 otherwise
    baseline: bool = False                 # also the init word with no personalization (the floor)
    device: str = "auto"
    batch_size: int = 16


METRIC_COLUMNS = [("world_clip_i", "world CLIP-I"), ("subject_attr_acc", "subject attr. acc."), ("world_clip_t", "world CLIP-T"), ("effnet", "EffNet-Lite0 sim."),
                  ("prompt_accuracy", "prompt acc."), ("prompt_accuracy_context", "acc. context"),
                  ("prompt_accuracy_property", "acc. property"), ("prompt_accuracy_composition", "acc. composition"),
                  ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("dino", "DINO")]


def _unique_names(runs: list[RunInfo]) -> list[RunInfo]:
    seen: dict[str, int] = {}
    out = []
    for r in runs:
        k = seen.get(r.name, 0)
        seen[r.name] = k + 1
        out.append(r if k == 0 else dataclasses.replace(r, name=f"{r.name}-{k + 1}"))
    return out


def plan(run_dirs: list[str | Path], subject: str | Path | None = None,
         kinds: tuple[str, ...] | None = None) -> list[tuple[RunInfo, Adapter, dict, list[dict]]]:
    """Validate every run before anything is loaded: run.json, known method, learned output, subject, prompts."""
    if not run_dirs:
        raise ValueError("give at least one run folder to evaluate")
    runs = _unique_names([read_run(d) for d in run_dirs])
    out = []
    for run in runs:
        adapter = adapter_for(run)
        adapter.check(run)
        subj = subject_for(run, subject)
        prompts = select_prompts(subj, kinds)
        reference_images(subj)  # photos exist and decode
        out.append((run, adapter, subj, prompts))
    return out


def evaluate_runs(run_dirs: list[str | Path], out: str | Path, *, subject: str | Path | None = None,
                  settings: EvalSettings = EvalSettings(), clip: str | Path | None = None,
                  dino: str | Path | None = None, evaluator_dir: str | Path | None = None,
                  encoders: Encoders | None = None, callback: Callable[[dict], None] | None = None) -> dict:
    """Render and score every run (and the baseline when asked); write metrics.json, metrics.md and one
    sample grid per run under ``out``. Returns what metrics.json holds."""
    from ..models.load import SAMPLING_DEFAULTS, is_tiny, pick_device, resolve_model
    from ..models.sample import generate_images, make_grid, slug
    from ..checkpoint import atomic_write
    if settings.images_per_prompt < 1:
        raise ValueError(f"--images-per-prompt must be >= 1, got {settings.images_per_prompt}")
    jobs = plan(run_dirs, subject, settings.kinds)
    for run, *_ in jobs:
        resolve_model(run.model)
    device = pick_device(settings.device)
    enc = encoders if encoders is not None else load_encoders(evaluator_dir, clip, dino, device=device)
    # ---- validated: render
    out = Path(out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    ceilings: dict[str, dict] = {}
    done_baselines: set = set()

    def render(pipe, texts: list[str], model: str) -> tuple[list[list], int, float]:
        tiny = is_tiny(resolve_model(model))
        steps0, guid0 = SAMPLING_DEFAULTS["tiny" if tiny else "sd"]
        steps, guid = settings.steps or steps0, settings.guidance or guid0
        return generate_images(pipe, texts, settings.images_per_prompt, settings.seed, steps, guid,
                               batch_size=settings.batch_size), steps, guid

    def record(label: str, group: str, run: RunInfo | None, subj: dict, prompts: list[dict], texts: list[str],
               images: list[list], steps: int, guidance: float, model: str, weights: str) -> None:
        reference = reference_images(subj)
        if subj["name"] not in ceilings:
            ceilings[subj["name"]] = subject_ceiling(reference, enc, subj)
        metrics = score(images, prompts, subj["class_word"], reference, enc, subj)
        grid = out / "grids" / f"{slug(label, 80)}__{slug(subj['name'], 40)}.png"
        img = make_grid(images)
        atomic_write(grid, lambda tmp: img.save(tmp, format="PNG"))
        row = {"name": label, "group": group, "method": run.method if run else "baseline",
               "run_dir": str(run.dir) if run else None, "model": model, "weights": weights,
               "subject": subj["name"], "class_word": subj["class_word"], "prompts": texts,
               "clip_t_texts": [p["prompt"].format(subj["class_word"]) for p in prompts],
               "kinds": [p.get("kind") for p in prompts], "images_per_prompt": settings.images_per_prompt,
               "steps": steps, "guidance": guidance, "seed": settings.seed, "grid": str(grid.relative_to(out)),
               "training": {k: run.summary.get(k) for k in ("steps", "unet_forward_passes", "seconds")} if run else None,
               "metrics": metrics}
        rows.append(row)
        if callback is not None:
            callback(row)

    for run, adapter, subj, prompts in jobs:
        logger.info("evaluating %s (%s) on %s: %d prompts x %d images", run.name, run.method, subj["name"],
                    len(prompts), settings.images_per_prompt)
        base_weights = adapter.base_weights(run)               # the floor renders on the model the run renders on
        if settings.baseline and (run.model, base_weights, subj["name"]) not in done_baselines:
            done_baselines.add((run.model, base_weights, subj["name"]))
            word = run.init_word or subj["class_word"]
            pipe = adapter.load_floor(run, device)
            texts = [p["prompt"].format(word) for p in prompts]
            images, steps, guid = render(pipe, texts, run.model)
            del pipe
            record(f"baseline-{base_weights}", f"baseline: init word, no personalization ({base_weights})", None, subj,
                   prompts, texts, images, steps, guid, run.model, base_weights)
        pipe = adapter.load(run, device, torch.float32)
        texts = [p["prompt"].format(adapter.subject_text(run, subj["class_word"])) for p in prompts]
        images, steps, guid = render(pipe, texts, run.model)
        del pipe
        record(run.name, run.group, run, subj, prompts, texts, images, steps, guid, run.model, run.weights)

    result = {"settings": {**dataclasses.asdict(settings), "kinds": list(settings.kinds) if settings.kinds else None},
              "encoders": {"world": str(enc.world.directory) if enc.world is not None else None,
                           "clip": enc.clip.name if enc.clip is not None else None,
                           "dino": enc.dino.name if enc.dino is not None else None,
                           "effnet": "EfficientNet-Lite0 (ImageNet-1k), the DINO stand-in"},
              "notes": [CLIP_T_NOTE, WORLD_NOTE] + enc.notes,
              "rows": rows, "means": group_means(rows), "subject_ceiling": ceilings}
    save_result(out, result)
    return result


def save_result(out: str | Path, result: dict) -> None:
    """Write metrics.json and metrics.md of an evaluation (atomically)."""
    from ..checkpoint import atomic_json, atomic_write
    atomic_json(Path(out) / "metrics.json", result)
    atomic_write(Path(out) / "metrics.md", lambda tmp: Path(tmp).write_text(markdown(result)))


def group_means(rows: list[dict]) -> list[dict]:
    """Mean of every metric over the subjects of each group (method, weights, model), in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    out = []
    for g, rs in groups.items():
        keys = [k for k, _ in METRIC_COLUMNS]
        out.append({"group": g, "subjects": sorted({r["subject"] for r in rs}), "runs": len(rs),
                    "metrics": {k: _mean([r["metrics"].get(k) for r in rs]) for k in keys
                                if any(k in r["metrics"] for r in rs)}})
    return out


def _cell(x) -> str:
    return "" if x is None else f"{x:.3f}"


def markdown(result: dict) -> str:
    """Two tables (per run and subject; mean per method over subjects) and the notes."""
    present = [(k, h) for k, h in METRIC_COLUMNS if any(k in r["metrics"] for r in result["rows"])]
    lines = ["# Personalization evaluation (DreamBooth protocol)", ""]
    s = result["settings"]
    lines.append(f"{s['images_per_prompt']} images per prompt, seeds {s['seed']}..{s['seed'] + s['images_per_prompt'] - 1} "
                 f"(same for every run), prompt kinds: {', '.join(s['kinds']) if s['kinds'] else 'all'}.")
    lines.append("")
    lines.append("## Mean over subjects")
    lines.append("")
    lines.append("| method | subjects | " + " | ".join(h for _, h in present) + " |")
    lines.append("|---|---|" + "---|" * len(present))
    for m in result["means"]:
        lines.append(f"| {m['group']} | {len(m['subjects'])} | " +
                     " | ".join(_cell(m["metrics"].get(k)) for k, _ in present) + " |")
    lines.append("")
    lines.append("## Per run and subject")
    lines.append("")
    lines.append("| run | method | subject | " + " | ".join(h for _, h in present) + " | grid |")
    lines.append("|---|---|---|" + "---|" * len(present) + "---|")
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['method']} | {r['subject']} | " +
                     " | ".join(_cell(r["metrics"].get(k)) for k, _ in present) + f" | [grid]({r['grid']}) |")
    if result.get("subject_ceiling"):
        lines += ["", "Subject ceiling (photos among themselves): " + "; ".join(
            f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in c.items())
            for name, c in result["subject_ceiling"].items() if c)]
    enc = result["encoders"]
    lines += ["", "Encoders: " + ", ".join(f"{k}: {v}" for k, v in enc.items() if v), ""]
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"
