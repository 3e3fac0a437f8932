"""Does an autoencoder's latent still hold an object's class? A probe on latent crops vs the same probe on pixels.

The reader reads small objects' class worse on an autoencoder's reconstructions than on the renders
(``v2_progress.py --autoencoder-only``). That loss is either in the encoder (the latent no longer holds the
class: only a new autoencoder, with more latent resolution or channels, brings it back) or in the decoder (the
latent holds it and the decoder draws it badly: a decoder trained further on the same latents brings it back,
and a UNet trained on those latents keeps its training). This study tells the two apart.

For each rendered scene it crops every object's box (where the renderer put it, ``object_placements``): from the
latent (box / 4, resized to 8x8, all latent channels) and from the render (resized to 32x32). One small CNN per
view learns the class from train-split scenes. On test-split scenes the latent probe is scored on latent crops,
the pixel probe on render crops and, like the reader, on the same crops of the reconstructions. Accuracies by
object size:

    python benchmarks/studies/latent_probe.py MODEL --train 12000 --test 2000 --threads 1

Prints one JSON object. If the latent probe matches the pixel probe on renders where the pixel probe on
reconstructions falls behind, the class is in the latent and the decoder loses it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LATENT_CROP, PIXEL_CROP = 8, 32


def scenes_and_renders(split: str, n: int, seed: int):
    """``n`` scenes of ``split`` and their renders (uint8, N x 64 x 64 x 3)."""
    from quantdream.world.fmnist import load_fmnist
    from quantdream.world.render import render_batch, sample_scene
    items, labels = load_fmnist(split)
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, labels, split=split) for _ in range(n)]
    return scenes, render_batch(scenes, items)


def object_crops(scenes) -> list[tuple[int, int, int, int, int, str]]:
    """(scene index, x0, y0, side, class, size key) of every object, where ``render`` put it."""
    from quantdream.world.render import SIZES, object_placements
    out = []
    for i, s in enumerate(scenes):
        key = SIZES[s.size] if len(s.objects) == 1 else "two objects"
        out += [(i, x0, y0, side, obj.cls, key) for obj, (x0, y0, side) in zip(s.objects, object_placements(s))]
    return out


def crop(x: torch.Tensor, boxes, scale: int, size: int) -> torch.Tensor:
    """Crops of ``x`` (N, C, H, W) at the pixel ``boxes`` divided by ``scale``, each resized to ``size``."""
    out = []
    for i, x0, y0, side, _, _ in boxes:
        a, b = x0 // scale, y0 // scale
        e, f = -(-(x0 + side) // scale), -(-(y0 + side) // scale)
        out.append(F.interpolate(x[i:i + 1, :, b:f, a:e], size=(size, size), mode="bilinear", align_corners=False))
    return torch.cat(out)


def encode(vae, imgs: np.ndarray, decode: bool, batch: int = 100):
    """Posterior means of ``imgs`` (and their reconstructions if ``decode``)."""
    lat, rec = [], []
    with torch.no_grad():
        for k in range(0, len(imgs), batch):
            x = torch.from_numpy(imgs[k:k + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
            m = vae.encode(x).latent_dist.mode()
            lat.append(m)
            if decode:
                rec.append(vae.decode(m).sample.clamp(-1, 1))
    return torch.cat(lat), torch.cat(rec) if decode else None


def probe(channels: int, size: int) -> nn.Module:
    """A small CNN: a stride-2 stem per halving down to 8x8, two 3x3 convolutions, a linear read-out."""
    stem = []
    c = channels
    while size > LATENT_CROP:
        stem += [nn.Conv2d(c, 64, 3, stride=2, padding=1), nn.GELU()]
        c, size = 64, size // 2
    return nn.Sequential(*stem, nn.Conv2d(c, 64, 3, padding=1), nn.GELU(), nn.Conv2d(64, 64, 3, padding=1), nn.GELU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 16, 10))


def fit(xtr, ytr, epochs: int, seed: int):
    """The probe trained on ``xtr`` (standardized per channel); returns a function of test crops to class ids."""
    torch.manual_seed(seed)
    mu, sd = xtr.mean((0, 2, 3), keepdim=True), xtr.std((0, 2, 3), keepdim=True) + 1e-6
    xtr = (xtr - mu) / sd
    net = probe(xtr.shape[1], xtr.shape[-1])
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * -(-len(xtr) // 128))
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(xtr)).split(128):
            loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()

    def predict(x):
        with torch.no_grad():
            return net((x - mu) / sd).argmax(1)
    return predict


def score(pred, yte, keys) -> dict:
    hit = (pred == yte).numpy()
    keys = np.asarray(keys)
    return {"all": round(float(hit.mean()), 3), **{k: round(float(hit[keys == k].mean()), 3) for k in sorted(set(keys))}}


def views(vae, scenes, imgs, decode: bool):
    """The crops of every object (latent, render and, if ``decode``, reconstruction), their classes and size keys."""
    boxes = object_crops(scenes)
    lat, rec = encode(vae, imgs, decode)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = {"latent": crop(lat, boxes, 4, LATENT_CROP), "render": crop(x, boxes, 1, PIXEL_CROP)}
    if decode:
        out["reconstruction"] = crop(rec, boxes, 1, PIXEL_CROP)
    return out, torch.tensor([b[4] for b in boxes]), [b[5] for b in boxes]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a diffusers folder with a vae/ (an exported v2 run, or the embedded v1)")
    ap.add_argument("--train", type=int, default=12000, help="train-split scenes the probes learn from")
    ap.add_argument("--test", type=int, default=2000, help="test-split scenes they are scored on")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not (Path(a.model) / "vae" / "config.json").is_file():
        ap.error(f"no autoencoder (vae/config.json) in {a.model}")
    torch.set_num_threads(a.threads)
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(str(Path(a.model) / "vae")).float().eval()
    t0 = time.time()
    tr, ytr, _ = views(vae, *scenes_and_renders("train", a.train, a.seed), decode=False)
    te, yte, keys = views(vae, *scenes_and_renders("test", a.test, a.seed + 1), decode=True)
    res = {"model": Path(a.model).name, "train_scenes": a.train, "test_scenes": a.test, "epochs": a.epochs,
           "test_objects": {k: keys.count(k) for k in sorted(set(keys))}}
    pixel, latent = fit(tr["render"], ytr, a.epochs, a.seed), fit(tr["latent"], ytr, a.epochs, a.seed)
    res["class_accuracy"] = {"pixel probe on renders": score(pixel(te["render"]), yte, keys),
                             "pixel probe on reconstructions": score(pixel(te["reconstruction"]), yte, keys),
                             "latent probe on latents": score(latent(te["latent"]), yte, keys)}
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
