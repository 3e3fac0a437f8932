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
import shutil
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import memory as memory_mod
from .checkpoint import (atomic_json, atomic_write, check_writable, graceful_interrupt, load_checkpoint,
                         save_checkpoint)
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
# +0.037 world CLIP-I and +0.017 prompt accuracy over [500, 900) (benchmarks/studies/zoodip_study.py; docs/personalization.md).
# And n = 8 directions a step instead of the paper's 2 (9 UNet passes a step, one batch): the estimate's direction
# noise, not the objective, held ZOODiP below TI here (zoodip_study.py --study oracle: n -> infinity at the same steps
# lifts it to TI's level, n = 8 nearly as far; docs/personalization.md "Direction noise").
EMBEDDED_DEFAULTS = {
    "zoodip": {"steps": 1500, "section": {"lr": 1e-2, "t_low": 800, "t_high": 1000, "n": 8}},
    # zoodip-fast: 1/3 of ZOODiP's steps at ZOODiP's rate and PUTS interval with n = 2, i.e. 1/9 of ZOODiP's UNet
    # passes since ZOODiP's n = 8 (benchmarks/personalization.py, budget-vocab16). [800, 1000) beat [500, 900) on
    # 10 subjects: world CLIP-I 0.355 vs 0.333, prompt accuracy 0.617 vs 0.604, and no collapse on salmon_sneaker
    # (benchmarks/studies/zoodip_study.py --study fast)
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
    dry_run: bool = False             # print the time plan (a few warm-up steps) and stop; nothing is written
    max_hours: float = 0.0            # > 0: refuse a run whose planned time exceeds this many hours
    candidate_shards: int = 0         # ZO methods: a step's candidates as this many batches (0: one per process)
    scale_candidates: bool = False    # ZO methods on R processes: n R directions (GF-TI: lambda R) a step
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
                latent_shape: tuple[int, int, int], scaling: float, one_at_a_time: bool = False) -> torch.Tensor:
    """DDIM samples with classifier-free guidance, (rows*H, cols*W, 3) uint8; the same seed every time.
    The frozen (quantized) training UNet draws them. ``one_at_a_time``: each image is denoised and decoded
    on its own (its conditional and unconditional rows together, or one row per UNet call when the
    objective caps it, as the low-memory mode does), and decoded in tiles of ``GRID_DECODE_TILE`` pixels
    (diffusers' tiled VAE decoding), so a grid on a large model adds little to a training step's memory;
    the same noise, and the same images up to float rounding and the tiles' blended seams."""
    captions = [p.format(placeholder.text) for p in prompts for _ in range(per_prompt)]
    N = len(captions)
    gen = preview_generator(seed)
    z = torch.randn((N, *latent_shape), generator=gen).to(objective.device, objective.dtype)
    cond = objective.encode_text(theta.detach()[None], captions)                  # (N, L, d)
    uncond = objective.unconditional(theta.detach()[None], N)
    groups = [slice(i, i + 1) for i in range(N)] if one_at_a_time else [slice(0, N)]
    tile = GRID_DECODE_TILE if one_at_a_time else 0
    x = torch.cat([_denoise_decode(objective, vae, scheduler_config, z[g], cond[g], uncond[g], steps, guidance,
                                   scaling, tile) for g in groups])
    x = ((x + 1) * 127.5).round().to(torch.uint8)                                    # (N, 3, H, W)
    rows = x.view(len(prompts), per_prompt, *x.shape[1:])
    return torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1).permute(1, 2, 0)


def _denoise_decode(objective, vae, scheduler_config, z, cond, uncond, steps: int, guidance: float, scaling: float,
                    tile: int = 0) -> torch.Tensor:
    """DDIM with classifier-free guidance from latents z (n, ...), then decode: (n, 3, H, W) in [-1, 1] on
    the CPU. The objective's UNet call (its row cap; SDXL's extra conditioning); ``tile`` > 0: decode in tiles
    of that many pixels."""
    from diffusers import DDIMScheduler
    sch = DDIMScheduler.from_config(scheduler_config)
    sch.set_timesteps(steps)
    cc = objective.cat_cond([cond, uncond])
    for t in sch.timesteps:
        eps = objective.denoise(torch.cat([z, z]), t.to(z.device).expand(2 * z.shape[0]), cc)
        e_c, e_u = eps.chunk(2)
        z = sch.step(e_u + guidance * (e_c - e_u), t, z).prev_sample
    return _decode(vae, (z / scaling).to(next(vae.parameters()).dtype), tile).float().clamp(-1, 1).cpu()


# SD-1.5 autoencoder, one 512 px image, int8, 1 thread: decoding raises the process peak by 1061 MiB whole and by
# 297 MiB in 128 px tiles (benchmarks/sample_grid_memory.py --mode decode; docs/troubleshooting.md)
GRID_DECODE_TILE = 128


def _decode(vae, z: torch.Tensor, tile: int = 0) -> torch.Tensor:
    """vae.decode, or diffusers' tiled decoding with ``tile``-pixel tiles when the image is larger."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if not tile or z.shape[-1] * factor <= tile or not hasattr(vae, "tile_sample_min_size"):
        return vae.decode(z).sample
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // factor
    try:
        return vae.tiled_decode(z).sample
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size = saved


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
    ax.set_ylabel("denoising MSE")
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
    for name in ("steps", "resolution", "checkpoint_every", "sample_every", "threads", "max_hours"):
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
    check_writable(out, "--out")
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
        changes = ", ".join(_changes(k, old.get(k), resolved.get(k)) for k in diff)
        raise ValueError(f"--resume: the checkpoint in {resolved['out']!r} was written with different settings "
                         f"({changes}); use the same settings or a new --out")


def _changes(key: str, old: Any, new: Any) -> str:
    """'zoodip.lr: 0.01 -> 0.001' for each changed entry of a table; 'seed: 0 -> 1' for a plain setting."""
    if isinstance(old, dict) and isinstance(new, dict):
        def show(d: dict, k: str) -> str:
            return repr(d[k]) if k in d else "unset"
        return ", ".join(f"{key}.{k}: {show(old, k)} -> {show(new, k)}"
                         for k in sorted(set(old) | set(new), key=str) if old.get(k) != new.get(k))
    return f"{key}: {old!r} -> {new!r}"


def personalize(cfg: RunConfig, progress: bool = False,
                callback: Callable[[dict], None] | None = None) -> RunResult:
    """Learn the token; see the module docstring for the outputs. Returns the (maybe interrupted) result.

    The phases, in the module docstring's order of work: :func:`validate_inputs`, :func:`load_frozen_model`,
    :func:`encode_photos`, :func:`build_method`, :func:`plan_run` (the time plan; ``--dry-run`` stops there),
    :func:`create_output_folder`, :func:`training_loop`, :func:`export_outputs`. They share one :class:`Run`,
    which each fills in."""
    from . import distributed
    t_setup = time.perf_counter()
    run = validate_inputs(cfg)
    run.progress = progress
    load_frozen_model(run)
    encode_photos(run)
    build_method(run)
    plan_run(run)
    if cfg.dry_run:
        distributed.close()
        return RunResult(theta=run.method.theta.detach().cpu().clone(), placeholder=run.placeholder, step=run.done,
                         completed=False, summary={"plan": run.plan.to_dict()})
    run.setup_seconds = time.perf_counter() - t_setup
    create_output_folder(run)
    interrupted = training_loop(run, progress, callback)
    distributed.close()
    theta = run.method.theta.detach().cpu().clone()
    result = RunResult(theta=theta, placeholder=run.placeholder, step=run.step, completed=not interrupted,
                       losses=run.losses)
    run.objective.close()
    if interrupted:
        if run.ranks.writer:
            logger.info("interrupted at step %d of %d; checkpoint saved in %s (continue with --resume)",
                        run.step, run.steps, run.out)
        else:
            shutil.rmtree(run.out, ignore_errors=True)
        return result
    export_outputs(run, result)
    return result


@dataclass
class Run:
    """One personalization run's state, filled in phase by phase (see :func:`personalize`)."""

    cfg: RunConfig
    progress: bool = False          # progress bars (photo encoding, training)
    # validate_inputs
    ranks: Any = None               # distributed.Ranks: this process's place among the run's processes
    section: dict = field(default_factory=dict)
    weights: str = "none"
    acts: int | None = None
    images_dir: Path | None = None
    captions: Path | None = None
    device: Any = None
    dtype: Any = None
    model_path: Path | None = None
    embedded: bool = False
    quantized_folder: bool = False
    mcls: Any = None
    mconfig: Any = None
    token: str = ""
    steps: int = 0
    guidance: float = 0.0
    ckpt: dict | None = None
    init_vectors: Any = None
    # load_frozen_model
    comps: dict = field(default_factory=dict)
    tokenizer: Any = None
    te: Any = None
    vae: Any = None
    unet: Any = None
    scheduler: Any = None
    width: int = 0
    vae_scale: int = 1
    resolution: int = 0
    scaling: float = 1.0
    xl: bool = False                # SDXL: two text encoders (models/sdxl.py)
    tokenizer_2: Any = None
    te2: Any = None
    data: SubjectImages | None = None
    placeholder: Placeholder | None = None
    # build_method
    objective: DenoisingObjective | None = None
    method: Any = None
    streams: Streams | None = None
    latent_shape: tuple = ()
    resolved: dict = field(default_factory=dict)
    step: int = 0
    losses: list = field(default_factory=list)
    seconds: float = 0.0
    passes: int = 0
    setup_seconds: float = 0.0
    # plan_run
    plan: Any = None
    done: int = 0                   # steps already done (a resumed run)
    # create_output_folder, training_loop
    out: Path | None = None
    method_setup_seconds: float = 0.0
    memory: dict | None = None

    def make_data(self, folder, templates=None) -> SubjectImages:
        cfg = self.cfg
        d = SubjectImages(folder, self.resolution, None if templates else self.captions, cfg.learnable_property,
                          cfg.flip_p)
        if templates or (self.mcls.kind == "weights" and self.captions is None):
            d.templates = list(templates or [self.mcls.instance_prompt])   # DreamBooth: "a photo of sks <class>"
        return d

    def grid(self, at: int) -> None:
        cfg = self.cfg
        if not cfg.sample_images:
            return
        img = sample_grid(self.objective, self.vae, self.scheduler.config, self.method.theta, self.placeholder,
                          cfg.sample_prompts, cfg.sample_images, cfg.sample_steps, self.guidance, cfg.seed,
                          self.latent_shape, self.scaling, one_at_a_time=not self.embedded)
        save_png(self.out / "samples" / f"step_{at:06d}.png", img, upscale=max(1, 256 // self.resolution))

    def save_state(self) -> None:
        save_checkpoint(self.out / CHECKPOINT, {
            "step": self.step, "method": self.method.state_dict(), "streams": self.streams.state_dict(),
            "losses": self.losses, "seconds": self.seconds, "forward_passes": self.objective.forward_passes,
            "config": self.resolved, "token": self.cfg.token, "theta": self.method.theta.detach().cpu().clone()})


def validate_inputs(cfg: RunConfig) -> Run:
    """Every input checked before anything heavy loads: settings, photos, captions, model, output folder."""
    run = Run(cfg)
    run.section, run.weights = _validate(cfg)
    run.images_dir = Path(cfg.images)
    paths = list_images(run.images_dir)
    if len(paths) == 1:
        logger.warning("warning: only one photo in %s; personalization wants 3-6 photos of the subject (from "
                       "different angles or scenes), with one the token also learns that photo's background "
                       "and pose", run.images_dir)
    if cfg.captions not in ("auto", "templates"):
        run.captions = Path(cfg.captions)
        load_caption_file(run.captions, [p.name for p in paths])
    elif cfg.captions == "auto" and (run.images_dir / "captions.json").is_file():
        run.captions = run.images_dir / "captions.json"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.low_memory:
        if not memory_mod.low_memory_allocator():
            logger.warning("--low-memory: glibc's mallopt is not available here; freed memory stays in the heap")
        memory_mod.skip_unused_integrations(method_class(cfg.method).integrations)
    from . import distributed
    from .models.load import pick_device
    from .precision import check_zo_precision
    run.ranks = distributed.launched()
    run.device = torch.device(pick_device(cfg.device))
    run.dtype = resolve_dtype(cfg.dtype, run.device)
    run.model_path, run.embedded = check_model(cfg.model, cfg.method)
    if run.embedded:
        from .data.world_check import warn_if_not_world
        warn_if_not_world(paths, str(run.images_dir))
    from .models.load import is_quantized_folder
    run.quantized_folder = is_quantized_folder(run.model_path)
    defaults = (EMBEDDED_DEFAULTS if run.embedded else SD_DEFAULTS)[cfg.method]
    run.mcls = method_class(cfg.method)
    run.mconfig = config_from_dict(run.mcls.config_class, {**defaults["section"], **run.section},
                                   section_name(cfg.method))
    run.dtype = check_zo_precision(cfg.method, run.mconfig, run.dtype, explicit=cfg.dtype != "auto")
    distributed.check_method(cfg.method, run.mconfig, run.ranks, cfg.candidate_shards)
    if cfg.scale_candidates:
        run.mconfig = distributed.scaled(cfg.method, run.mconfig, run.ranks)
    run.token = cfg.token or "sks"        # weight methods: DreamBooth's rare identifier
    run.steps = cfg.steps or defaults["steps"]
    run.guidance = cfg.guidance or (4.0 if run.embedded else 7.5)
    run.ckpt = _prepare_out(cfg)
    if run.ranks.distributed:    # after every rank has checked the output folder, before rank 0 writes into it
        run.device = distributed.init(run.ranks, run.device)
        import torch.distributed as dist
        dist.barrier()
    if cfg.init_embedding:
        from .export import load_embedding
        run.init_vectors = load_embedding(cfg.init_embedding)[1]
    run.acts = cfg.acts or None
    return run


def load_frozen_model(run: Run) -> None:
    """Load the model, check it fits the token and the photos, add the token, quantize as the method asks.
    A quantized folder's UNet loads after the photos are encoded: their activations never meet it."""
    cfg, mcls = run.cfg, run.mcls
    if run.quantized_folder:
        run.weights, run.acts = folder_weights(run.model_path, cfg, mcls)
    comps = run.comps = load_components(cfg.model, run.device, run.dtype, defer_unet=run.quantized_folder)
    run.tokenizer, run.te, run.vae, run.unet, run.scheduler = (
        comps[k] for k in ("tokenizer", "text_encoder", "vae", "unet", "scheduler"))
    ucfg = comps["unet_config"]
    from .models import sdxl
    xl = run.xl = sdxl.is_sdxl(comps)   # SDXL: theta = [clip_l | clip_g], both text encoders (models/sdxl.py)
    tok2, te2 = run.tokenizer_2, run.te2 = comps["tokenizer_2"], comps["text_encoder_2"]
    run.width = sum(sdxl.widths(run.te, te2)) if xl else run.te.get_input_embeddings().weight.shape[1]
    if ucfg.cross_attention_dim != run.width:
        raise ValueError(f"model {cfg.model!r}: text encoder width {run.width} does not match the UNet's "
                         f"cross-attention width {ucfg.cross_attention_dim}")
    if xl and cfg.acts:
        raise ValueError(f"--acts {cfg.acts} (calibrated activations) is not supported on SDXL models yet")
    if mcls.kind == "token" and xl:
        sdxl.check_sdxl_placeholder(run.tokenizer, run.te, tok2, te2, cfg.token, cfg.init_word, cfg.num_vectors,
                                    run.init_vectors)
    elif mcls.kind == "token":
        from .models.sdxl import read_sdxl
        if cfg.init_embedding and read_sdxl(cfg.init_embedding) is not None:   # named as generate --embedding names it
            from .export import check_embedding_fits
            check_embedding_fits(cfg.init_embedding, [run.width], "--init-embedding")
        check_placeholder(run.tokenizer, run.te, cfg.token, cfg.init_word, cfg.num_vectors, run.init_vectors)
    run.vae_scale = 2 ** (len(run.vae.config.block_out_channels) - 1)
    run.resolution = cfg.resolution or ucfg.sample_size * run.vae_scale
    if run.resolution % run.vae_scale:
        raise ValueError(f"--resolution {run.resolution} must be a multiple of {run.vae_scale} for this model's "
                         f"autoencoder")
    run.data = run.make_data(run.images_dir)
    # ---- inputs validated: build the frozen model
    if mcls.kind == "token" and xl:
        run.placeholder = sdxl.add_sdxl_placeholder(run.tokenizer, run.te, tok2, te2, cfg.token, cfg.init_word,
                                                    cfg.num_vectors, run.init_vectors)
    elif mcls.kind == "token":
        run.placeholder = add_placeholder(run.tokenizer, run.te, cfg.token, cfg.init_word, cfg.num_vectors,
                                          run.init_vectors)
    elif xl:
        run.placeholder = sdxl.identifier_placeholder_sdxl(run.token, cfg.init_word, sdxl.widths(run.te, te2))
    else:
        run.placeholder = identifier_placeholder(run.token, cfg.init_word, run.width)
    run.te.requires_grad_(False).eval()
    if xl:
        te2.requires_grad_(False).eval()
    run.vae.requires_grad_(False).eval()
    run.scaling = float(run.vae.config.scaling_factor)
    if run.quantized_folder:  # the photos are encoded before the UNet is loaded: their activations never meet it
        run.data.encode(run.vae, run.scaling, device=run.device, dtype=run.dtype, progress=run.progress)
        if cfg.low_memory:   # nor the autoencoder (no method that takes a quantized folder uses it in setup)
            memory_mod.drop_vae_parts(run.vae, decoder=not cfg.sample_images)
        run.unet = comps["load_unet"]()
    run.unet.requires_grad_(False).eval()
    calib = None
    if cfg.acts:  # Q-Diffusion: calibration inputs come from the float model's own sampling runs
        from .quant import collect_unet_inputs
        calib = collect_unet_inputs(run.unet, run.te, run.tokenizer, _ddim(run.scheduler.config),
                                    [p.format(cfg.init_word) for p in cfg.sample_prompts],
                                    num_inference_steps=25, guidance_scale=run.guidance,
                                    vae_scale_factor=run.vae_scale, seed=cfg.seed)
    mcls.prepare_model(run.te, run.vae, run.unet, run.weights, run.mconfig)
    if run.xl:
        from .models import sdxl
        sdxl.prepare_text_encoder_2(mcls, run.te2, run.weights, run.mconfig)
    if calib is not None:
        from .quant import calibrate_activations
        calibrate_activations(run.unet, calib, bits=cfg.acts)
        del calib


def encode_photos(run: Run) -> None:
    """Encode the photos once (a quantized folder's were encoded before its UNet loaded)."""
    if not run.quantized_folder:
        run.data.encode(run.vae, run.scaling, device=run.device, dtype=run.dtype, progress=run.progress)


def build_method(run: Run) -> None:
    """The objective, the method and its random streams; the resolved settings, checked against a resumed run."""
    cfg = run.cfg
    if run.xl:
        from .models import sdxl
        run.objective = sdxl.SDXLObjective(run.tokenizer, run.te, run.tokenizer_2, run.te2, run.unet, run.scheduler,
                                           run.placeholder, run.resolution, device=run.device, dtype=run.dtype)
    else:
        run.objective = DenoisingObjective(run.tokenizer, run.te, run.unet, run.scheduler, run.placeholder,
                                           device=run.device, dtype=run.dtype)
    from . import distributed
    run.objective = distributed.sharded(run.objective, run.ranks, cfg.candidate_shards)  # this rank's candidates
    if cfg.low_memory:
        memory_mod.low_memory_objective(run.objective)
    run.method = run.mcls(run.objective, run.placeholder.init_vectors, run.mconfig)
    run.streams = Streams.from_seed(cfg.seed, run.device)
    run.latent_shape = (run.unet.config.in_channels, run.resolution // run.vae_scale, run.resolution // run.vae_scale)
    run.step, run.losses, run.seconds, run.passes = 0, [], 0.0, 0
    run.resolved = {**cfg.to_dict(), "steps": run.steps, "guidance": run.guidance, "resolution": run.resolution,
                    "weights": run.weights, "token": cfg.token or (run.token if run.mcls.kind == "weights" else ""),
                    section_name(cfg.method): dataclasses.asdict(run.mconfig), "resume": False}
    if run.ckpt is not None:
        _check_resume(run.ckpt, run.resolved, cfg.method)


def plan_run(run: Run) -> None:
    """The time plan: a few warm-up steps (undone: the run's trajectory is unchanged), logged; ``--max-hours``
    refuses a run planned to take longer."""
    from . import distributed, plan as plan_mod
    cfg, ranks = run.cfg, run.ranks
    run.done = run.ckpt["step"] if run.ckpt is not None else 0
    run.plan = plan_mod.measure(run.method, run.objective, run.data, run.streams, run.placeholder, name=cfg.method,
                                steps_left=run.steps - run.done, done=run.done, cfg=cfg, ranks=ranks.world,
                                agree=lambda x: distributed.max_over_ranks(x, ranks, run.device))
    if ranks.writer:
        logger.info("%s", run.plan.text())
    run.plan.check(cfg.max_hours)
    run.objective.bytes_sent = 0                               # the losses all-gathered (distributed runs)


def create_output_folder(run: Run) -> None:
    """Write config.toml, let the method set up (DreamBooth's class images...), restore a checkpoint.
    Rank 0 writes the run's folder; the other ranks write the same files into a scratch folder they drop."""
    if not run.ranks.writer:
        run.cfg = dataclasses.replace(run.cfg, sample_images=0)   # no sample grids off rank 0
    cfg, vae = run.cfg, run.vae
    out = run.out = Path(cfg.out) if run.ranks.writer else Path(tempfile.mkdtemp(prefix="quantdream-rank"))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.toml", lambda tmp: Path(tmp).write_text(dump_toml(run.resolved)))
    logger.info("personalizing %r (init %r) with %s on %s: %d images, %d steps, %s weights, %s/%s",
                run.placeholder.text, cfg.init_word, cfg.method, cfg.model, len(run.data), run.steps, run.weights,
                run.device, run.dtype)
    t_method_setup = time.perf_counter()
    run.method.setup(RunContext(out=out, placeholder=run.placeholder, class_word=cfg.init_word, data=run.data,
                                make_data=lambda folder, templates: _encoded(run.make_data(folder, templates), vae,
                                                                             run.scaling, run.device, run.dtype),
                                tokenizer=run.tokenizer, text_encoder=run.te, vae=vae, unet=run.unet,
                                scheduler_config=run.scheduler.config, guidance=run.guidance, seed=cfg.seed,
                                embedded=run.embedded, batch_size=cfg.batch_size,
                                init_vectors_given=run.init_vectors is not None, steps=run.steps))
    run.method_setup_seconds = time.perf_counter() - t_method_setup
    if cfg.low_memory:
        memory_mod.drop_vae_parts(vae, decoder=not cfg.sample_images)
    if run.ckpt is not None:
        ckpt = run.ckpt
        run.method.load_state_dict(ckpt["method"])
        run.streams.load_state_dict(ckpt["streams"])
        run.step, run.losses, run.seconds, run.passes = (ckpt["step"], list(ckpt["losses"]), ckpt["seconds"],
                                                         ckpt["forward_passes"])
    run.objective.forward_passes = run.passes


# tqdm's line without its own remaining-time guess: the ETA in the postfix is the time plan's (quantdream serve
# reads this line: server/jobs.py PROGRESS)
PROGRESS_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def training_loop(run: Run, progress: bool, callback: Callable[[dict], None] | None) -> bool:
    """Sample a batch, ``method.step``, log, checkpoint, sample grids; Ctrl-C saves and stops.
    Returns True when interrupted."""
    cfg, method, data, placeholder, steps = run.cfg, run.method, run.data, run.placeholder, run.steps
    probe = MemoryProbe(run.device)
    probe.reset()
    from . import distributed, plan as plan_mod
    ranks = run.ranks
    bar = None
    if progress and ranks.writer:   # its ETA: the plan's model with the s/step of the steps run so far
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=run.step, desc=f"{cfg.method} {cfg.token}", dynamic_ncols=True, unit="step",
                   bar_format=PROGRESS_FORMAT)
    pending: list[torch.Tensor] = []
    interrupted = False
    seconds_start = run.seconds
    t0 = time.perf_counter()
    with graceful_interrupt() as stop:
        while run.step < steps:
            if distributed.any_rank(bool(stop), ranks, run.device):   # every rank stops at the same step
                interrupted = True
                break
            batch = data.sample(cfg.batch_size, run.streams.data, placeholder.text)
            loss = method.step(batch, run.streams)
            run.step += 1
            step = run.step
            pending.append(loss.detach())
            if len(pending) >= 20 or step == steps or stop:
                run.losses.extend(torch.stack(pending).float().cpu().tolist())
                pending.clear()
                if bar is not None:
                    tail = run.losses[-20:]
                    sps = (time.perf_counter() - t0 + run.seconds - seconds_start) / max(1, step - run.done)
                    bar.set_postfix(loss=f"{sum(tail) / len(tail):.4f}", lr=f"{method.lr:.1e}",
                                    eta=plan_mod.duration(run.plan.eta(step - run.done, sps)), refresh=False)
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback({"step": step, "steps": steps, "loss": loss, "method": method, "data": data,
                          "placeholder": placeholder})
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < steps:
                if pending:  # the checkpoint holds every loss so far (a run killed after it resumes with them)
                    run.losses.extend(torch.stack(pending).float().cpu().tolist())
                    pending.clear()
                seconds_now = run.seconds + time.perf_counter() - t0
                run.seconds, t0 = seconds_now, time.perf_counter()
                run.save_state()
                method.snapshot(run.out / "snapshots", step, cfg.token)
            if cfg.sample_every and step % cfg.sample_every == 0 and step < steps:
                run.seconds += time.perf_counter() - t0
                run.grid(step)
                t0 = time.perf_counter()
        if pending:
            run.losses.extend(torch.stack(pending).float().cpu().tolist())
        run.seconds += time.perf_counter() - t0
        run.memory = probe.read()
        run.save_state()
    if bar is not None:
        bar.close()
    return interrupted


def export_outputs(run: Run, result: RunResult) -> None:
    """Finished: samples, plots, then the files that mark a complete run (the method's output, run.json)."""
    from . import distributed
    cfg, out, losses, step = run.cfg, run.out, run.losses, run.step
    run.objective.write_rows(result.theta)
    run.grid(step)
    plot_losses(out / "loss.png", losses, f"{cfg.method} {run.placeholder.text} ({run.weights})")
    atomic_json(out / "losses.json", losses)
    files = run.method.export(out, cfg.token, step, cfg.export_a1111)
    tail = losses[-max(1, len(losses) // 10):]
    seconds, objective, method, dtype = run.seconds, run.objective, run.method, run.dtype
    result.summary = {
        "method": cfg.method, "model": cfg.model, "weights": run.weights, "acts": run.acts,
        "weight_bits": WEIGHTS[run.weights] or (16 if dtype in (torch.float16, torch.bfloat16) else 32),
        "token": run.placeholder.token, "init_word": cfg.init_word, "num_vectors": cfg.num_vectors,
        "prompt_text": run.placeholder.text,
        "trainable_parameters": sum(p.numel() for p in method.trainable_parameters()),
        "outputs": [str(f.relative_to(out)) for f in files], "output_bytes": sum(_size(f) for f in files),
        "steps": step, "unet_forward_passes": objective.forward_passes,
        "forward_passes_per_step": objective.forward_passes / max(1, step),
        "seconds": round(seconds, 3), "seconds_per_step": round(seconds / max(1, step), 5),
        "setup_seconds": round(run.setup_seconds, 3), "method_setup_seconds": round(run.method_setup_seconds, 3),
        "peak_memory_training": run.memory, "final_loss": losses[-1] if losses else None,
        "final_loss_mean_last_10pct": sum(tail) / len(tail) if losses else None,
        "device": str(run.device), "dtype": str(dtype).replace("torch.", ""), "images": len(run.data),
        "captions": str(run.captions) if run.captions is not None else f"{cfg.learnable_property} templates",
        "resolution": run.resolution, "seed": cfg.seed, "method_config": dataclasses.asdict(run.mconfig),
        "method_info": method.summary(), "plan": run.plan.to_dict(), "processes": run.ranks.world,
        "bytes_per_step": (objective.bytes_sent / max(1, step - run.done) + distributed.FLAG_BYTES
                           if run.ranks.distributed else 0),
    }
    atomic_json(out / "run.json", result.summary)
    if not run.ranks.writer:
        shutil.rmtree(out, ignore_errors=True)


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
