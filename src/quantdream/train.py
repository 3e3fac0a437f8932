"""The training scaffold shared by every personalization method.

    personalize(RunConfig(images=..., token="<my-bag>", init_word="bag", out=...)) -> RunResult

Order of work: validate every input (images, captions, model, token, bit width, settings) ->
load and quantize the frozen model -> encode the photos once -> create the output folder ->
loop (sample a batch, ``method.step``, log, checkpoint, sample grids) -> export.

Output folder:
    config.toml                  the resolved configuration (defaults < TOML file < command line)
    checkpoint.pt                token, optimizer state, SG buffer and projector, RNG states (atomic)
    snapshots/step_NNNNNN.safetensors    the token at every checkpoint
    samples/step_NNNNNN.png      fixed-seed sample grids (rows: prompts)
    learned_embeds.safetensors   the result of a token method, diffusers format (written last, with run.json)
    learned_embeds.pt            A1111 format (``export_a1111 = true``)
    unet/ | pytorch_lora_weights.safetensors | scales.safetensors, adapter.json
                                 the result of a weight method (dreambooth | lora, qlora | peqa, tuneqdm*)
    class_images/                DreamBooth prior-preservation images (generated once, reused on resume)
    loss.png, losses.json, run.json

The library does not print: progress goes to a tqdm bar when ``progress=True`` and to ``callback``.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import memory as memory_mod
from .checkpoint import atomic_json, atomic_write, graceful_interrupt, load_checkpoint, save_checkpoint
from .data.dataset import SubjectImages, list_images, load_caption_file
from .methods import METHODS, method_class, section_name
from .methods.base import (DenoisingObjective, Placeholder, RunResult, Streams, add_placeholder,
                           check_placeholder, config_from_dict, identifier_placeholder, preview_generator)

logger = logging.getLogger(__name__)

WEIGHTS = {"none": None, "int8": 8, "int4": 4, "nf4": 4}   # nf4: qlora's bitsandbytes Linear base
CHECKPOINT = "checkpoint.pt"

# Settings that change the training trajectory: a resumed run must match them.
TRAJECTORY_KEYS = ("images", "token", "init_word", "model", "method", "weights", "seed", "batch_size",
                   "num_vectors", "learnable_property", "captions", "flip_p", "resolution", "dtype")

# Chosen on the finished embedded model by a sweep (docs/personalization.md: two subjects, world CLIP-I,
# EfficientNet and prompt accuracy): ZOODiP 1500 steps at lr 1e-2 (the reference script's rate) had the best
# subject fidelity of 1e-2 / 3e-3 / 1e-3 and fits the README's 5-minute budget; TI at
# 5e-3 for 400 steps matched 1000 steps at 1e-3 and 1500 at 3e-4 for a third of the time. ZOODiP's PUTS interval
# on this model is [800, 1000) instead of SD's [500, 900): best of six intervals on 4 subjects, then on all 10
# +0.037 world CLIP-I and +0.017 prompt accuracy over [500, 900) (benchmarks/zoodip_study.py; docs/personalization.md).
# And n = 8 directions a step instead of the paper's 2 (9 UNet passes a step, one batch): the estimate's direction
# noise, not the objective, held ZOODiP below TI here (zoodip_study.py --study oracle: n -> infinity at the same steps
# lifts it to TI's level, n = 8 nearly as far; docs/personalization.md "Direction noise").
EMBEDDED_DEFAULTS = {
    "zoodip": {"steps": 1500, "section": {"lr": 1e-2, "t_low": 800, "t_high": 1000, "n": 8}},
    # zoodip-fast: 1/3 of ZOODiP's steps at ZOODiP's rate and PUTS interval with n = 2, i.e. 1/9 of ZOODiP's UNet
    # passes since ZOODiP's n = 8 (benchmarks/personalization.py, budget-vocab16). [800, 1000) beat [500, 900) on
    # 10 subjects: world CLIP-I 0.355 vs 0.333, prompt accuracy 0.617 vs 0.604, and no collapse on salmon_sneaker
    # (benchmarks/zoodip_study.py --study fast)
    "zoodip-fast": {"steps": 500, "section": {"lr": 1e-2, "t_low": 800, "t_high": 1000}},
    "ti": {"steps": 400, "section": {"lr": 5e-3}},
    # GF-TI gets ZOODiP's forward-pass budget: 1,500 steps x 9 passes = 675 generations x 20 candidates.
    "gf-ti": {"steps": 675, "section": {}},
    # The gradient baselines: the papers' step counts; rates from a sweep on two subjects (docs/personalization.md,
    # "Gradient baselines"): the highest rate that lifts subject fidelity without collapsing prompt accuracy.
    "dreambooth": {"steps": 400, "section": {"lr": 2e-5}},     # paper 5e-6 barely moves this model; 5e-5 drifts
    "lora": {"steps": 500, "section": {"lr": 1e-3}},           # paper 1e-4 barely moves it
    "qlora": {"steps": 500, "section": {"lr": 1e-3}},
    "peqa": {"steps": 400, "section": {}},                     # the paper's 3e-6; 1e-5 drifts, 1e-4 collapses
    "tuneqdm": {"steps": 400, "section": {}},                  # PEQA's 3e-6, as in TuneQDM
    "tuneqdm-s1": {"steps": 400, "section": {}},
    "tuneqdm-s2": {"steps": 400, "section": {}},
}
# Stable Diffusion (a local diffusers folder): the paper's settings (methods.md 1.9, §S1.5).
SD_DEFAULTS = {
    "zoodip": {"steps": 30000, "section": {}},
    "zoodip-fast": {"steps": 10000, "section": {}},  # 1/3 of ZOODiP's steps and passes (n = 2 both); unmeasured on SD
    "ti": {"steps": 5000, "section": {}},
    "gf-ti": {"steps": 13000, "section": {}},      # ZOODiP §S1.5: L = 13,000 (293 min at 0.74 it/s)
    "dreambooth": {"steps": 400, "section": {}},   # §S1.5, lr 5e-6
    "lora": {"steps": 500, "section": {}},         # §S1.5 QLoRA row, r=2, lr 1e-4
    "qlora": {"steps": 500, "section": {}},
    "peqa": {"steps": 400, "section": {}},         # §S1.5, lr 3e-6
    "tuneqdm": {"steps": 400, "section": {}},
    "tuneqdm-s1": {"steps": 400, "section": {}},
    "tuneqdm-s2": {"steps": 400, "section": {}},
}


@dataclass
class RunConfig:
    """Everything a run needs. Method settings live in one table per method (``zoodip``, ``zoodip_fast``, ``ti``,
    ``gf_ti``, ``dreambooth``, ``lora``, ``qlora``, ``peqa``, ``tuneqdm``, ``tuneqdm_s1``, ``tuneqdm_s2``)."""

    images: str = ""                  # folder of 3-6 photos of the subject
    token: str = ""                   # the new token, e.g. "<my-bag>" (weight methods: the identifier, default "sks")
    init_word: str = ""               # one-token class word that initialises it, e.g. "bag" (weight methods: the class)
    out: str = ""                     # output folder (must be new or empty, unless resume)
    model: str = "tiny"               # "tiny" (the embedded model) or a local diffusers folder
    method: str = "zoodip"            # one of quantdream.methods.METHODS
    weights: str = "auto"             # auto (the method's default) | int8 | int4 | none | nf4 (qlora)
    acts: int = 0                     # 8: Q-Diffusion-style calibrated activations on the quantized UNet (W8A8/W4A8)
    steps: int = 0                    # 0: the method's default for the model
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda
    dtype: str = "auto"               # auto (float16 on CUDA, float32 on CPU) | float32 | float16 | bfloat16
    batch_size: int = 1
    num_vectors: int = 1
    learnable_property: str = "object"  # object | style (caption templates)
    captions: str = "auto"            # auto: IMAGES/captions.json if present, else templates | templates | PATH
    flip_p: float = 0.5
    resolution: int = 0               # 0: the model's native resolution
    init_embedding: str = ""          # start from a saved embedding instead of the init word
    checkpoint_every: int = 500
    sample_every: int = 500           # 0: only the final grid
    sample_prompts: list[str] = field(default_factory=lambda: [
        "a photo of a {}", "a {} on a green background", "a {} at the top left"])
    sample_images: int = 2            # per prompt; 0: no sample grids at all (e.g. a run at the edge of memory)
    sample_steps: int = 25            # DDIM steps
    guidance: float = 0.0             # 0: 4.0 on the embedded model, 7.5 otherwise
    export_a1111: bool = False
    threads: int = 0                  # torch CPU threads; 0 leaves torch's default
    low_memory: bool = False          # lower resident peak, slower steps (memory.low_memory_allocator/_objective)
    resume: bool = False
    zoodip: dict = field(default_factory=dict)
    zoodip_fast: dict = field(default_factory=dict)
    ti: dict = field(default_factory=dict)
    gf_ti: dict = field(default_factory=dict)
    dreambooth: dict = field(default_factory=dict)
    lora: dict = field(default_factory=dict)
    qlora: dict = field(default_factory=dict)
    peqa: dict = field(default_factory=dict)
    tuneqdm: dict = field(default_factory=dict)
    tuneqdm_s1: dict = field(default_factory=dict)
    tuneqdm_s2: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- config files
def _closest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def merge_config(base: dict, overrides: dict, where: str) -> dict:
    """Overlay ``overrides`` (from a TOML file or the command line) on ``base``; unknown keys fail."""
    out = dict(base)
    for k, v in overrides.items():
        if k not in base:
            raise ValueError(f"unknown setting {k!r} in {where}{_closest(k, list(base))}")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ValueError(f"{k!r} in {where} must be a table of method settings, got {v!r}")
            out[k] = {**base[k], **v}
        else:
            out[k] = v
    return out


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {str(path)!r} is not valid TOML: {e}") from None


def parse_assignment(text: str) -> dict:
    """'zoodip.lr=0.01' -> {'zoodip': {'lr': 0.01}}; values are TOML literals, else strings."""
    if "=" not in text:
        raise ValueError(f"--set expects KEY=VALUE (e.g. zoodip.n=4), got {text!r}")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    parts = key.split(".")
    if len(parts) > 2 or not all(parts):
        raise ValueError(f"--set key {key!r} must be NAME or SECTION.NAME")
    return {parts[0]: {parts[1]: value}} if len(parts) == 2 else {key: value}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if not (isinstance(v, float) and math.isinf(v)) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def dump_toml(d: dict) -> str:
    """A flat TOML writer for RunConfig (scalars, lists, one level of tables; None is left out)."""
    top = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict) and v is not None]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items() if vv is not None)
              for k, v in d.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


# ----------------------------------------------------------------------------- model loading
def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise ValueError(f"--dtype must be auto, float32, float16 or bfloat16, got {name!r}")
    return table[name]


def check_model(model: str, method: str = "") -> tuple[Path, bool]:
    """(resolved path, is the embedded model); refuses what cannot be trained yet, before loading.
    SDXL folders take the methods of ``models.sdxl.SDXL_METHODS`` (``method`` "" : none)."""
    from .models.load import is_tiny, pipeline_class, resolve_model
    path = resolve_model(model)
    if pipeline_class(path).__name__ != "StableDiffusionPipeline":
        from .models.sdxl import SDXL_METHODS, check_method
        if not method:
            raise ValueError(f"--model {model!r} is an SDXL pipeline: this command supports SD-1.x/2.x models "
                             f"(`quantdream personalize` trains SDXL with {', '.join(SDXL_METHODS)})")
        check_method(method, model)
    return path, is_tiny(path)


def load_components(model: str, device: torch.device, dtype: torch.dtype, defer_unet: bool = False) -> dict:
    """tokenizer, text_encoder, vae, unet from the shared loader, and the DDPM training scheduler.
    ``defer_unet`` (quantized folders only): unet is None and ``load_unet()`` loads it later, so the
    photos can be encoded before it takes its memory; ``unet_config`` is its config meanwhile. The text
    encoder's token table stays as stored (fp16) there: the objective widens its lookups."""
    from diffusers import DDPMScheduler
    from diffusers.configuration_utils import FrozenDict

    from .models.load import load_pipeline, load_quantized_pipeline, resolve_model
    if defer_unet:
        path = resolve_model(model)
        pipe = load_quantized_pipeline(path, str(device), dtype, skip=("unet",), narrow_embeddings=True)
        unet_config = FrozenDict(json.loads((path / "unet" / "config.json").read_text()))
        load_unet = lambda: load_quantized_pipeline(path, str(device), dtype,  # noqa: E731
                                                    skip=("tokenizer", "text_encoder", "tokenizer_2",
                                                          "text_encoder_2", "vae", "scheduler")).unet
    else:
        pipe = load_pipeline(model, device=str(device), dtype=dtype)
        unet_config, load_unet = pipe.unet.config, None
    # training always uses the DDPM forward process, whatever sampler the folder ships
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return dict(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, unet=pipe.unet,
                scheduler=scheduler, unet_config=unet_config, load_unet=load_unet,
                tokenizer_2=getattr(pipe, "tokenizer_2", None), text_encoder_2=getattr(pipe, "text_encoder_2", None))


def folder_weights(path: Path, cfg: RunConfig, mcls) -> tuple[str, int | None]:
    """A quantized folder fixes the UNet's bit width: --weights must be auto or the same, and the
    method must train on it; --acts belongs to `quantdream quantize` (calibration needs the float model).
    Returns (weights, the activation width calibrated when the folder was written)."""
    from .quant.io import read_index
    index = read_index(path)
    layers = index["components"].get("unet", {}).get("layers", {})
    bits = sorted({spec["bits"] for spec in layers.values()})
    have = {(8,): "int8", (4,): "int4"}.get(tuple(bits), "none" if not bits else f"mixed {bits}")
    if cfg.weights not in ("auto", have):
        raise ValueError(f"--weights {cfg.weights}: --model {path} is a quantized folder whose UNet is {have}; "
                         f"pass --weights auto, or the float model to quantize it another way")
    if have not in mcls.weight_choices:
        wants = "a float model" if tuple(mcls.weight_choices) == ("none",) else \
            f"{' or '.join(mcls.weight_choices)} weights"
        raise ValueError(f"--method {cfg.method} trains on {wants}, but --model {path} is a quantized folder "
                         f"({have} UNet): give it the float model")
    if cfg.acts:
        raise ValueError(f"--acts {cfg.acts} with a quantized folder: calibrate when quantizing "
                         f"(`quantdream quantize --weights {have} --acts {cfg.acts}`), the calibration needs the float model")
    return have, index["config"].get("acts")


def quantizer(weights: str):
    """quantdream.quant.quantize_model, imported only when asked for."""
    if weights not in WEIGHTS:
        raise ValueError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if weights == "none":
        return None
    try:
        from .quant import quantize_model
    except ImportError:
        raise ValueError(f"--weights {weights} needs quantdream's quantization engine (quantdream.quant), "
                         f"which is not in this build yet; run with --weights none") from None
    return quantize_model


# ----------------------------------------------------------------------------- memory
class MemoryProbe:
    """Training-phase peak memory: the process high-water mark (VmHWM protocol, quantdream.memory) and,
    on CUDA, the allocator's peak allocated / reserved."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        memory_mod.reset_peak()

    def read(self) -> dict:
        out: dict[str, Any] = dict(memory_mod.peak())
        if self.device.type == "cuda":
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        return out


# ----------------------------------------------------------------------------- previews and plots
@torch.no_grad()
def sample_grid(objective: DenoisingObjective, vae, scheduler_config, theta: torch.Tensor, placeholder: Placeholder,
                prompts: list[str], per_prompt: int, steps: int, guidance: float, seed: int,
                latent_shape: tuple[int, int, int], scaling: float) -> torch.Tensor:
    """DDIM samples with classifier-free guidance, (rows*H, cols*W, 3) uint8; the same seed every time."""
    from diffusers import DDIMScheduler
    sch = DDIMScheduler.from_config(scheduler_config)
    sch.set_timesteps(steps)
    captions = [p.format(placeholder.text) for p in prompts for _ in range(per_prompt)]
    N = len(captions)
    gen = preview_generator(seed)
    z = torch.randn((N, *latent_shape), generator=gen).to(objective.device, objective.dtype)
    cond = objective.encode_text(theta.detach()[None], captions)                  # (N, L, d)
    uncond = objective.unconditional(theta.detach()[None], N)
    both = objective.cat_cond([cond, uncond])
    for t in sch.timesteps:
        eps = objective.denoise(torch.cat([z, z]), t.to(objective.device).expand(2 * N), both)
        e_c, e_u = eps.chunk(2)
        z = sch.step(e_u + guidance * (e_c - e_u), t, z).prev_sample
    x = vae.decode((z / scaling).to(next(vae.parameters()).dtype)).sample.float().clamp(-1, 1).cpu()
    x = ((x + 1) * 127.5).round().to(torch.uint8)                                    # (N, 3, H, W)
    rows = x.view(len(prompts), per_prompt, *x.shape[1:])
    return torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1).permute(1, 2, 0)


def save_png(path: Path, img: torch.Tensor, upscale: int = 1) -> None:
    from PIL import Image
    im = Image.fromarray(img.numpy())
    if upscale > 1:
        im = im.resize((im.width * upscale, im.height * upscale), Image.NEAREST)
    atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


def plot_losses(path: Path, losses: list[float], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.5, alpha=0.4, label="loss")
    w = max(1, min(50, len(losses) // 10))
    if len(losses) >= w > 1:
        t = torch.tensor(losses)
        ma = torch.nn.functional.avg_pool1d(t[None, None], w, stride=1)[0, 0].tolist()
        ax.plot(range(w, len(losses) + 1), ma, lw=1.5, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------- the run
def resolve_weights(cfg: RunConfig, mcls) -> str:
    """--weights auto -> the method's default; refuse a bit width the method does not train on."""
    weights = mcls.default_weights if cfg.weights == "auto" else cfg.weights
    if weights not in mcls.weight_choices:
        raise ValueError(f"--weights {weights} does not apply to --method {cfg.method}; choose "
                         f"{' or '.join(mcls.weight_choices)} (or auto)")
    return weights


def _validate(cfg: RunConfig) -> tuple[dict, str]:
    """Settings that need no model: method, bit width, numbers, the method's own table."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    mcls = method_class(cfg.method)
    for name in ("images", "init_word", "out") + (("token",) if mcls.kind == "token" else ()):
        if not getattr(cfg, name):
            raise ValueError(f"missing --{name.replace('_', '-')} (or `{name} = ...` in the config file)")
    weights = resolve_weights(cfg, mcls)
    quantizer(weights if weights != "nf4" else "int4")
    if cfg.acts and not (2 <= cfg.acts <= 16 and weights in ("int8", "int4")):
        raise ValueError(f"--acts {cfg.acts}: calibrated activations need 2..16 bits and a quantdream-quantized "
                         f"UNet (--weights int8 or int4), got --weights {weights}")
    for name in ("steps", "resolution", "checkpoint_every", "sample_every", "threads"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.sample_images < 0:
        raise ValueError(f"--sample-images must be >= 0 (0: no sample grids), got {cfg.sample_images}")
    for name in ("batch_size", "num_vectors", "sample_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for p in cfg.sample_prompts:
        if "{}" not in p:
            raise ValueError(f"sample prompt {p!r} needs '{{}}' where the token goes")
    return getattr(cfg, section_name(cfg.method)), weights


def _prepare_out(cfg: RunConfig) -> dict | None:
    """Check the output folder; returns the checkpoint to resume from, if any. Creates nothing."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {cfg.out!r} is a file; give a folder")
    ckpt = load_checkpoint(out / CHECKPOINT) if out.is_dir() else None
    if cfg.resume:
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {cfg.out!r} to continue from")
        return ckpt
    if out.is_dir() and any(out.iterdir()):
        hint = " or pass --resume to continue it" if ckpt is not None else ""
        raise ValueError(f"output folder {cfg.out!r} already exists and is not empty; choose a new --out{hint}")
    return None


def _check_resume(ckpt: dict, resolved: dict, method: str) -> None:
    """A resumed run must follow the same trajectory: same data, model, token, seed and method settings."""
    old = dict(ckpt["config"])
    sec = section_name(method)
    if isinstance(old.get(sec), dict) and isinstance(resolved.get(sec), dict):
        # a setting added to the method after the checkpoint was written, at its default, changes nothing
        defaults = dataclasses.asdict(method_class(method).config_class())
        added = {k: v for k, v in resolved[sec].items() if k not in old[sec] and k in defaults and v == defaults[k]}
        old[sec] = {**added, **old[sec]}
    keys = list(TRAJECTORY_KEYS) + [sec, "acts"]
    diff = [k for k in keys if old.get(k) != resolved.get(k)]
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {resolved.get(k)!r}" for k in diff)
        raise ValueError(f"--resume: the checkpoint in {resolved['out']!r} was written with different settings "
                         f"({changes}); use the same settings or a new --out")


def personalize(cfg: RunConfig, progress: bool = False,
                callback: Callable[[dict], None] | None = None) -> RunResult:
    """Learn the token; see the module docstring for the outputs. Returns the (maybe interrupted) result."""
    t_setup = time.perf_counter()
    section, weights = _validate(cfg)
    images_dir = Path(cfg.images)
    paths = list_images(images_dir)
    captions = None
    if cfg.captions not in ("auto", "templates"):
        captions = Path(cfg.captions)
        load_caption_file(captions, [p.name for p in paths])
    elif cfg.captions == "auto" and (images_dir / "captions.json").is_file():
        captions = images_dir / "captions.json"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.low_memory:
        if not memory_mod.low_memory_allocator():
            logger.warning("--low-memory: glibc's mallopt is not available here; freed memory stays in the heap")
        memory_mod.skip_unused_integrations(method_class(cfg.method).integrations)
    from .models.load import pick_device
    device = torch.device(pick_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    model_path, embedded = check_model(cfg.model, cfg.method)
    from .models.load import is_quantized_folder
    quantized_folder = is_quantized_folder(model_path)
    defaults = (EMBEDDED_DEFAULTS if embedded else SD_DEFAULTS)[cfg.method]
    mcls = method_class(cfg.method)
    mconfig = config_from_dict(mcls.config_class, {**defaults["section"], **section}, section_name(cfg.method))
    token = cfg.token or "sks"        # weight methods: DreamBooth's rare identifier
    steps = cfg.steps or defaults["steps"]
    guidance = cfg.guidance or (4.0 if embedded else 7.5)
    ckpt = _prepare_out(cfg)
    init_vectors = None
    if cfg.init_embedding:
        from .export import load_embedding
        init_vectors = load_embedding(cfg.init_embedding)[1]

    acts = cfg.acts or None
    if quantized_folder:
        weights, acts = folder_weights(model_path, cfg, mcls)
    comps = load_components(cfg.model, device, dtype, defer_unet=quantized_folder)
    tokenizer, te, vae, unet, scheduler = (comps[k] for k in ("tokenizer", "text_encoder", "vae", "unet", "scheduler"))
    ucfg = comps["unet_config"]
    from .models import sdxl
    xl = sdxl.is_sdxl(comps)          # SDXL: theta = [clip_l | clip_g], both text encoders (models/sdxl.py)
    tok2, te2 = comps["tokenizer_2"], comps["text_encoder_2"]
    width = sum(sdxl.widths(te, te2)) if xl else te.get_input_embeddings().weight.shape[1]
    if ucfg.cross_attention_dim != width:
        raise ValueError(f"model {cfg.model!r}: text encoder width {width} does not match the UNet's "
                         f"cross-attention width {ucfg.cross_attention_dim}")
    if xl and cfg.acts:
        raise ValueError(f"--acts {cfg.acts} (calibrated activations) is not supported on SDXL models yet")
    if mcls.kind == "token" and xl:
        sdxl.check_sdxl_placeholder(tokenizer, te, tok2, te2, cfg.token, cfg.init_word, cfg.num_vectors,
                                    init_vectors)
    elif mcls.kind == "token":
        check_placeholder(tokenizer, te, cfg.token, cfg.init_word, cfg.num_vectors, init_vectors)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = cfg.resolution or ucfg.sample_size * vae_scale
    if resolution % vae_scale:
        raise ValueError(f"--resolution {resolution} must be a multiple of {vae_scale} for this model's autoencoder")
    def make_data(folder, templates=None) -> SubjectImages:
        d = SubjectImages(folder, resolution, None if templates else captions, cfg.learnable_property, cfg.flip_p)
        if templates or (mcls.kind == "weights" and captions is None):
            d.templates = list(templates or [mcls.instance_prompt])   # DreamBooth: "a photo of sks <class>"
        return d

    data = make_data(images_dir)
    # ---- inputs validated: build the frozen model
    if mcls.kind == "token" and xl:
        placeholder = sdxl.add_sdxl_placeholder(tokenizer, te, tok2, te2, cfg.token, cfg.init_word, cfg.num_vectors,
                                                init_vectors)
    elif mcls.kind == "token":
        placeholder = add_placeholder(tokenizer, te, cfg.token, cfg.init_word, cfg.num_vectors, init_vectors)
    elif xl:
        placeholder = sdxl.identifier_placeholder_sdxl(token, cfg.init_word, sdxl.widths(te, te2))
    else:
        placeholder = identifier_placeholder(token, cfg.init_word, width)
    te.requires_grad_(False).eval()
    if xl:
        te2.requires_grad_(False).eval()
    vae.requires_grad_(False).eval()
    scaling = float(vae.config.scaling_factor)
    if quantized_folder:  # the photos are encoded before the UNet is loaded: their activations never meet it
        data.encode(vae, scaling, device=device, dtype=dtype)
        if cfg.low_memory:   # nor the autoencoder (no method that takes a quantized folder uses it in setup)
            memory_mod.drop_vae_parts(vae, decoder=not cfg.sample_images)
        unet = comps["load_unet"]()
    unet.requires_grad_(False).eval()
    calib = None
    if cfg.acts:  # Q-Diffusion: calibration inputs come from the float model's own sampling runs
        from .quant import collect_unet_inputs
        calib = collect_unet_inputs(unet, te, tokenizer, _ddim(scheduler.config),
                                    [p.format(cfg.init_word) for p in cfg.sample_prompts],
                                    num_inference_steps=25, guidance_scale=guidance, vae_scale_factor=vae_scale,
                                    seed=cfg.seed)
    mcls.prepare_model(te, vae, unet, weights, mconfig)
    if xl:
        sdxl.prepare_text_encoder_2(mcls, te2, weights, mconfig)
    if calib is not None:
        from .quant import calibrate_activations
        calibrate_activations(unet, calib, bits=cfg.acts)
        del calib
    if not quantized_folder:
        data.encode(vae, scaling, device=device, dtype=dtype)
    if xl:
        objective = sdxl.SDXLObjective(tokenizer, te, tok2, te2, unet, scheduler, placeholder, resolution,
                                       device=device, dtype=dtype)
    else:
        objective = DenoisingObjective(tokenizer, te, unet, scheduler, placeholder, device=device, dtype=dtype)
    if cfg.low_memory:
        memory_mod.low_memory_objective(objective)
    method = mcls(objective, placeholder.init_vectors, mconfig)
    streams = Streams.from_seed(cfg.seed, device)
    latent_shape = (unet.config.in_channels, resolution // vae_scale, resolution // vae_scale)
    step, losses, seconds, passes = 0, [], 0.0, 0
    resolved = {**cfg.to_dict(), "steps": steps, "guidance": guidance, "resolution": resolution, "weights": weights,
                "token": cfg.token or (token if mcls.kind == "weights" else ""),
                section_name(cfg.method): dataclasses.asdict(mconfig), "resume": False}
    if ckpt is not None:
        _check_resume(ckpt, resolved, cfg.method)
    setup_seconds = time.perf_counter() - t_setup

    # ---- output folder
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.toml", lambda tmp: Path(tmp).write_text(dump_toml(resolved)))
    logger.info("personalizing %r (init %r) with %s on %s: %d images, %d steps, %s weights, %s/%s",
                placeholder.text, cfg.init_word, cfg.method, cfg.model, len(data), steps, weights, device, dtype)
    t_method_setup = time.perf_counter()
    method.setup(RunContext(out=out, placeholder=placeholder, class_word=cfg.init_word, data=data,
                            make_data=lambda folder, templates: _encoded(make_data(folder, templates), vae, scaling,
                                                                         device, dtype),
                            tokenizer=tokenizer, text_encoder=te, vae=vae, unet=unet,
                            scheduler_config=scheduler.config, guidance=guidance, seed=cfg.seed, embedded=embedded,
                            batch_size=cfg.batch_size, init_vectors_given=init_vectors is not None,
                            steps=steps))
    method_setup_seconds = time.perf_counter() - t_method_setup
    if cfg.low_memory:
        memory_mod.drop_vae_parts(vae, decoder=not cfg.sample_images)
    if ckpt is not None:
        method.load_state_dict(ckpt["method"])
        streams.load_state_dict(ckpt["streams"])
        step, losses, seconds, passes = ckpt["step"], list(ckpt["losses"]), ckpt["seconds"], ckpt["forward_passes"]
    objective.forward_passes = passes

    def grid(at: int) -> None:
        if not cfg.sample_images:
            return
        img = sample_grid(objective, vae, scheduler.config, method.theta, placeholder, cfg.sample_prompts,
                          cfg.sample_images, cfg.sample_steps, guidance, cfg.seed, latent_shape, scaling)
        save_png(out / "samples" / f"step_{at:06d}.png", img, upscale=max(1, 256 // resolution))

    def save_state() -> None:
        save_checkpoint(out / CHECKPOINT, {
            "step": step, "method": method.state_dict(), "streams": streams.state_dict(), "losses": losses,
            "seconds": seconds, "forward_passes": objective.forward_passes, "config": resolved,
            "token": cfg.token, "theta": method.theta.detach().cpu().clone()})

    probe = MemoryProbe(device)
    probe.reset()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=step, desc=f"{cfg.method} {cfg.token}", dynamic_ncols=True, unit="step")
    pending: list[torch.Tensor] = []
    interrupted = False
    t0 = time.perf_counter()
    with graceful_interrupt() as stop:
        while step < steps:
            if stop:
                interrupted = True
                break
            batch = data.sample(cfg.batch_size, streams.data, placeholder.text)
            loss = method.step(batch, streams)
            step += 1
            pending.append(loss.detach())
            if len(pending) >= 20 or step == steps or stop:
                losses.extend(torch.stack(pending).float().cpu().tolist())
                pending.clear()
                if bar is not None:
                    tail = losses[-20:]
                    bar.set_postfix(loss=f"{sum(tail) / len(tail):.4f}", lr=f"{method.lr:.1e}", refresh=False)
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback({"step": step, "steps": steps, "loss": loss, "method": method, "data": data,
                          "placeholder": placeholder})
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < steps:
                seconds_now = seconds + time.perf_counter() - t0
                seconds, t0 = seconds_now, time.perf_counter()
                save_state()
                method.snapshot(out / "snapshots", step, cfg.token)
            if cfg.sample_every and step % cfg.sample_every == 0 and step < steps:
                seconds += time.perf_counter() - t0
                grid(step)
                t0 = time.perf_counter()
        if pending:
            losses.extend(torch.stack(pending).float().cpu().tolist())
        seconds += time.perf_counter() - t0
        memory = probe.read()
        save_state()
    if bar is not None:
        bar.close()
    theta = method.theta.detach().cpu().clone()
    result = RunResult(theta=theta, placeholder=placeholder, step=step, completed=not interrupted, losses=losses)
    objective.close()
    if interrupted:
        logger.info("interrupted at step %d of %d; checkpoint saved in %s (continue with --resume)", step, steps, out)
        return result

    # ---- finished: samples, plots, then the files that mark a complete run
    objective.write_rows(theta)
    grid(step)
    plot_losses(out / "loss.png", losses, f"{cfg.method} {placeholder.text} ({weights})")
    atomic_json(out / "losses.json", losses)
    files = method.export(out, cfg.token, step, cfg.export_a1111)
    tail = losses[-max(1, len(losses) // 10):]
    result.summary = {
        "method": cfg.method, "model": cfg.model, "weights": weights, "acts": acts,
        "weight_bits": WEIGHTS[weights] or (16 if dtype in (torch.float16, torch.bfloat16) else 32),
        "token": placeholder.token, "init_word": cfg.init_word, "num_vectors": cfg.num_vectors,
        "prompt_text": placeholder.text,
        "trainable_parameters": sum(p.numel() for p in method.trainable_parameters()),
        "outputs": [str(f.relative_to(out)) for f in files], "output_bytes": sum(_size(f) for f in files),
        "steps": step, "unet_forward_passes": objective.forward_passes,
        "forward_passes_per_step": objective.forward_passes / max(1, step),
        "seconds": round(seconds, 3), "seconds_per_step": round(seconds / max(1, step), 5),
        "setup_seconds": round(setup_seconds, 3), "method_setup_seconds": round(method_setup_seconds, 3),
        "peak_memory_training": memory, "final_loss": losses[-1] if losses else None,
        "final_loss_mean_last_10pct": sum(tail) / len(tail) if losses else None,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "images": len(data),
        "captions": str(captions) if captions is not None else f"{cfg.learnable_property} templates",
        "resolution": resolution, "seed": cfg.seed, "method_config": dataclasses.asdict(mconfig),
        "method_info": method.summary(),
    }
    atomic_json(out / "run.json", result.summary)
    return result


@dataclass
class RunContext:
    """What ``Method.setup`` may use: the run's folder, data, frozen components and settings."""

    out: Path
    placeholder: Placeholder
    class_word: str
    data: SubjectImages
    make_data: Callable[[Path, list[str]], SubjectImages]   # (folder, caption templates) -> encoded images
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    scheduler_config: Any
    guidance: float
    seed: int
    embedded: bool
    batch_size: int
    init_vectors_given: bool
    steps: int = 0          # the run's total steps (for step-size schedules)


def _encoded(data: SubjectImages, vae, scaling: float, device, dtype) -> SubjectImages:
    data.encode(vae, scaling, device=device, dtype=dtype)
    return data


def _ddim(scheduler_config):
    from diffusers import DDIMScheduler
    return DDIMScheduler.from_config(scheduler_config)


def _size(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_types(values: dict, defaults: dict, where: str) -> dict:
    """Coerce ints to float where a float is expected; refuse any other type change, naming the key."""
    out = dict(values)
    for k, v in values.items():
        ref = defaults.get(k)
        if ref is None or v is None or isinstance(ref, dict):
            continue
        if isinstance(ref, float) and isinstance(v, int) and not isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(ref, (list, tuple)) and isinstance(v, (list, tuple)):
            out[k] = type(ref)(v)
        elif type(v) is not type(ref):
            raise ValueError(f"{where}: {k} = {v!r} should be a {type(ref).__name__} (like {ref!r})")
    return out


def build_config(file: str | None = None, overrides: dict | None = None) -> RunConfig:
    """defaults < TOML file < overrides (the command line); unknown keys fail with the closest name."""
    d = RunConfig().to_dict()
    if file:
        d = merge_config(d, load_toml(file), f"config file {file!r}")
    if overrides:
        d = merge_config(d, overrides, "the command line")
    return RunConfig(**check_types(d, RunConfig().to_dict(), "settings"))
