"""Training memory of personalization methods, each in a fresh subprocess (ecosystem.md, "Measuring
memory honestly"; style.md habit 10).

    quantdream bench memory --arch sd15 --methods zoodip,ti,peqa,dreambooth --resolution 512 --steps 3 --out bench/

One configuration = one ``python -m quantdream.bench.run_one --spec JSON --result FILE`` process that

1. builds the architecture with random weights (``--arch tiny``: the embedded model's classes;
   ``sd15``/``sd21``: ``models.arch``) and prepares it with the method's own ``prepare_model`` (int8 UNet,
   VAE and text encoder for ZOODiP; int8 per-channel UNet for PEQA / TuneQDM; NF4 Linear + int4 Conv2d
   for QLoRA; nothing for DreamBooth, LoRA and TI), layer by layer: the model is built on the meta
   device and each Linear/Conv2d gets its random float weight right before ``prepare_model`` swaps it,
   so a quantized model never exists as a whole float model in the process;
2. encodes a couple of random reference images with the real data code (``SubjectImages``) and builds the
   method as ``train.personalize`` does (objective -> method with its paper defaults -> ``setup(RunContext)``);
3. ``memory.reset_peak()`` (gc + ``malloc_trim(0)`` + ``clear_refs``), runs ``steps`` real training
   steps (``method.step``), then ``memory.peak()``: the training-phase VmHWM with RssAnon / RssFile apart,
   and on CUDA the allocator's max allocated / reserved;
4. writes the learned output with the method's ``export`` and reports its size on disk (token methods:
   learned_embeds.safetensors; dreambooth: unet/; lora, qlora: pytorch_lora_weights.safetensors; peqa,
   tuneqdm*: scales.safetensors; weight methods also write adapter.json).

Whole-process peak = max(VmHWM of setup, VmHWM of training): everything the process ever held,
Python, torch and the model included. Every method of ``quantdream.methods`` is measurable; a method on
an architecture the scaffold cannot train (SDXL outside models.sdxl.SDXL_METHODS) gets a "not implemented" row,
not a crash. Other
trainers plug in with :func:`register_bench_method`.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Protocol

from ..methods import METHODS  # names only: the method modules (and torch) load in the measuring process

logger = logging.getLogger(__name__)

ARCHS = ("tiny", "sd15", "sd21", "sdxl")
NATIVE_RESOLUTION = {"tiny": 64, "sd15": 512, "sd21": 768, "sdxl": 1024}
KNOWN_METHODS = METHODS                  # every method of the two papers (quantdream.methods)
WEIGHTS = ("int8", "int4", "none", "nf4")  # nf4: qlora's bitsandbytes Linear4bit base
# Settings the bench pins on top of each method's paper defaults (everything else: the method's config class).
BENCH_SETTINGS = {
    "dreambooth": {"prior_preservation": False},   # ZOODiP Table 1's DreamBooth row; no class images generated
}


@dataclass(frozen=True)
class BenchSpec:
    """One measured configuration (everything the subprocess needs, JSON-serializable)."""

    arch: str = "tiny"            # tiny | sd15 | sd21 | sdxl
    method: str = "zoodip"
    resolution: int = 0           # 0: the architecture's native resolution
    steps: int = 3                # training steps measured (after setup)
    weights: str = ""             # "": as the method runs (BenchMethod.default_weights); int8 | int4 | none | nf4
    images: int = 2               # random reference images
    batch_size: int = 1
    seed: int = 0
    threads: int = 0              # torch CPU threads; 0: torch's default
    device: str = "auto"          # auto | cpu | cuda
    dtype: str = "auto"           # auto: float16 on CUDA, float32 on CPU
    low_memory: bool = False      # personalize's --low-memory (memory.low_memory_allocator / _objective)
    model_dir: str = ""           # a quantized folder to load as `personalize --model DIR` does (bench_memory
                                  # writes one for int8/int4 runs); "": build the model layer by layer

    def resolved_resolution(self) -> int:
        return self.resolution or NATIVE_RESOLUTION[self.arch]


class Trainer(Protocol):
    """What a method's bench setup hands back."""

    def step(self) -> Any: ...                          # one real training step
    def forward_passes(self) -> int: ...                # UNet forward passes of one sample so far
    def save(self, folder: Path) -> list[Path]: ...     # the learned output, as a run writes it (files or folders)


@dataclass(frozen=True)
class BenchMethod:
    """How ``bench memory`` runs one method. ``setup(components, data, spec)`` builds a Trainer on
    already built (and prepared) components; ``default_weights`` is how the method runs in its paper;
    ``prepare(text_encoder, vae, unet, weights)`` quantizes / wraps the frozen model in place, layer by
    layer (see :func:`prepare_layer_by_layer`); None: ``Method.prepare_model`` (ZOODiP's setting)."""

    name: str
    default_weights: str
    setup: Callable[[dict, Any, BenchSpec], Trainer]
    archs: tuple[str, ...] = ("tiny", "sd15", "sd21")  # "sdxl" too for the methods of models.sdxl.SDXL_METHODS
    prepare: Callable[[Any, Any, Any, str], None] | None = None


BENCH_METHODS: dict[str, BenchMethod] = {}


def register_bench_method(method: BenchMethod) -> None:
    """Add (or replace) a method in ``bench memory``; it takes precedence over quantdream.methods' own."""
    BENCH_METHODS[method.name] = method


# ----------------------------------------------------------------------------- quantdream.methods
def bench_config(name: str):
    """The method's config: its paper defaults (config class) plus :data:`BENCH_SETTINGS`."""
    from ..methods import method_class, section_name
    from ..methods.base import config_from_dict
    cls = method_class(name)
    return config_from_dict(cls.config_class, BENCH_SETTINGS.get(name, {}), section_name(name))


class _MethodTrainer:
    """A quantdream.methods method (token or weight), built and stepped as ``train.personalize`` does:
    placeholder (a new token, or the identifier prompt "sks bag" for weight methods) -> DenoisingObjective
    -> ``cls(objective, theta0, config)`` -> ``setup(RunContext)`` -> ``step(batch, streams)``; ``save``
    is the method's ``export``. The frozen model arrives prepared by the method's ``prepare_model``."""

    token, identifier, init_word = "<bench-token>", "sks", "bag"

    def __init__(self, comps: dict, data, spec: BenchSpec) -> None:
        from ..methods import method_class
        from ..methods.base import DenoisingObjective, Streams, add_placeholder, identifier_placeholder
        from ..train import RunContext
        from ..models import sdxl
        cls = method_class(spec.method)
        tok, te = comps["tokenizer"], comps["text_encoder"]
        tok2, te2 = comps.get("tokenizer_2"), comps.get("text_encoder_2")
        xl = te2 is not None          # SDXL: the token in both text encoders (models/sdxl.py), as train.py
        if cls.kind == "token" and xl:
            self.placeholder = sdxl.add_sdxl_placeholder(tok, te, tok2, te2, self.token, self.init_word, 1)
        elif cls.kind == "token":
            self.placeholder = add_placeholder(tok, te, self.token, self.init_word, 1)
        else:  # DreamBooth's prompt: "a photo of sks bag"; nothing is added to the tokenizer
            self.placeholder = sdxl.identifier_placeholder_sdxl(self.identifier, self.init_word, sdxl.widths(te, te2)) \
                if xl else identifier_placeholder(self.identifier, self.init_word,
                                                  te.get_input_embeddings().weight.shape[1])
            data.templates = [cls.instance_prompt]
        self.comps, self.resolution = comps, spec.resolved_resolution()
        if xl:
            self.objective = sdxl.SDXLObjective(tok, te, tok2, te2, comps["unet"], comps["scheduler"],
                                                self.placeholder, self.resolution, device=comps["device"],
                                                dtype=comps["dtype"])
        else:
            self.objective = DenoisingObjective(tok, te, comps["unet"], comps["scheduler"], self.placeholder,
                                                device=comps["device"], dtype=comps["dtype"])
        self.method = cls(self.objective, self.placeholder.init_vectors, bench_config(spec.method))
        self.streams = Streams.from_seed(spec.seed, comps["device"])
        self.data, self.batch_size, self.steps = data, spec.batch_size, 0
        ctx = dict(out=Path(comps["workdir"]) / "run", placeholder=self.placeholder, class_word=self.init_word,
                   data=data, make_data=self._make_data, tokenizer=tok, text_encoder=te, vae=comps["vae"],
                   unet=comps["unet"], scheduler_config=comps["scheduler"].config,
                   guidance=4.0 if spec.arch == "tiny" else 7.5, seed=spec.seed, embedded=spec.arch == "tiny",
                   batch_size=spec.batch_size, init_vectors_given=False, steps=spec.steps)
        fields = {f.name for f in dataclasses.fields(RunContext)}  # steps: newer scaffolds
        self.method.setup(RunContext(**{k: v for k, v in ctx.items() if k in fields}))
        self.objective.forward_passes = 0      # as train.py: passes are counted from the first step

    def _make_data(self, folder: Path, templates: list[str]):
        """RunContext.make_data: images encoded with the run's VAE (DreamBooth's class images; unused
        while prior preservation is off)."""
        from ..data.dataset import SubjectImages
        c = self.comps
        d = SubjectImages(folder, self.resolution)
        d.templates = list(templates)
        d.encode(c["vae"], float(c["vae"].config.scaling_factor), device=c["device"], dtype=c["dtype"])
        return d

    def step(self):
        batch = self.data.sample(self.batch_size, self.streams.data, self.placeholder.text)
        self.steps += 1
        return self.method.step(batch, self.streams)

    def forward_passes(self) -> int:
        return self.objective.forward_passes

    def save(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        return self.method.export(folder, self.placeholder.token, self.steps, False)

    def info(self) -> dict:
        """Extra row fields: trainable tensor size and the method's run.json facts (e.g. QLoRA's backend)."""
        n = sum(p.numel() for p in self.method.trainable_parameters())
        return {"trainable_parameters": n,
                "method_info": json.loads(json.dumps(self.method.summary(), default=str))}


@lru_cache(maxsize=None)
def method_bench(name: str) -> BenchMethod:
    """The BenchMethod of a quantdream.methods method: its default weights and its own prepare_model."""
    from ..methods import method_class
    cls, config = method_class(name), bench_config(name)

    def prepare(text_encoder, vae, unet, weights: str) -> None:
        cls.prepare_model(text_encoder, vae, unet, weights, config)

    from ..models.sdxl import SDXL_METHODS
    archs = ("tiny", "sd15", "sd21") + (("sdxl",) if name in SDXL_METHODS else ())
    return BenchMethod(name, cls.default_weights, _MethodTrainer, archs=archs, prepare=prepare)


def _implemented(name: str) -> BenchMethod | None:
    """A registered BenchMethod, else the one of quantdream.methods; None for an unknown name."""
    if name in BENCH_METHODS:
        return BENCH_METHODS[name]
    return method_bench(name) if name in METHODS else None


# ----------------------------------------------------------------------------- building the model
def _init_param_(mod, name: str, t, generator) -> None:
    """The random init of ``models.arch``: weights N(0, 1/fan_in), embeddings N(0, 0.02^2), 1-D ones, biases 0."""
    from torch import nn
    if isinstance(mod, nn.Embedding):
        t.normal_(0.0, 0.02, generator=generator)
    elif name == "bias":
        t.zero_()
    elif t.dim() == 1:
        t.fill_(1.0)
    else:
        t.normal_(0.0, 1.0 / math.sqrt(max(1, math.prod(t.shape[1:]))), generator=generator)


def _materialize_(model, generator, device="cpu", dtype=None) -> None:
    """Replace every parameter still on the meta device with a random one (drawn on the CPU, then moved
    to ``device`` / ``dtype``), one at a time."""
    import torch
    from torch import nn
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                t = torch.empty(p.shape, dtype=p.dtype)
                _init_param_(mod, name, t, generator)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                mod._parameters[name] = nn.Parameter(t.to(device), requires_grad=p.requires_grad)


def _holder(name: str, layer):
    """An empty module tree in which ``layer`` sits at its qualified ``name`` (e.g. "mid_block.attentions.0.
    proj_in"), so a prepare_model that looks at names or types sees the layer as in the whole model."""
    from torch import nn
    root = cur = nn.Module()
    *path, attr = name.split(".")
    for part in path:
        cur.add_module(part, nn.Module())
        cur = getattr(cur, part)
    cur.add_module(attr, layer)
    return root


def prepare_layer_by_layer(model, prepare: Callable[[Any], None], seed: int = 0, device="cpu", dtype=None):
    """Materialize a model built on the meta device with random weights, one Linear/Conv2d at a time:
    each layer gets its float weight (``models.arch``'s init) and goes at once, alone in a holder that
    keeps its qualified name, through ``prepare`` (a method's ``prepare_model`` for this component), which
    swaps it for its quantized twin and frees the float weight. Peak: the prepared model plus one float
    layer. Every ``prepare_model`` of quantdream.methods only swaps layers one by one (``quantize_model``,
    ``lora.to_nf4``), so this builds the same model as ``prepare`` on the whole float model would (checked
    on the embedded model in tests/test_bench_memory.py). Other parameters (norms, embeddings) follow."""
    import torch
    from torch import nn

    from ..memory import malloc_trim
    gen = torch.Generator().manual_seed(seed)
    model.requires_grad_(False).eval()                         # as train.py, before prepare_model
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]  # names only:
    for name in names:                                                                         # holding the
        parent_name, _, attr = name.rpartition(".")                                            # modules would
        parent = model.get_submodule(parent_name) if parent_name else model                   # keep every
        layer = getattr(parent, attr).to_empty(device="cpu")                                   # float weight
        for pname, p in layer.named_parameters(recurse=False):
            with torch.no_grad():
                _init_param_(layer, pname, p.data, gen)
        holder = _holder(name, layer.to(device=device, dtype=dtype))
        del layer
        prepare(holder)                                        # the float weight is freed here when quantized
        setattr(parent, attr, holder.get_submodule(name))
        for k, v in vars(holder).items():                      # what prepare_model records on the model
            if k.startswith("_quantdream_"):                   # (QLoRA: the Linear backend)
                setattr(model, k, v)
        del holder
        malloc_trim()  # glibc would otherwise keep the freed float layers and the peak would count them
    _materialize_(model, gen, device, dtype)
    if torch.device(device).type != "cpu":
        model.to(device)                                       # buffers (e.g. CLIP's position ids)
    return model


def _default_prepare(text_encoder, vae, unet, weights: str) -> None:
    from ..methods.base import Method
    Method.prepare_model(text_encoder, vae, unet, weights, None)


def _component_prepare(prepare: Callable[[Any, Any, Any, str], None], component: str, weights: str):
    """prepare(text_encoder, vae, unet, weights) applied to ``component`` only (empty stand-ins elsewhere)."""
    from torch import nn

    def run(module) -> None:
        parts = {c: module if c == component else nn.Module() for c in ("text_encoder", "vae", "unet")}
        prepare(parts["text_encoder"], parts["vae"], parts["unet"], weights)
    return run


def build_components(spec: BenchSpec, weights: str, device, dtype,
                     prepare: Callable[[Any, Any, Any, str], None] | None = None,
                     before_unet: Callable[[dict], None] | None = None) -> dict:
    """tokenizer, text_encoder, vae, unet, scheduler with random weights, prepared as train.py does with
    ``prepare`` (a method's ``prepare_model``; default ``Method.prepare_model``: UNet at ``weights``, VAE
    and text encoder int8 whenever the UNet is quantized, ZOODiP's setting), but layer by layer from the
    meta device (:func:`prepare_layer_by_layer`). Components are built in ``dtype`` on ``device`` first,
    then prepared, as ``load_components`` + ``prepare_model`` in train.py. ``before_unet(comps)`` runs
    once the text encoder and VAE exist and the UNet does not yet (train.py's order for a quantized
    folder: the photos are encoded first)."""
    from accelerate import init_empty_weights
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from ..models import embedded
    from ..models.arch import build
    prepare = prepare or _default_prepare
    if spec.arch == "tiny":
        with init_empty_weights(include_buffers=False):     # the embedded model's classes, parameters on meta
            comps = embedded.build_components()
    else:
        texts = ("text_encoder", "text_encoder_2") if spec.arch == "sdxl" else ("text_encoder",)
        comps = {c: build(spec.arch, c, init="meta") for c in ("unet", "vae") + texts}
        # token ids only matter as indices into a random table: the embedded model's CLIP-format
        # tokenizer, padded to the architecture's context length (77)
        n_ctx = comps["text_encoder"].config.max_position_embeddings
        for t in texts:
            comps[t.replace("text_encoder", "tokenizer")] = CLIPTokenizer.from_pretrained(
                str(embedded.TOKENIZER_DIR), model_max_length=n_ctx)
        comps["scheduler"] = DDPMScheduler(**embedded.SCHEDULER_CONFIG)
    comps["device"], comps["dtype"] = device, dtype
    order = ((1, "vae"), (2, "text_encoder")) + (((3, "text_encoder_2"),) if "text_encoder_2" in comps else ())
    for i, m in order + ((0, "unet"),):   # seeds as before: unet 0, vae 1, te 2 (SDXL's second encoder 3)
        if m == "unet" and before_unet is not None:
            before_unet(comps)
        part = "text_encoder" if m == "text_encoder_2" else m     # prepared as the first text encoder
        comps[m] = prepare_layer_by_layer(comps[m], _component_prepare(prepare, part, weights), spec.seed + i,
                                          device, dtype)
    return comps


def _narrow_embeddings(text_encoder, dtype) -> None:
    """What ``load_quantized(narrow_embeddings=True)`` does with a folder's fp16 embedding tables."""
    import torch
    from torch import nn

    from ..memory import malloc_trim
    from ..quant.io import widen_lookups
    if dtype.itemsize <= 2:
        return
    for m in text_encoder.modules():
        if isinstance(m, nn.Embedding):
            m.weight.data = m.weight.data.to(torch.float16)
            widen_lookups(m, dtype)
    malloc_trim()


def _random_images(folder: Path, n: int, resolution: int, seed: int) -> Path:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def _git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- the measurement
def _base_row(spec: BenchSpec, weights: str) -> dict:
    return {"method": spec.method, "arch": spec.arch, "weights": weights, "resolution": spec.resolved_resolution(),
            "steps": spec.steps, "images": spec.images, "batch_size": spec.batch_size, "threads": spec.threads,
            "low_memory": spec.low_memory,
            "model": "quantized folder, loaded as --model DIR" if spec.model_dir else "built layer by layer"}


def check_spec(spec: BenchSpec) -> None:
    """Refuse settings that cannot be measured, in the user's words (before any subprocess starts)."""
    if spec.arch not in ARCHS:
        raise ValueError(f"--arch {spec.arch!r} is not one of {', '.join(ARCHS)}")
    if spec.weights and spec.weights not in WEIGHTS:
        raise ValueError(f"--weights {spec.weights!r} is not one of {', '.join(WEIGHTS)} (or leave it out: "
                         f"each method's own setting)")
    for name in ("steps", "images", "batch_size"):
        if getattr(spec, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(spec, name)}")
    if spec.resolution < 0 or spec.threads < 0:
        raise ValueError(f"--resolution and --threads must be >= 0, got {spec.resolution} and {spec.threads}")
    if spec.arch != "tiny" and spec.resolved_resolution() % 8:
        raise ValueError(f"--resolution {spec.resolution} must be a multiple of 8 for {spec.arch}'s autoencoder")
    if spec.arch == "tiny" and spec.resolved_resolution() % 4:
        raise ValueError(f"--resolution {spec.resolution} must be a multiple of 4 for the embedded model's autoencoder")
    if _implemented(spec.method) is None:
        close = difflib.get_close_matches(spec.method, METHODS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {spec.method!r}{hint} (methods: {', '.join(METHODS)})")
    if spec.weights and spec.method in METHODS:           # the method's own refusal (train.resolve_weights)
        from types import SimpleNamespace

        from ..methods import method_class
        from ..train import resolve_weights
        resolve_weights(SimpleNamespace(method=spec.method, weights=spec.weights), method_class(spec.method))


def measure_in_process(spec: BenchSpec) -> dict:
    """Run one configuration in THIS process and return its row (call it in a fresh process)."""
    import torch

    from .. import memory
    from ..train import resolve_dtype
    t_start = time.perf_counter()
    check_spec(spec)
    bm = _implemented(spec.method)
    weights = spec.weights or bm.default_weights
    row = _base_row(spec, weights)
    if spec.arch not in bm.archs:
        return {**row, "status": "not implemented",
                "note": f"{spec.method} on {spec.arch} is not supported yet "
                        f"({spec.method} runs on {', '.join(bm.archs)})"}
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.low_memory:
        if not memory.low_memory_allocator():
            return {**row, "status": "failed", "note": "--low-memory needs glibc's mallopt (not available here)"}
        from ..methods import METHODS, method_class
        memory.skip_unused_integrations(method_class(spec.method).integrations if spec.method in METHODS
                                        else memory.OPTIONAL_INTEGRATIONS)
    if weights == "nf4":  # train.py would fall back to float Linear layers: not the configuration asked for
        from ..methods.lora import BNB_HINT, bnb_linear4bit_works
        why = bnb_linear4bit_works()
        if why is not None:
            return {**row, "status": "failed", "note": f"bitsandbytes NF4 Linear4bit does not run here ({why}); "
                                                       f"{BNB_HINT}"}
    from ..models.load import pick_device       # imports diffusers: only after the integrations are hidden
    device = torch.device(pick_device(spec.device))
    dtype = resolve_dtype(spec.dtype, device)
    res = spec.resolved_resolution()
    from ..data.dataset import SubjectImages
    with tempfile.TemporaryDirectory(prefix="qd-bench-") as tmp:
        # ---- setup: model (prepared as the method runs), data encoded once, the method
        data = SubjectImages(_random_images(Path(tmp) / "images", spec.images, res, spec.seed), res)

        def encode(c: dict) -> None:
            data.encode(c["vae"], float(c["vae"].config.scaling_factor), device=device, dtype=dtype)
        # quantized weights come from a quantized folder, where train.py encodes the photos before the UNet
        # loads; a float model arrives whole and encodes after
        early = weights != "none"

        def before_unet(c: dict) -> None:   # as train.py with a quantized folder: fp16 token table, photos first
            for t in ("text_encoder", "text_encoder_2"):
                if c.get(t) is not None:
                    _narrow_embeddings(c[t], dtype)
            encode(c)
        if spec.model_dir:      # train.py's path for --model QUANTIZED_DIR: no float layer is ever built
            from ..train import load_components
            comps = load_components(spec.model_dir, device, dtype, defer_unet=True)
            comps["device"], comps["dtype"] = device, dtype
            for m in ("text_encoder", "text_encoder_2", "vae"):
                if comps.get(m) is not None:
                    comps[m].requires_grad_(False).eval()
            encode(comps)
            if spec.low_memory:   # as train.py: the autoencoder is freed before the UNet loads
                memory.drop_vae_parts(comps["vae"], decoder=True)
            comps["unet"] = comps.pop("load_unet")().requires_grad_(False).eval()
            (bm.prepare or _default_prepare)(comps["text_encoder"], comps["vae"], comps["unet"], weights)
            if comps.get("text_encoder_2") is not None:   # as train.py (models.sdxl.prepare_text_encoder_2)
                from torch import nn
                (bm.prepare or _default_prepare)(comps["text_encoder_2"], nn.Module(), nn.Module(), weights)
        else:
            comps = build_components(spec, weights, device, dtype, bm.prepare, before_unet if early else None)
        comps["workdir"] = Path(tmp)
        if not early:
            encode(comps)
        trainer = bm.setup(comps, data, spec)
        if spec.low_memory:
            if getattr(trainer, "objective", None) is not None:
                memory.low_memory_objective(trainer.objective)
            memory.drop_vae_parts(comps["vae"], decoder=True)     # the bench draws no sample grids
        setup_seconds = time.perf_counter() - t_start
        setup_status = memory.proc_status()
        # ---- training phase
        memory.reset_peak()
        start_status = memory.proc_status()
        times = []
        for _ in range(spec.steps):
            t = time.perf_counter()
            loss = trainer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
        train_peak = memory.peak()
        files = trainer.save(Path(tmp) / "out")
        storage = sum(_disk_bytes(f) for f in files)
        passes = trainer.forward_passes()
        info = trainer.info() if hasattr(trainer, "info") else {}
        final_loss = float(loss) if isinstance(loss, torch.Tensor) else loss
    timed = times[1:] if len(times) > 1 else times          # the first step warms caches up
    whole = max(setup_status.get("vmhwm_mib", 0.0), train_peak.get("vmhwm_mib", 0.0))
    return {**row, "status": "ok", "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "training_peak": train_peak, "training_start_rss_mib": start_status.get("vmrss_mib"),
            "setup_peak_mib": setup_status.get("vmhwm_mib"), "whole_process_peak_mib": whole,
            "storage_bytes": storage, "storage_files": [Path(f).name for f in files],
            "seconds_per_step": sum(timed) / len(timed), "step_seconds": times,
            "unet_forward_passes_per_step": passes / spec.steps, "setup_seconds": setup_seconds,
            "final_loss": final_loss, **info, "torch": torch.__version__, "git": _git_revision()}


def _disk_bytes(path) -> int:
    """Size on disk of a file, or of every file under a folder (DreamBooth's unet/)."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_in_subprocess(spec: BenchSpec, timeout: float | None = None, env: dict | None = None) -> dict:
    """One configuration in a fresh ``python -m quantdream.bench.memory`` process; a crash, a kill (e.g.
    out of memory) or a timeout becomes a ``failed`` row that says why."""
    check_spec(spec)
    with tempfile.TemporaryDirectory(prefix="qd-bench-") as tmp:
        result = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "quantdream.bench.run_one", "--spec", json.dumps(dataclasses.asdict(spec)),
               "--result", str(result)]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            return {**_base_row(spec, spec.weights), "status": "failed",
                    "note": f"timed out after {timeout:.0f} s"}
        if proc.returncode == 0 and result.is_file():
            row = json.loads(result.read_text())
            row["process_seconds"] = time.perf_counter() - t
            return row
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        why = "killed by the OS (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
        return {**_base_row(spec, spec.weights), "status": "failed", "note": f"{why}: {' | '.join(tail)}"}


def write_random_folder(arch: str, weights: str, seed: int, out: Path) -> Path:
    """A random-weight model of ``arch`` as `quantdream quantize --weights WEIGHTS` writes it (UNet at
    ``weights``, text encoder and VAE int8, other tensors fp16, tokenizer and scheduler), built layer by
    layer in this process; the measured subprocess then loads it as a user's run loads its model."""
    import torch

    from ..quant.io import save_quantized
    comps = build_components(BenchSpec(arch=arch, seed=seed), weights, "cpu", torch.float32)
    parts = ("unet", "text_encoder", "vae", "tokenizer", "scheduler") + \
        (("text_encoder_2", "tokenizer_2") if "text_encoder_2" in comps else ())
    save_quantized({k: comps[k] for k in parts}, out,
                   {"arch": arch, "weights": weights, "random_weights": True, "seed": seed}, float_dtype="fp16")
    return out


def _loads_a_folder(spec: BenchSpec) -> bool:
    """int8/int4 runs of quantdream.methods load a quantized folder (as users run them); NF4, float
    weights and registered bench methods (their own prepare) are built layer by layer."""
    bm = _implemented(spec.method)
    return not spec.model_dir and spec.method not in BENCH_METHODS and spec.arch in bm.archs and \
        (spec.weights or bm.default_weights) in ("int8", "int4")


def bench_memory(specs: list[BenchSpec], timeout: float | None = None,
                 callback: Callable[[dict], None] | None = None) -> dict:
    """Measure each spec in its own subprocess -> {"rows": [...], "summary": {...}}. Quantized runs
    load a random-weight quantized folder written once per (arch, weights, seed) for this call."""
    for s in specs:
        check_spec(s)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qd-bench-models-") as models:
        folders: dict[tuple, Path] = {}
        for s in specs:
            if _loads_a_folder(s):
                key = (s.arch, s.weights or _implemented(s.method).default_weights, s.seed)
                if key not in folders:
                    logger.info("writing a random-weight %s %s folder for the quantized runs", *key[:2])
                    folders[key] = write_random_folder(*key, Path(models) / "-".join(map(str, key)))
                s = dataclasses.replace(s, model_dir=str(folders[key]))
            row = run_in_subprocess(s, timeout)
            rows.append(row)
            if callback is not None:
                callback(row)
    return {"rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> dict:
    """The lowest whole-process peak and every other method's ratio to it (same run, same settings)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return {}
    low = min(ok, key=lambda r: r["whole_process_peak_mib"])
    out = {"lowest_whole_process": f"{low['method']} ({low['weights']})",
           "whole_process_ratio_to_lowest": {f"{r['method']} ({r['weights']})":
                                             r["whole_process_peak_mib"] / low["whole_process_peak_mib"] for r in ok},
           "training_peak_ratio_to_lowest": {f"{r['method']} ({r['weights']})":
                                             r["training_peak"]["vmhwm_mib"] / low["training_peak"]["vmhwm_mib"]
                                             for r in ok}}
    cuda = [r for r in ok if "cuda_max_allocated_mib" in r["training_peak"]]
    if cuda:
        lowc = min(cuda, key=lambda r: r["training_peak"]["cuda_max_allocated_mib"])
        out["cuda_allocated_ratio_to_lowest"] = {
            f"{r['method']} ({r['weights']})":
                r["training_peak"]["cuda_max_allocated_mib"] / lowc["training_peak"]["cuda_max_allocated_mib"]
            for r in cuda}
    return out


def _fmt(x, spec: str = ".0f") -> str:
    return "" if x is None else format(x, spec)


def human_bytes(n: float | None) -> str:
    """Decimal units (kB = 1000 B, MB = 10^6 B), as the papers' storage columns (PEQA 1.32 MB = 0.33 M x 4 B)."""
    if n is None:
        return ""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            digits = 0 if unit == "B" or n >= 100 else 1 if n >= 10 else 2       # three significant figures
            return f"{n:.{digits}f} {unit}"
        n /= 1000
    return ""


def memory_markdown(result: dict) -> str:
    """A markdown table of ``bench_memory``'s result (MiB unless stated)."""
    rows = result["rows"]
    head = ("| method | arch | weights | px | status | training VmHWM | RssAnon | RssFile | whole-process peak | "
            "CUDA alloc / reserved | storage | s/step | UNet passes/step |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        tp = r.get("training_peak", {})
        cuda = (f"{tp['cuda_max_allocated_mib']:.0f} / {tp['cuda_max_reserved_mib']:.0f}"
                if "cuda_max_allocated_mib" in tp else "")
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('note', '')}"
        weights = (r["weights"] or "default") + (" (low-memory)" if r.get("low_memory") else "")
        lines.append(f"| {r['method']} | {r['arch']} | {weights} | {r['resolution']} | {status} | "
                     f"{_fmt(tp.get('vmhwm_mib'))} | {_fmt(tp.get('rss_anon_mib'))} | {_fmt(tp.get('rss_file_mib'))} | "
                     f"{_fmt(r.get('whole_process_peak_mib'))} | {cuda} | {human_bytes(r.get('storage_bytes'))} | "
                     f"{_fmt(r.get('seconds_per_step'), '.3g')} | {_fmt(r.get('unet_forward_passes_per_step'), 'g')} |")
    s = result.get("summary") or {}
    if s.get("whole_process_ratio_to_lowest"):
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in s["whole_process_ratio_to_lowest"].items())
        lines.append("")
        lines.append(f"Whole-process peak relative to the lowest ({s['lowest_whole_process']}): {ratios}.")
    lines.append("")
    lines.append("Training VmHWM: process high-water mark over the training steps only (after setup, gc and "
                 "malloc_trim); whole-process: the maximum over setup and training. Random weights; each row "
                 "is a fresh subprocess; int8/int4 rows load a quantized folder written beforehand, as "
                 "`personalize --model DIR` does, the others build the model layer by layer.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """The subprocess entry point: ``--spec JSON --result FILE``."""
    ap = argparse.ArgumentParser(description="one bench-memory configuration (used by `quantdream bench memory`)")
    ap.add_argument("--spec", required=True, help="BenchSpec as JSON")
    ap.add_argument("--result", required=True, help="where to write the row (JSON)")
    a = ap.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    spec = BenchSpec(**json.loads(a.spec))
    row = measure_in_process(spec)
    Path(a.result).write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
