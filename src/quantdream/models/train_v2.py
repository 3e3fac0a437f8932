"""Embedded model v2: the whole recipe in one wall-clock budget (sized for ~5 minutes on one GPU).

    python -m quantdream.models.train_embedded gpu-v2 --minutes 5.2 --out DIR --device cuda

One process, four phases, each stopped on time (``--minutes`` covers everything, imports included):

1. **pre-render** the world in a pool of CPU workers into memory: ``--images`` scenes, each with two
   v2 captions (:mod:`quantdream.world.identities`: named instances, shades, prints), tokenized;
2. **autoencoder** (``--vae-share`` of the training time), warm-started from v1's and trained further
   with v1's object-weighted L1 + edge + KL loss, so prints and dots survive;
3. **text encoder + UNet** on the autoencoder's latents of the pre-rendered images (encoded once):
   v-prediction (Salimans & Ho 2022) with the loss weighted so that, read as an x0 loss, every
   timestep counts ``min(1 + SNR, gamma)`` (min-SNR, Hang et al. 2023, floored at the x0 loss where
   the layout is decided), a 4-level UNet reaching 2x2, EMA weights, 10% empty captions for guidance;
4. **export** the EMA weights as fp16 diffusers folder (the package layout, ``prediction_type`` =
   ``v_prediction`` in the scheduler), ``instances.json`` (the named and held-out identities),
   ``training.json``, and a sample grid drawn by stock ``StableDiffusionPipeline.from_pretrained``.

``DIR`` receives ``model/`` (the export), ``log.json`` (steps, losses, seconds; rewritten as training
goes), ``vae.pt`` / ``unet-ema.pt`` (checkpoints), ``grid.png`` + ``grid.txt``.
``export-v2 --out DIR`` rewrites ``DIR/model`` from those checkpoints (after a run cut short).

**Resumable runs** (CPU over several days, or GPU time in pieces): give the stages' lengths in steps,

    python -m quantdream.models.train_embedded gpu-v2 --device cpu --threads 1 --minutes 150 --out DIR \
        --images 64000 --vae-steps 600 --unet-steps 30000 --unet-batch 64

and ``--minutes`` only bounds this invocation: the learning-rate schedules follow the step counts, the whole
state (weights, optimizer, EMA, random state; ``vae-state.pt``, ``latents.pt``, ``unet-state.pt``) is saved
every ``--ckpt-every-s`` and on Ctrl-C, and the same command continues where the last one stopped. Every
invocation that reaches the UNet stage exports the EMA weights so far, so ``DIR/model`` is always usable.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

def _process_start() -> float:
    """When this process started (the budget counts the interpreter's imports too); now if unknown."""
    try:  # Linux: start time in clock ticks after boot (field 22 of /proc/self/stat) + boot time
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(l.split()[1]) for l in Path("/proc/stat").read_text().splitlines() if l.startswith("btime"))
        return min(time.time(), boot + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


T_START = _process_start()

import numpy as np  # noqa: E402

DEFAULT_CAPTIONS = [
    "a red bag at the top left", "a large blue sneaker on a plain yellow background at the bottom right",
    "a small green dress at the top right", "a light pink coat with black dots",
    "a white boot with red stripes on a checkered blue background", "a purple pullover on the left",
]


@dataclass
class V2Config:
    minutes: float = 5.2
    out: str = "runs/embedded-v2"
    device: str = "cuda"
    seed: int = 0
    fmnist: str | None = None
    workers: int = 0  # 0: all CPU cores but one, at most 15
    images: int = 240_000
    chunk: int = 2000
    n_named: int = 160
    n_held_out: int = 16
    vae_share: float = 0.25
    vae_batch: int = 128
    vae_lr: float = 2e-4
    vae_init: str = "v1"  # "v1": continue from the packaged autoencoder; "none": from scratch
    kl_weight: float = 1e-5
    unet_batch: int = 512
    unet_lr: float = 5e-4
    ema: float = 0.999
    snr_gamma: float = 5.0
    p_uncond: float = 0.1
    reserve_s: float = 30.0  # kept for export + grid
    grid_steps: int = 30
    log_every_s: float = 10.0
    eval_images: int = 256  # autoencoder PSNR check after its stage
    # resumable mode: the stages' lengths in steps (0: the --vae-share / wall-clock schedule above). With
    # step targets, --minutes is only this invocation's budget: the run checkpoints its whole state
    # (weights, optimizer, EMA, random state) and the same command continues it, on CPU or GPU.
    vae_steps: int = 0
    unet_steps: int = 0
    threads: int = 0  # torch CPU threads (0: torch's default)
    ckpt_every_s: float = 60.0


TINY = dict(images=256, chunk=128, workers=2, vae_batch=4, unet_batch=4, reserve_s=20.0, grid_steps=2, eval_images=8)


# ----------------------------------------------------------------------------- phase 1: pre-render
_W: dict = {}


def _worker_init(fmnist, instances, seed):
    try:
        from dataclasses import fields
        from transformers import CLIPTokenizer
        from ..world.fmnist import load_fmnist
        from ..world.identities import Instance
        from ..world.render import Obj
        from .embedded import TOKENIZER_DIR
        items, labels = load_fmnist("train", fmnist)
        keys = {f.name for f in fields(Obj)}
        _W.update(items=items, by_class=[np.flatnonzero(labels == c) for c in range(10)], seed=seed,
                  tok=CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR)),
                  instances=[Instance(d["word"], Obj(**{k: tuple(v) if isinstance(v, list) else v
                                                        for k, v in d.items() if k in keys}), d["shade"])
                             for d in instances])
    except Exception as e:  # a failing initializer would be restarted forever by the pool: fail the jobs instead
        _W["error"] = f"{type(e).__name__}: {e}"


def render_chunk(job: tuple[int, int]):
    """Chunk k of the pre-rendered set, a pure function of (seed, k): images (n, 64, 64, 3) uint8,
    object masks (n, 64, 64) uint8, token ids of two captions per image (n, 2, L) int32."""
    from ..world.identities import caption_v2, sample_scene_v2
    from ..world.render import render
    from .embedded import MAX_LENGTH
    if "error" in _W:
        raise RuntimeError(f"pre-render worker failed to start: {_W['error']}")
    k, n = job
    rng = np.random.default_rng([_W["seed"], 17, k])
    imgs, masks, caps = [], [], []
    for _ in range(n):
        scene, extra = sample_scene_v2(rng, _W["by_class"], _W["instances"])
        img, m = render(scene, _W["items"], return_mask=True)
        imgs.append(img)
        masks.append((m * 255).astype(np.uint8))
        caps += [caption_v2(scene, extra, rng), caption_v2(scene, extra, rng)]
    ids = _W["tok"](caps, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    return k, np.stack(imgs), np.stack(masks), np.asarray(ids, dtype=np.int32).reshape(n, 2, MAX_LENGTH)


class Prerender:
    """Chunks arrive from a worker pool in the background; ``take()`` moves the finished ones to the device."""

    def __init__(self, cfg: V2Config, instances: list[dict]):
        n_chunks = math.ceil(cfg.images / cfg.chunk)
        jobs = [(k, min(cfg.chunk, cfg.images - k * cfg.chunk)) for k in range(n_chunks)]
        # all cores but one, at most 15 (a container may show the host's cores but be allowed fewer)
        workers = cfg.workers or max(1, min(15, len(os.sched_getaffinity(0)) - 1))
        self.pool = mp.get_context("fork").Pool(min(workers, n_chunks), _worker_init, (cfg.fmnist, instances, cfg.seed))
        self.ready, self.n_chunks, self.done, self.error = [], n_chunks, False, None
        self.images = self.masks = self.ids = None
        self.order: list[tuple[int, int]] = []  # (chunk number, images) in the order they were appended

        def collect():
            try:
                for res in self.pool.imap_unordered(render_chunk, jobs):
                    self.ready.append(res)
            except Exception as e:  # noqa: BLE001 - handed to the training loop by take()
                self.error = e
            self.done = True
        self.thread = threading.Thread(target=collect, daemon=True)
        self.thread.start()

    def take(self, device) -> int:
        import torch
        if self.error is not None:
            self.pool.terminate()
            raise RuntimeError(f"pre-rendering failed: {self.error}")
        new = []
        while self.ready:
            new.append(self.ready.pop(0))
        if new:
            cat = lambda i, old: torch.cat(([old] if old is not None else []) + [torch.from_numpy(r[i]).to(device)
                                                                                 for r in new])
            self.images, self.masks, self.ids = cat(1, self.images), cat(2, self.masks), cat(3, self.ids)
            self.order += [(r[0], len(r[1])) for r in new]
        return 0 if self.images is None else len(self.images)

    def sort(self) -> None:
        """Put the chunks in their numbered order, so image i is the same image in every invocation (the
        cached latents of a resumed run are indexed like this)."""
        import torch
        if self.order == sorted(self.order):
            return
        spans, at = {}, 0
        for k, n in self.order:
            spans[k], at = (at, at + n), at + n
        perm = torch.cat([torch.arange(*spans[k]) for k in sorted(spans)]).to(self.ids.device)
        self.images, self.masks, self.ids = self.images[perm], self.masks[perm], self.ids[perm]
        self.order = sorted(self.order)

    def first(self, device, deadline: float) -> int:
        """Wait for the first chunk (the workers' start-up: imports, the dataset, the tokenizer)."""
        while self.take(device) == 0:
            if time.time() > deadline or self.done:
                raise RuntimeError("no pre-rendered images arrived in time: too short a budget for this machine?")
            time.sleep(0.1)
        return len(self.images)

    def wait(self, device, deadline: float) -> int:
        while not self.done and time.time() < deadline:
            time.sleep(0.2)
        n = self.take(device)
        self.pool.terminate()
        return n


# ----------------------------------------------------------------------------- helpers
class Log:
    def __init__(self, path: Path, cfg: V2Config, resume: bool = False):
        self.path, self.rec, self.last = path, {"config": asdict(cfg), "phases": {}, "steps": []}, 0.0
        if resume and path.is_file():  # the same run continued: keep its steps, note each invocation
            old = json.loads(path.read_text())
            self.rec.update(steps=old.get("steps", []), phases=old.get("phases", {}),
                            invocations=old.get("invocations", 1) + 1)

    def phase(self, name: str, **kw):
        self.rec["phases"][name] = {"t": round(time.time() - T_START, 2), **kw}
        self.write()

    def step(self, **kw):
        self.rec["steps"].append({"t": round(time.time() - T_START, 2), **kw})
        if time.time() - self.last > self.rec["config"]["log_every_s"]:
            self.write()

    def write(self):
        self.last = time.time()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rec, indent=1) + "\n")
        tmp.replace(self.path)


class Schedule:
    """Where a stage stands: a step target (resumable runs; the invocation's end only pauses it) or, with
    ``target`` 0, a wall-clock window ``[start, end)`` that the stage fills (the one-budget GPU recipe)."""

    def __init__(self, target: int, start: float, end: float):
        self.target, self.start, self.end = target, start, end

    def running(self, step: int) -> bool:
        return time.time() < self.end and (not self.target or step < self.target)

    def frac(self, step: int) -> float:
        return step / self.target if self.target else (time.time() - self.start) / max(1e-6, self.end - self.start)

    def complete(self, step: int) -> bool:
        return not self.target or step >= self.target


def lr_at(step: int, base: float, frac: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine to 10% over the stage's wall-clock fraction."""
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def to_unit(imgs_u8):
    return imgs_u8.permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------- phase 2: autoencoder
def train_vae(cfg: V2Config, data: Prerender, dev, end: float, log: Log):
    """Returns (autoencoder, steps, complete); with a step target the state is kept in OUT/vae-state.pt."""
    import torch
    from diffusers import AutoencoderKL
    from .embedded import PACKAGE_MODEL_DIR, VAE_CONFIG
    from ..checkpoint import load_checkpoint, save_checkpoint
    from .embedded import vae_train_step
    if cfg.vae_init == "v1" and (PACKAGE_MODEL_DIR / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(str(PACKAGE_MODEL_DIR / "vae"), torch_dtype=torch.float32)
    else:
        vae = AutoencoderKL(**VAE_CONFIG)
    vae.to(dev).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, fused=dev.type == "cuda")
    g = torch.Generator(device=dev).manual_seed(cfg.seed)
    step, state_path = 0, Path(cfg.out) / "vae-state.pt"
    st = load_checkpoint(state_path) if cfg.vae_steps else None
    if st is not None:
        vae.load_state_dict(st["vae"])
        opt.load_state_dict(st["opt"])
        g.set_state(st["gen"].to(g.get_state().device))
        step = st["step"]
        log.phase("vae_resumed", step=step)
    save = lambda: save_checkpoint(state_path, dict(vae=vae.state_dict(), opt=opt.state_dict(), gen=g.get_state(),
                                                    step=step))
    sched, last_ckpt = Schedule(cfg.vae_steps, time.time(), end), time.time()
    try:
        while sched.running(step):
            n = data.take(dev) if step % 50 == 0 else len(data.images)
            idx = torch.randint(0, n, (cfg.vae_batch,), device=dev, generator=g)
            x, m = to_unit(data.images[idx]), data.masks[idx][:, None].float() / 255
            for p in opt.param_groups:
                p["lr"] = lr_at(step, cfg.vae_lr, sched.frac(step), 50)
            loss, _ = vae_train_step(vae, opt, x, m, cfg.kl_weight, dev.type, bf16=dev.type == "cuda")
            step += 1
            if step % 25 == 0 or step == 1:
                log.step(stage="vae", step=step, loss=round(loss.item(), 5), images=n)
            if cfg.vae_steps and time.time() - last_ckpt > cfg.ckpt_every_s:
                save()
                last_ckpt = time.time()
    finally:  # Ctrl-C or a crash keeps the steps done so far
        if cfg.vae_steps and step > (st or {}).get("step", 0):
            save()
        log.write()
    if not sched.complete(step):
        log.phase("vae_paused", steps=step, of=cfg.vae_steps)
        return vae, step, False
    torch.save(vae.state_dict(), Path(cfg.out) / "vae.pt")
    vae.eval()
    with torch.no_grad():  # reconstruction PSNR of the last eval_images images, whole and on the object
        x, m = to_unit(data.images[-cfg.eval_images:]), data.masks[-cfg.eval_images:][:, None].float() / 255
        r = torch.cat([vae.decode(vae.encode(xb).latent_dist.mode()).sample for xb in x.split(64)]).float()
        se = (r - x).pow(2).mean(1, keepdim=True)
        psnr = float(10 * torch.log10(4.0 / se.mean()))
        psnr_obj = float(10 * torch.log10(4.0 / ((se * m).sum() / m.sum().clamp_min(1e-8))))
    log.phase("vae_done", steps=step, images=len(data.images), psnr=round(psnr, 2), psnr_obj=round(psnr_obj, 2))
    return vae.eval().requires_grad_(False), step, True


def load_vae(out: Path, dev):
    """The finished autoencoder of a resumable run (OUT/vae.pt)."""
    import torch
    from diffusers import AutoencoderKL
    from .embedded import VAE_CONFIG
    vae = AutoencoderKL(**VAE_CONFIG)
    vae.load_state_dict(torch.load(out / "vae.pt", map_location="cpu"))
    return vae.to(dev).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- phase 3: text encoder + UNet
def encode_latents(vae, images, batch: int = 512):
    """Mean and std of the posterior of every image (bf16 on GPU: 240k images take ~2 GB)."""
    import torch
    mean, std = [], []
    dev = images.device
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        for xb in images.split(batch):
            d = vae.encode(to_unit(xb)).latent_dist
            mean.append(d.mean.to(torch.bfloat16))
            std.append(d.std.to(torch.bfloat16))
    return torch.cat(mean), torch.cat(std)


def encode_cached(vae, images, path: Path, end: float, every_s: float, batch: int = 256):
    """``encode_latents`` for resumable runs: the encodings go to ``path`` as they are made, so an invocation
    that runs out of time hands its work to the next one (CPU: ~70 images/s per core). Returns (mean, std, done):
    mean and std are None while ``done`` < len(images)."""
    import torch
    from ..checkpoint import load_checkpoint, save_checkpoint
    st = load_checkpoint(path)
    if st is None or st["n"] != len(images):
        st = {"n": len(images), "mean": [], "std": []}
    done, last = sum(len(m) for m in st["mean"]), time.time()
    try:
        while done < len(images):
            if time.time() > end:
                return None, None, done
            m, sd = encode_latents(vae, images[done:done + batch], batch)
            st["mean"].append(m.cpu())
            st["std"].append(sd.cpu())
            done += len(m)
            if time.time() - last > every_s:
                save_checkpoint(path, st)
                last = time.time()
    finally:
        save_checkpoint(path, st)
    dev = images.device
    return torch.cat(st["mean"]).to(dev), torch.cat(st["std"]).to(dev), done


def v1_text_embeddings(te) -> bool:
    """Start the token and position tables from v1's (same tokenizer and width; the layers are new)."""
    import torch
    from safetensors.torch import load_file
    from .embedded import PACKAGE_MODEL_DIR
    f = PACKAGE_MODEL_DIR / "text_encoder" / "model.safetensors"
    if not f.is_file():
        return False
    sd = load_file(str(f))
    emb = getattr(te, "text_model", te).embeddings  # transformers 5 flattened CLIPTextModel
    with torch.no_grad():
        for name, mod in (("token_embedding", emb.token_embedding), ("position_embedding", emb.position_embedding)):
            key = next((k for k in sd if k.endswith(f"embeddings.{name}.weight")), None)
            if key is not None and sd[key].shape == mod.weight.shape:
                mod.weight.copy_(sd[key].float())
    return True


def train_unet(cfg: V2Config, data: Prerender, vae, dev, end: float, log: Log):
    """Returns (steps, scaling, complete); with a step target the whole state is kept in OUT/unet-state.pt.
    (An invocation that ends while encoding the latents returns (images encoded, None, False).)"""
    import torch
    import torch.nn.functional as F
    from ..checkpoint import load_checkpoint, save_checkpoint
    from .embedded import MAX_LENGTH, build_components, clipped_step
    out = Path(cfg.out)
    comps = build_components(recipe="v2")
    tok, te, unet, sched = comps["tokenizer"], comps["text_encoder"], comps["unet"], comps["scheduler"]
    warm_te = v1_text_embeddings(te)
    te.to(dev).train()
    unet.to(dev).train()
    if cfg.unet_steps:
        mean, std, done = encode_cached(vae, data.images, out / "latents.pt", end, cfg.ckpt_every_s)
        if mean is None:
            return done, None, False
    else:
        mean, std = encode_latents(vae, data.images)
    scaling = float(1.0 / mean.float().std())
    log.phase("latents", n=len(mean), scaling=round(scaling, 5), te_from_v1=warm_te)
    ids = data.ids.long()
    empty = torch.tensor(tok("", padding="max_length", max_length=MAX_LENGTH).input_ids, device=dev)
    ac = sched.alphas_cumprod.to(dev)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01, fused=dev.type == "cuda")
    ema = [p.detach().clone() for p in params]
    g = torch.Generator(device=dev).manual_seed(cfg.seed + 1)
    step, state_path = 0, out / "unet-state.pt"
    st = load_checkpoint(state_path) if cfg.unet_steps else None
    if st is not None:
        unet.load_state_dict(st["unet"])
        te.load_state_dict(st["te"])
        opt.load_state_dict(st["opt"])
        with torch.no_grad():
            for e, v in zip(ema, st["ema"]):
                e.copy_(v)
        g.set_state(st["gen"].to(g.get_state().device))
        step = st["step"]
        log.phase("unet_resumed", step=step)

    def checkpoint():
        save_ema(cfg, unet, te, params, ema, step, scaling)
        if cfg.unet_steps:
            save_checkpoint(state_path, dict(unet=unet.state_dict(), te=te.state_dict(), opt=opt.state_dict(),
                                             ema=[e.detach().cpu() for e in ema], gen=g.get_state(), step=step))

    n, b = len(mean), cfg.unet_batch
    sch, last_ckpt = Schedule(cfg.unet_steps, time.time(), end), time.time()
    try:
        # at least one step in the wall-clock recipe, even when the encoding ate the stage's time
        while sch.running(step) or (not cfg.unet_steps and step == 0):
            idx = torch.randint(0, n, (b,), device=dev, generator=g)
            z0 = (mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, device=dev, generator=g)) * scaling
            cap = ids[idx, torch.randint(0, 2, (b,), device=dev, generator=g)]
            drop = torch.rand(b, device=dev, generator=g) < cfg.p_uncond
            cap = torch.where(drop[:, None], empty[None], cap)
            t = torch.randint(0, len(ac), (b,), device=dev, generator=g)
            noise = torch.randn(z0.shape, device=dev, generator=g)
            a, s = ac[t].sqrt().view(-1, 1, 1, 1), (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
            zt, v = a * z0 + s * noise, a * noise - s * z0
            snr = ac[t] / (1 - ac[t])
            w = torch.clamp(snr + 1, max=cfg.snr_gamma) / (snr + 1)  # as an x0 loss: weight min(1 + SNR, gamma)
            for p in opt.param_groups:
                p["lr"] = lr_at(step, cfg.unet_lr, sch.frac(step), 100)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                pred = unet(zt, t, te(cap)[0]).sample
            loss = (F.mse_loss(pred.float(), v, reduction="none").mean((1, 2, 3)) * w).mean()
            clipped_step(opt, loss, params)
            step += 1
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(cfg.ema, (1 + step) / (10 + step)))
            if step % 50 == 0 or step == 1:
                log.step(stage="unet", step=step, loss=round(loss.item(), 5))
            if time.time() - last_ckpt > cfg.ckpt_every_s:
                checkpoint()
                last_ckpt = time.time()
    finally:  # Ctrl-C or a crash keeps the steps done so far
        checkpoint()
        log.write()
    done = sch.complete(step)
    log.phase("unet_done" if done else "unet_paused", steps=step, samples=step * b, of=cfg.unet_steps or None)
    return step, scaling, done


def save_ema(cfg, unet, te, params, ema, step, scaling):
    """Write the EMA weights (fp32, CPU) to OUT/unet-ema.pt."""
    import torch
    names = [f"unet.{k}" for k, _ in unet.named_parameters()] + [f"te.{k}" for k, _ in te.named_parameters()]
    torch.save({"ema": {k: e.detach().float().cpu() for k, e in zip(names, ema)}, "step": step, "scaling": scaling},
               Path(cfg.out) / "unet-ema.pt")


# ----------------------------------------------------------------------------- phase 4: export + grid
def export_v2(out: Path, instances: dict, extra: dict) -> Path:
    """OUT/vae.pt + OUT/unet-ema.pt -> OUT/model, the package layout (fp16 safetensors)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from ..checkpoint import atomic_json
    from .embedded import TOKENIZER_DIR, build_components
    comps = build_components(recipe="v2")
    vae = load_vae(out, "cpu")
    ck = torch.load(out / "unet-ema.pt", map_location="cpu")
    for name, mod in (("unet.", comps["unet"]), ("te.", comps["text_encoder"])):
        missing = mod.load_state_dict({k[len(name):]: v for k, v in ck["ema"].items() if k.startswith(name)},
                                      strict=False).missing_keys
        if any(not k.endswith("position_ids") for k in missing):
            raise RuntimeError(f"checkpoint lacks {missing[:3]}")
    vae.register_to_config(scaling_factor=ck["scaling"])
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"],
                                   unet=comps["unet"], scheduler=comps["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    dst = out / "model"
    pipe.to(torch.float16).save_pretrained(str(dst), safe_serialization=True)
    shutil.rmtree(dst / "tokenizer")  # the packaged tokenizer files as they are (vocab.json + merges.txt too)
    shutil.copytree(TOKENIZER_DIR, dst / "tokenizer")
    cfg_path = dst / "text_encoder" / "config.json"  # load as fp32 by default, as v1
    tcfg = json.loads(cfg_path.read_text())
    tcfg.update(dtype="float32", torch_dtype="float32")
    cfg_path.write_text(json.dumps(tcfg, indent=2) + "\n")
    atomic_json(dst / "training.json", {"recipe": "v2", "unet_steps": ck["step"], "scaling_factor": ck["scaling"],
                                        **extra})
    atomic_json(dst / "instances.json", instances)
    return dst


def sample_grid(model_dir: Path, out: Path, dev, captions: list[str], steps: int, n: int = 4, seed: int = 0):
    """Draw ``n`` images per caption with stock diffusers from the exported folder; one row per caption."""
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir)).to(dev)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for i, c in enumerate(captions):
        g = torch.Generator(device=dev).manual_seed(seed + i)
        ims = pipe([c] * n, height=64, width=64, num_inference_steps=steps, guidance_scale=4.0, generator=g,
                   output_type="np").images
        rows.append(np.concatenate(list(ims), axis=1))
    grid = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(out / "grid.png")
    (out / "grid.txt").write_text("\n".join(captions) + "\n")


# ----------------------------------------------------------------------------- the run
def make_identities(cfg: V2Config) -> dict:
    from transformers import CLIPTokenizer
    from ..world.fmnist import find_fmnist_dir, load_fmnist
    from ..world.identities import instance_words, make_instances
    from .embedded import TOKENIZER_DIR
    from .vocab import corpus_words
    _, labels = load_fmnist("train", cfg.fmnist)
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    words = instance_words(tok, set(corpus_words()), cfg.n_named + cfg.n_held_out)
    inst = make_instances(np.random.default_rng([cfg.seed, 99]), labels, words)
    sub = find_fmnist_dir(cfg.fmnist) / "subset.json"  # a subset folder maps its items to the full split
    full = json.loads(sub.read_text())["train_indices"] if sub.is_file() else None
    dicts = [dict(i.to_dict(), train_index=int(full[i.obj.item]) if full else i.obj.item) for i in inst]
    return {"named": dicts[:cfg.n_named], "held_out": dicts[cfg.n_named:],
            "note": "item/train_index: index into Fashion-MNIST's train split (train_index: of the full split)"}


def run(cfg: V2Config) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = T_START + cfg.minutes * 60
    resumable = bool(cfg.vae_steps and cfg.unet_steps)
    log = Log(out / "log.json", cfg, resume=resumable)
    identities = make_identities(cfg)
    data = Prerender(cfg, identities["named"])  # fork before the device is touched
    try:
        return _train(cfg, out, log, identities, data, deadline, resumable)
    finally:
        data.pool.terminate()  # also on Ctrl-C: no rendering workers left behind


def _train(cfg: V2Config, out: Path, log: Log, identities: dict, data: Prerender, deadline: float,
           resumable: bool) -> dict:
    import torch
    dev = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)
    log.phase("start", device=str(dev))
    train_end = deadline - cfg.reserve_s
    log.phase("first_chunk", images=data.first(dev, train_end))
    if resumable and (out / "vae.pt").is_file():  # a continued run whose autoencoder is finished
        vae, vae_steps = load_vae(out, dev), cfg.vae_steps
    else:
        vae_end = train_end if resumable else time.time() + cfg.vae_share * (train_end - time.time())
        vae, vae_steps, vae_done = train_vae(cfg, data, dev, vae_end, log)
        if not vae_done:
            return _paused(log, "autoencoder", vae_steps, cfg.vae_steps)
    n = data.wait(dev, train_end if resumable else vae_end + 0.1 * (train_end - vae_end))
    if resumable:
        data.sort()
    log.phase("data", images=n)
    unet_steps, scaling, unet_done = train_unet(cfg, data, vae, dev, train_end, log)
    if scaling is None:
        return _paused(log, "latent encoding", unet_steps, n)
    del data.images, data.masks
    extra = {"vae_steps": vae_steps, "images": n, "minutes": cfg.minutes, "device": str(dev),
             "config": {k: v for k, v in asdict(cfg).items() if k not in ("out", "fmnist")}}
    if not unet_done:  # a usable model after every invocation: the EMA weights so far
        extra["partial"] = f"{unet_steps} of {cfg.unet_steps} UNet steps"
    model_dir = export_v2(out, identities, extra)
    log.phase("exported", unet_steps=unet_steps, complete=unet_done)
    named = identities["named"][:2]
    from ..world.render import CLASSES
    caps = DEFAULT_CAPTIONS + [f"a {d['word']} {CLASSES[d['cls']]}" for d in named]
    sample_grid(model_dir, out, dev, caps, cfg.grid_steps)
    log.phase("grid")
    log.rec["status"] = "complete" if unet_done else f"paused in the UNet stage ({unet_steps} of {cfg.unet_steps}), exported"
    log.write()
    return log.rec


def _paused(log: Log, stage: str, done: int, of: int) -> dict:
    log.phase("paused", stage=stage, done=done, of=of)
    log.rec["status"] = f"paused in the {stage} stage ({done} of {of})"
    log.write()
    return log.rec


def parse(argv=None) -> V2Config:
    ap = argparse.ArgumentParser(prog="train_embedded gpu-v2", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for k, v in asdict(V2Config()).items():
        kw = dict(type=type(v) if v is not None else str, default=v)
        ap.add_argument("--" + k.replace("_", "-"), **kw)
    ap.add_argument("--tiny", action="store_true", help=f"CPU smoke-test sizes: {TINY}")
    a = vars(ap.parse_args(argv))
    if a.pop("tiny"):
        a.update(TINY)
    cfg = V2Config(**a)
    if cfg.minutes <= 0 or cfg.images < 1 or not 0 < cfg.vae_share < 1:
        ap.error("--minutes and --images must be positive and --vae-share in (0, 1)")
    if cfg.vae_steps < 0 or cfg.unet_steps < 0 or bool(cfg.vae_steps) != bool(cfg.unet_steps):
        ap.error("--vae-steps and --unet-steps go together (a resumable run), both positive")
    if cfg.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            ap.error("--device cuda asked but no CUDA device is visible (use --device cpu)")
    return cfg


def main(argv=None) -> None:
    cfg = parse(argv)
    try:
        rec = run(cfg)
    except KeyboardInterrupt:
        if cfg.unet_steps:
            raise SystemExit(f"interrupted; the state is saved in {cfg.out}: the same command continues the run")
        raise SystemExit(f"interrupted; {cfg.out}/vae.pt and unet-ema.pt hold the last checkpoints "
                         f"(export-v2 --out {cfg.out} exports them)")
    ph = rec["phases"]
    print(json.dumps({k: ph[k] for k in ph}, indent=1))
    if rec["status"].startswith("paused"):
        print(f"{rec['status']}: the same command continues the run")


def main_export(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="train_embedded export-v2",
                                 description="rewrite OUT/model from OUT's checkpoints")
    ap.add_argument("--out", required=True)
    ap.add_argument("--fmnist", default=None)
    a = ap.parse_args(argv)
    out = Path(a.out)
    rec = json.loads((out / "log.json").read_text()) if (out / "log.json").is_file() else {"config": {}}
    cfg = V2Config(**{**rec["config"], "out": a.out, "fmnist": a.fmnist or rec["config"].get("fmnist")})
    print(export_v2(out, make_identities(cfg), {"note": "exported after the run from its last checkpoints"}))
