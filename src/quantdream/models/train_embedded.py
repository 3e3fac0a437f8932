"""Train the embedded model on the world: autoencoder first, then text encoder + UNet on its latents.

    python -m quantdream.models.train_embedded vae  --run runs/embedded --steps 2000
    python -m quantdream.models.train_embedded unet --run runs/embedded --steps 13000
    python -m quantdream.models.train_embedded export --run runs/embedded

That is v1's recipe. v2's runs in one wall-clock budget, or in resumable pieces with ``--vae-steps`` and
``--unet-steps`` (see ``models/train_v2.py``)::

    python -m quantdream.models.train_embedded gpu-v2 --minutes 5.2 --out DIR --device cuda

``export`` before the UNet stage has a checkpoint writes the autoencoder alone (``vae/`` in the package), so
a later run on another machine trains the UNet on the very same latents.

Every stage is seeded (batch k is drawn from ``default_rng([seed, k])``, so a resumed run sees the
same data), checkpoints atomically every ``--ckpt-every`` steps and on Ctrl-C, shows a progress bar,
and writes sample grids under ``RUN/samples``. Run a stage again to resume it.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..checkpoint import atomic_json, graceful_interrupt, load_checkpoint, save_checkpoint
from ..world.captions import caption
from ..world.fmnist import load_fmnist
from ..world.render import render_batch, sample_scene
from .embedded import MAX_LENGTH, PACKAGE_MODEL_DIR, build_components, clipped_step, vae_train_step


class WorldBatches:
    """Batch ``k`` of the world's training split, a pure function of (seed, k)."""

    def __init__(self, seed: int, split: str = "train", fmnist: str | None = None):
        self.items, self.labels = load_fmnist(split, fmnist)
        self.seed, self.split = seed, split

    def __call__(self, k: int, batch_size: int, captions: bool = False):
        rng = np.random.default_rng([self.seed, k])
        scenes = [sample_scene(rng, self.labels, self.split) for _ in range(batch_size)]
        imgs, masks = render_batch(scenes, self.items, return_mask=True)
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
        m = torch.from_numpy(masks)[:, None]
        caps = [caption(s, rng)[0] for s in scenes] if captions else None
        return x, m, caps


def lr_at(step: int, base: float, total: int, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def adjust_threads(run: Path) -> None:
    """Let the operator change the thread count of a running job: write a number to RUN/threads
    (useful when other jobs share the CPU: oversubscribed threads slow torch down several-fold)."""
    f = run / "threads"
    if f.is_file():
        try:
            n = int(f.read_text().strip())
        except ValueError:
            return
        if n > 0 and n != torch.get_num_threads():
            torch.set_num_threads(n)


def save_grid(path: Path, rows: list[torch.Tensor]) -> None:
    """rows: list of (N, 3, H, W) in [-1, 1] -> one PNG, one row per tensor."""
    g = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)
    arr = ((g.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.NEAREST).save(path)


def psnr(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor | None = None) -> float:
    se = (a - b).pow(2).mean(1, keepdim=True)
    mse = (se * w).sum() / w.sum().clamp_min(1e-8) if w is not None else se.mean()
    return float(10 * torch.log10(4.0 / mse.clamp_min(1e-10)))


# ----------------------------------------------------------------------------- autoencoder
def train_vae(a) -> None:
    torch.manual_seed(a.seed)
    run = Path(a.run)
    ckpt_path = run / "vae.ckpt"
    vae = build_components()["vae"]
    opt = torch.optim.AdamW(vae.parameters(), lr=a.lr, weight_decay=0.0)
    step = 0
    if (ck := load_checkpoint(ckpt_path)) is not None:
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        print(f"resuming autoencoder at step {step}")
    data = WorldBatches(a.seed)
    x_fix, m_fix, _ = data(10**9, 8)
    bar = tqdm(total=a.steps, initial=step, desc="autoencoder", dynamic_ncols=True)
    save = lambda: save_checkpoint(ckpt_path, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                                               "args": vars(a)})
    with graceful_interrupt() as stop:
        while step < a.steps and not stop:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, a.lr, a.steps, 200)
            if step % 10 == 0:
                adjust_threads(run)
            x, m, _ = data(step, a.batch)
            loss, rec = vae_train_step(vae, opt, x, m, a.kl_weight, "cpu", bf16=True)
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr(rec.detach(), x):.1f}",
                                psnr_obj=f"{psnr(rec.detach(), x, m):.1f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
            if step % a.ckpt_every == 0 or step == a.steps:
                save()
                with torch.no_grad():
                    r = vae.decode(vae.encode(x_fix).latent_dist.mode()).sample
                save_grid(run / "samples" / f"vae_{step:06d}.png", [x_fix, r])
                with open(run / "vae_log.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "psnr": psnr(r, x_fix), "psnr_obj": psnr(r, x_fix, m_fix),
                                        "time": time.time()}) + "\n")
        save()
    bar.close()


# ----------------------------------------------------------------------------- text encoder + UNet
def load_trained_vae(run: Path):
    vae = build_components()["vae"]
    ck = load_checkpoint(run / "vae.ckpt")
    if ck is not None:
        vae.load_state_dict(ck["model"])
    elif (PACKAGE_MODEL_DIR / "vae").is_dir():  # a fresh machine: the autoencoder ships in the package
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(str(PACKAGE_MODEL_DIR / "vae"), torch_dtype=torch.float32)
    else:
        raise FileNotFoundError(f"{run / 'vae.ckpt'} not found: train the autoencoder first (stage `vae`)")
    return vae.eval().requires_grad_(False)


def load_package_state(unet, te) -> tuple[dict, int, float]:
    """Resume on a fresh machine from the committed package (its EMA weights, fp16 on disk; Adam restarts
    with a short warm-up). Returns (ema, step, scaling)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    info = json.loads((PACKAGE_MODEL_DIR / "training.json").read_text())
    unet.load_state_dict(UNet2DConditionModel.from_pretrained(str(PACKAGE_MODEL_DIR / "unet")).float().state_dict())
    te.load_state_dict(CLIPTextModel.from_pretrained(str(PACKAGE_MODEL_DIR / "text_encoder")).float().state_dict())
    ema = {k: v.detach().clone() for k, v in list(unet.state_dict(prefix="unet.").items())
           + list(te.state_dict(prefix="te.").items())}
    return ema, int(info["unet_steps"]), float(info["scaling_factor"])


@torch.no_grad()
def sample_images(unet, text_encoder, tokenizer, vae, scheduler_config, prompts, steps=25, guidance=4.0, seed=0,
                  scaling=1.0):
    """DDIM sampling with classifier-free guidance; returns images in [-1, 1]."""
    from diffusers import DDIMScheduler
    sch = DDIMScheduler.from_config(scheduler_config)
    sch.set_timesteps(steps)
    ids = tokenizer(prompts + [""] * len(prompts), padding="max_length", max_length=MAX_LENGTH,
                    truncation=True, return_tensors="pt").input_ids
    cond = text_encoder(ids)[0]
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(len(prompts), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                    generator=g)
    for t in sch.timesteps:
        eps = unet(torch.cat([z, z]), t, cond).sample
        e_c, e_u = eps.chunk(2)
        z = sch.step(e_u + guidance * (e_c - e_u), t, z).prev_sample
    return vae.decode(z / scaling).sample


def train_unet(a) -> None:
    torch.manual_seed(a.seed)
    run = Path(a.run)
    ckpt_path = run / "unet.ckpt"
    comps = build_components()
    tokenizer, te, unet, sched = comps["tokenizer"], comps["text_encoder"], comps["unet"], comps["scheduler"]
    vae = load_trained_vae(run)
    data = WorldBatches(a.seed + 1)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    step = 0
    ema = None
    warm_from = 0
    if (ck := load_checkpoint(ckpt_path)) is not None:
        warm_from = ck.get("warm_from", 0)
        unet.load_state_dict(ck["unet"])
        te.load_state_dict(ck["text_encoder"])
        opt.load_state_dict(ck["opt"])
        ema = ck["ema"]
        step, scaling = ck["step"], ck["scaling"]
        print(f"resuming text encoder + UNet at step {step}")
    elif a.from_package:
        ema, step, scaling = load_package_state(unet, te)
        warm_from = step
        print(f"resuming text encoder + UNet from the packaged weights at step {step} (fresh optimizer)")
    else:
        with torch.no_grad():  # SD's scaling factor: 1 / std of the latents
            z = torch.cat([vae.encode(data(10**9 + i, 64)[0]).latent_dist.mode() for i in range(4)])
        scaling = float(1.0 / z.std())
        print(f"latent std {z.std():.4f} -> scaling factor {scaling:.4f}")
    if ema is None:
        ema = {k: v.detach().clone() for k, v in list(unet.state_dict(prefix="unet.").items())
               + list(te.state_dict(prefix="te.").items())}
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    fixed_prompts = [caption(sample_scene(np.random.default_rng([7, i]), data.labels))[0] for i in range(8)]
    (run / "samples").mkdir(parents=True, exist_ok=True)
    (run / "samples" / "unet_prompts.txt").write_text("\n".join(fixed_prompts) + "\n")
    bar = tqdm(total=a.steps, initial=step, desc="text encoder + UNet", dynamic_ncols=True)

    def save():
        save_checkpoint(ckpt_path, {"unet": unet.state_dict(), "text_encoder": te.state_dict(), "opt": opt.state_dict(),
                                    "ema": ema, "step": step, "scaling": scaling, "args": vars(a),
                                    "warm_from": warm_from})

    def ema_models():
        u, t = copy.deepcopy(unet), copy.deepcopy(te)
        u.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("unet.")})
        t.load_state_dict({k[3:]: v for k, v in ema.items() if k.startswith("te.")})
        return u.eval(), t.eval()

    cached_k, cached_caps, cached_dist = -1, None, None
    with graceful_interrupt() as stop:
        while step < a.steps and not stop:
            lr = (lr_at(step, a.lr, a.steps, 500) if a.schedule_from is None
                  else lr_at(step - a.schedule_from, a.lr, a.steps - a.schedule_from, 50))
            if step - warm_from < 200 and warm_from > 0:  # re-warm a fresh optimizer after a package resume
                lr *= (step - warm_from + 1) / 200
            for g in opt.param_groups:
                g["lr"] = lr
            if step % 10 == 0:
                adjust_threads(run)
            if step // a.reuse != cached_k:  # each rendered+encoded batch serves `reuse` steps (new noise and t)
                cached_k = step // a.reuse
                x, _, cached_caps = data(cached_k, a.batch, captions=True)
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    cached_dist = vae.encode(x).latent_dist
            caps = [c if np.random.default_rng([a.seed, step, i]).random() >= 0.1 else ""
                    for i, c in enumerate(cached_caps)]
            z0 = cached_dist.sample().float() * scaling
            noise = torch.randn_like(z0)
            t = torch.randint(0, 1000, (len(z0),))
            zt = sched.add_noise(z0, noise, t)
            ids = tokenizer(caps, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                            return_tensors="pt").input_ids
            pred = unet(zt, t, te(ids)[0]).sample
            # min-SNR-5 weighting (Hang et al. 2023) for epsilon prediction
            w = torch.clamp(snr[t], max=5.0) / snr[t]
            if a.x0_weight_max:  # layout: at high noise eps-loss = snr * x0-loss, so where the object goes is
                w = torch.maximum(w, torch.clamp(1 / snr[t], max=a.x0_weight_max))  # almost free; weigh it as x0
            loss = (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * w).mean()
            clipped_step(opt, loss, params)
            step += 1
            with torch.no_grad():
                d = min(a.ema, (1 + step) / (10 + step))
                cur = dict(list(unet.state_dict(prefix="unet.").items()) + list(te.state_dict(prefix="te.").items()))
                for k, v in ema.items():
                    v.mul_(d).add_(cur[k].detach(), alpha=1 - d) if v.is_floating_point() else v.copy_(cur[k])
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
            if step % a.ckpt_every == 0 or step == a.steps:
                save()
                u, tt = ema_models()
                imgs = sample_images(u, tt, tokenizer, vae, sched.config, fixed_prompts, scaling=scaling)
                save_grid(run / "samples" / f"unet_{step:06d}.png", [imgs])
                with open(run / "unet_log.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss.item(), "time": time.time()}) + "\n")
        save()
    bar.close()


# ----------------------------------------------------------------------------- export
def export(a) -> None:
    """Write the diffusers folder (EMA weights, fp16 safetensors) that ships inside the package."""
    from diffusers import StableDiffusionPipeline
    run = Path(a.run)
    comps = build_components()
    vae = load_trained_vae(run)
    out = Path(a.out)
    ck = load_checkpoint(run / "unet.ckpt")
    if ck is None:  # the autoencoder alone, for a later UNet stage (load_trained_vae)
        if load_checkpoint(run / "vae.ckpt") is None:
            raise FileNotFoundError(f"neither {run / 'unet.ckpt'} nor {run / 'vae.ckpt'} found: train stage `vae` first")
        vae.to(torch.float16).save_pretrained(str(out / "vae"), safe_serialization=True)
        print(f"wrote {out / 'vae'} (autoencoder only: no UNet checkpoint in {run} yet)")
        return
    comps["unet"].load_state_dict({k[5:]: v for k, v in ck["ema"].items() if k.startswith("unet.")})
    comps["text_encoder"].load_state_dict({k[3:]: v for k, v in ck["ema"].items() if k.startswith("te.")})
    vae.register_to_config(scaling_factor=ck["scaling"])
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"],
                                   unet=comps["unet"], scheduler=comps["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(str(out), safe_serialization=True)  # fp16 on disk: 40 MB budget
    # load as fp32 by default (stock from_pretrained follows the config's dtype for the text encoder)
    cfg_path = out / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(dtype="float32", torch_dtype="float32")
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    atomic_json(out / "training.json", {"unet_steps": ck["step"], "args": ck["args"], "scaling_factor": ck["scaling"]})
    print(f"wrote {out}")


def main(argv=None) -> None:
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("gpu-v2", "export-v2"):  # v2: one wall-clock budgeted run (models/train_v2.py)
        from . import train_v2
        return (train_v2.main if argv[0] == "gpu-v2" else train_v2.main_export)(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["vae", "unet", "export"])
    ap.add_argument("--run", default="runs/embedded", help="folder for checkpoints, logs and sample grids")
    ap.add_argument("--steps", type=int, default=None, help="total steps of the stage (vae 2000, unet 13000)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (vae 5e-4, unet 3e-4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kl-weight", type=float, default=1e-5, help="KL term per latent element (vae)")
    ap.add_argument("--reuse", type=int, default=2, help="unet: steps each rendered+encoded batch serves")
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay of UNet/text-encoder weights")
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--x0-weight-max", type=float, default=0.0,
                    help="unet: weigh each step's loss by max(min-SNR-5, min(1/SNR, this)), i.e. as an x0 loss at high "
                         "noise, where the layout (position) is decided (0: min-SNR-5 only)")
    ap.add_argument("--schedule-from", type=int, default=None,
                    help="unet: restart the cosine lr schedule at this step (a fine-tuning stage on a finished run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--from-package", action="store_true",
                    help="unet: with no checkpoint in --run, resume from the weights committed in the package")
    ap.add_argument("--out", default=str(PACKAGE_MODEL_DIR), help="export: diffusers folder to write")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    defaults = {"vae": (2000, 5e-4), "unet": (13000, 3e-4), "export": (0, 0)}[a.stage]
    a.steps = a.steps or defaults[0]
    a.lr = a.lr or defaults[1]
    {"vae": train_vae, "unet": train_unet, "export": export}[a.stage](a)


if __name__ == "__main__":
    main()
