"""Subject attribute accuracy: does a generated image show *this* subject, not just its class?

World CLIP-I rewards class shape so strongly that an image of the right class in the wrong colour can
score above one with the subject's colour. The world knows each example subject exactly (its
Fashion-MNIST item, body colour, print type, print colour: ``subject.json["object"]``), so this
metric reads those four attributes back from every generated image with plain image processing (no
learned weights, nothing shared with the generator) and compares them with the subject's own:

    mask      object pixels: CIELAB distance (Delta E*ab) > MASK_DE to every colour of the image's
              border (the sides the object does not touch), largest 4-connected component (the left
              half only for "next to a ..." prompts, whose first object ``render`` puts on the left)
    body      median CIELAB of the body cluster of two k-means clusters of the mask's inner pixels
    print     the other cluster: the smaller one (or the one lying in the object's lower 40%), when
              it covers >= PRINT_SHARE of the mask and differs from the body by >= PRINT_DE; its type from its
              layout (lower 40% -> twotone; it overlaps itself shifted one pixel along the renderer's
              stripe diagonal -> stripes; else dots)
    shape     IoU of the mask and the subject item's silhouette, each cropped to its bounding box
              and resized to SHAPE_SIDE x SHAPE_SIDE (``render`` scales the 28x28 item uniformly)

Colour differences are CIEDE2000 (Sharma, Wu & Dalal 2005) with the textile lightness weight
k_L = 2 (CIE 116 / ISO 105-J03 practice for textiles): the renderer shades each object by its item's
grey values, so lightness varies across one cloth far more than hue and chroma do.

Per image, each part is a score in [0, 1]:

    colour        ramp(dE00(body, subject body); full <= COLOUR_FULL, zero >= COLOUR_ZERO)
    print         1 if the print type read equals the subject's ("solid" when no print is read)
    print_colour  ramp(dE00(print, subject print)) as colour; 0 when no print is read
                  (left out for solid subjects)
    shape         ramp(IoU; zero <= SHAPE_ZERO, full >= SHAPE_FULL)

    subject_attr_acc = sum_k w_k * part_k / sum_k w_k,  w = WEIGHTS (colour 0.4, print 0.2,
                       print_colour 0.2, shape 0.2), over the parts that apply

and the metric is the mean over images. The subject's reference values are read the same way from a
clean render of the subject itself (large, centred, plain background in a contrasting colour), so the
reading's own biases (shading, blending at the outline) cancel. Images whose prompt names a colour for
the subject ("a red {}") are skipped: there the subject is asked to change.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

MASK_DE = 14.0        # Delta E*ab from every border colour above which a pixel is object
PRINT_SHARE = 0.06    # least share of the mask the print cluster must cover
PRINT_DE = 12.0       # least dE00 (k_L = 2) between body and print clusters
TWOTONE_LOW = 0.8     # share of print pixels in the lower 40% of the object for a two-tone read
STRIPE_OVERLAP = 0.5  # self-overlap along the stripe diagonal above which a print is stripes
COLOUR_FULL, COLOUR_ZERO = 6.0, 20.0  # dE00 ramp of the colour parts
SHAPE_ZERO, SHAPE_FULL = 0.6, 0.85     # IoU ramp of the shape part
SHAPE_SIDE = 32
WEIGHTS = {"colour": 0.4, "print": 0.2, "print_colour": 0.2, "shape": 0.2}
PARTS = tuple(WEIGHTS)


# ----------------------------------------------------------------------------- colour science
def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 (..., 3) -> CIELAB (..., 3), D65 white (IEC 61966-2-1; CIE 15)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def delta_e00(lab1: np.ndarray, lab2: np.ndarray, k_l: float = 2.0) -> np.ndarray:
    """CIEDE2000 colour difference (Sharma, Wu & Dalal 2005, eqs. 1-17), broadcasting over (..., 3)."""
    L1, a1, b1 = np.moveaxis(np.asarray(lab1, dtype=np.float64), -1, 0)
    L2, a2, b2 = np.moveaxis(np.asarray(lab2, dtype=np.float64), -1, 0)
    c_bar = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_bar ** 7 / (c_bar ** 7 + 25.0 ** 7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    dl, dc = L2 - L1, c2p - c1p
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(c1p * c2p == 0, 0.0, dh)
    d_hh = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))
    l_bar, cp_bar = (L1 + L2) / 2, (c1p + c2p) / 2
    hsum = h1p + h2p
    h_bar = np.where(c1p * c2p == 0, hsum,
                     np.where(np.abs(h1p - h2p) <= 180, hsum / 2, np.where(hsum < 360, (hsum + 360) / 2, (hsum - 360) / 2)))
    t = (1 - 0.17 * np.cos(np.radians(h_bar - 30)) + 0.24 * np.cos(np.radians(2 * h_bar))
         + 0.32 * np.cos(np.radians(3 * h_bar + 6)) - 0.20 * np.cos(np.radians(4 * h_bar - 63)))
    s_l = 1 + 0.015 * (l_bar - 50) ** 2 / np.sqrt(20 + (l_bar - 50) ** 2)
    s_c, s_h = 1 + 0.045 * cp_bar, 1 + 0.015 * cp_bar * t
    r_t = (-2 * np.sqrt(cp_bar ** 7 / (cp_bar ** 7 + 25.0 ** 7))
           * np.sin(np.radians(60 * np.exp(-(((h_bar - 275) / 25) ** 2)))))
    return np.sqrt((dl / (k_l * s_l)) ** 2 + (dc / s_c) ** 2 + (d_hh / s_h) ** 2 + r_t * (dc / s_c) * (d_hh / s_h))


# ----------------------------------------------------------------------------- reading one image
@dataclass
class ObjectReading:
    """What one image shows: the object's mask, body colour, print (type and colour, None if solid)."""
    mask: np.ndarray                    # (H, W) bool
    body_lab: np.ndarray | None         # (3,)
    print_type: str = "solid"
    print_lab: np.ndarray | None = None
    extra: dict = field(default_factory=dict)


def _largest_component(m: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a bool mask (an empty mask stays empty)."""
    h, w = m.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_n, cur = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(m)):
        if labels[y0, x0]:
            continue
        cur += 1
        stack, n = [(y0, x0)], 0
        labels[y0, x0] = cur
        while stack:
            y, x = stack.pop()
            n += 1
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < h and 0 <= xx < w and m[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = cur
                    stack.append((yy, xx))
        if n > best_n:
            best, best_n = cur, n
    return labels == best if best else np.zeros_like(m, dtype=bool)


BORDER = 4  # px: wider than half the period of every background pattern, so each side shows all its shades


def _far(lab: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Delta E*ab > MASK_DE from every one of ``colours`` (K, 3), per pixel of lab (..., 3)."""
    colours = np.unique(np.round(colours.reshape(-1, 3) / 2) * 2, axis=0)  # near-duplicates merged
    flat = lab.reshape(-1, 1, 3)
    return (np.sqrt(((flat - colours[None]) ** 2).sum(-1)).min(1) > MASK_DE).reshape(lab.shape[:-1])


def background_colours(lab: np.ndarray) -> np.ndarray:
    """The colours of the image's BORDER-px sides, leaving out a side that the object touches: one with
    > 3% of its pixels unlike every colour of the opposite side (a gradient flags both of its ends, and
    the other two sides then carry its whole range). All four sides if every one is flagged."""
    b = BORDER
    sides = [lab[:b], lab[-b:], lab[:, :b], lab[:, -b:]]  # top, bottom, left, right
    keep = [s for i, s in enumerate(sides) if _far(s, sides[i ^ 1]).mean() <= 0.03]
    return np.concatenate([s.reshape(-1, 3) for s in (keep or sides)])


def object_mask(lab: np.ndarray, left_only: bool = False) -> np.ndarray:
    """Pixels whose colour is > MASK_DE (Delta E*ab) from every background colour (:func:`background_colours`),
    largest 4-connected component."""
    m = _far(lab, background_colours(lab))
    if left_only:
        m[:, lab.shape[1] // 2:] = False
    return _largest_component(m)


def _erode(m: np.ndarray) -> np.ndarray:
    """4-neighbour erosion: drops the outline, where object and background blend."""
    e = m.copy()
    e[1:] &= m[:-1]
    e[:-1] &= m[1:]
    e[:, 1:] &= m[:, :-1]
    e[:, :-1] &= m[:, 1:]
    return e


def _two_means(x: np.ndarray, iters: int = 12) -> np.ndarray:
    """k-means with k = 2 on rows of x (N, D); returns bool (N,), True for the second cluster. Starts
    from the point farthest from the median and the point farthest from that one."""
    med = np.median(x, 0)
    a = x[np.argmax(((x - med) ** 2).sum(1))]
    b = x[np.argmax(((x - a) ** 2).sum(1))]
    lab = np.zeros(len(x), dtype=bool)
    for _ in range(iters):
        lab = ((x - b) ** 2).sum(1) < ((x - a) ** 2).sum(1)
        if lab.all() or not lab.any():
            break
        a, b = x[~lab].mean(0), x[lab].mean(0)
    return lab


def _low_row(mask: np.ndarray) -> int:
    """First row of the object's lower 40% (the renderer's two-tone print covers its lower third)."""
    ys = np.nonzero(mask)[0]
    return int(ys.min() + 0.6 * (ys.max() - ys.min() + 1))


def _print_type(pm: np.ndarray, mask: np.ndarray) -> str:
    """Layout of the print pixels ``pm`` inside the object ``mask`` -> twotone / stripes / dots."""
    low = pm[_low_row(mask):].sum() / max(pm.sum(), 1)
    if low >= TWOTONE_LOW:
        return "twotone"
    shifted = np.zeros_like(pm)
    shifted[1:, :-1] = pm[:-1, 1:]  # one pixel along x + y = const, the renderer's stripe direction
    overlap = (pm & shifted).sum() / max(pm.sum(), 1)
    return "stripes" if overlap >= STRIPE_OVERLAP else "dots"


def read_object(image: np.ndarray, left_only: bool = False) -> ObjectReading:
    """Read one uint8 (H, W, 3) image: object mask, body colour, print type and colour."""
    lab = rgb_to_lab(image)
    mask = object_mask(lab, left_only)
    if mask.sum() < 12:  # nothing stands out from the background
        return ObjectReading(mask=mask, body_lab=None)
    inner = _erode(mask)
    if inner.sum() < 12:
        inner = mask
    px = lab[inner]
    weighted = px * np.array([0.5, 1.0, 1.0])  # lightness counts less: shading is not a print
    second = _two_means(weighted)
    low = np.nonzero(inner)[0] >= _low_row(mask)
    in_low = [low[~second].mean() if (~second).any() else 0.0, low[second].mean() if second.any() else 0.0]
    if in_low[0] >= TWOTONE_LOW > in_low[1]:  # a two-tone print may cover more than half of some items
        second = ~second
    elif not in_low[1] >= TWOTONE_LOW > in_low[0] and second.sum() > len(px) / 2:
        second = ~second  # otherwise the print is the smaller cluster
    body = np.median(px[~second], 0)
    share = second.mean()
    if second.any() and share >= PRINT_SHARE:
        prt = np.median(px[second], 0)
        if float(delta_e00(body, prt)) >= PRINT_DE:
            pm = np.zeros(mask.shape, dtype=bool)
            pm[inner] = second
            return ObjectReading(mask=mask, body_lab=body, print_type=_print_type(pm, mask), print_lab=prt,
                                 extra={"print_share": float(share)})
    return ObjectReading(mask=mask, body_lab=body)


def _canonical(m: np.ndarray) -> np.ndarray:
    """A silhouette cropped to its bounding box and resized to SHAPE_SIDE^2 (bool)."""
    ys, xs = np.nonzero(m)
    crop = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.uint8) * 255
    return np.asarray(Image.fromarray(crop).resize((SHAPE_SIDE, SHAPE_SIDE), Image.BILINEAR)) >= 128


def shape_iou(mask: np.ndarray, silhouette: np.ndarray) -> float:
    """IoU of two silhouettes after each is cropped to its box and resized to the same square."""
    if not mask.any() or not silhouette.any():
        return 0.0
    a, b = _canonical(mask), _canonical(silhouette)
    return float((a & b).sum() / max((a | b).sum(), 1))


# ----------------------------------------------------------------------------- the subject's own values
@dataclass
class SubjectTruth:
    body_lab: np.ndarray
    print_type: str
    print_lab: np.ndarray | None
    silhouette: np.ndarray  # (28, 28) bool: the item as the renderer's alpha > 0.5 sees it


def subject_truth(obj: dict, items: np.ndarray) -> SubjectTruth:
    """Read the subject's object from a clean render of it (large, centred, plain background whose
    colour is the palette colour farthest from the object's), so reference and images are read alike."""
    from ..world.render import COLOURS, COLOUR_NAMES, Obj, Scene, render
    o = Obj(**{k: tuple(v) if isinstance(v, list) else v for k, v in obj.items()})
    body_rgb = np.asarray(o.rgb if o.rgb is not None else COLOURS[COLOUR_NAMES[o.colour]], dtype=np.float64)
    bg = max(range(len(COLOUR_NAMES)), key=lambda c: delta_e00(rgb_to_lab(body_rgb), rgb_to_lab(COLOURS[COLOUR_NAMES[c]])))
    img = render(Scene(objects=[o], size=1, position=0, bg_pattern=0, bg_colour=bg), items)
    r = read_object(img)
    grey = items[o.item].astype(np.float32) / 255.0
    silhouette = np.clip((grey - 0.03) * 5.0, 0, 1) > 0.5  # render's alpha
    if r.body_lab is None:
        raise ValueError(f"subject object {obj!r} cannot be read from its own render")
    # the print type is known exactly; its colour is read (shaded as in any image)
    prt = o.print if o.print != "solid" else "solid"
    plab = r.print_lab if prt != "solid" else None
    if prt != "solid" and plab is None:
        plab = rgb_to_lab(np.asarray(o.print_rgb, dtype=np.float64))
    return SubjectTruth(body_lab=r.body_lab, print_type=prt, print_lab=plab, silhouette=silhouette)


# ----------------------------------------------------------------------------- scores
def _ramp_down(x: float, full: float, zero: float) -> float:
    return float(np.clip((zero - x) / (zero - full), 0.0, 1.0))


def image_parts(reading: ObjectReading, truth: SubjectTruth) -> dict:
    """Per-image part scores in [0, 1] and the raw readings (dE00s, IoU, print type)."""
    if reading.body_lab is None:
        parts = {"colour": 0.0, "print": 0.0, "shape": 0.0}
        if truth.print_type != "solid":
            parts["print_colour"] = 0.0
        return {"parts": parts, "delta_e_body": None, "delta_e_print": None, "iou": 0.0, "print_read": None}
    de_body = float(delta_e00(reading.body_lab, truth.body_lab))
    iou = shape_iou(reading.mask, truth.silhouette)
    parts = {"colour": _ramp_down(de_body, COLOUR_FULL, COLOUR_ZERO),
             "print": float(reading.print_type == truth.print_type),
             "shape": float(np.clip((iou - SHAPE_ZERO) / (SHAPE_FULL - SHAPE_ZERO), 0, 1))}
    de_print = None
    if truth.print_type != "solid":
        if reading.print_lab is not None:
            de_print = float(delta_e00(reading.print_lab, truth.print_lab))
            parts["print_colour"] = _ramp_down(de_print, COLOUR_FULL, COLOUR_ZERO)
        else:
            parts["print_colour"] = 0.0
    return {"parts": parts, "delta_e_body": de_body, "delta_e_print": de_print, "iou": iou,
            "print_read": reading.print_type}


def combine(parts: dict) -> float:
    """Weighted mean of the parts that apply (WEIGHTS)."""
    w = sum(WEIGHTS[k] for k in parts)
    return sum(WEIGHTS[k] * v for k, v in parts.items()) / w


def subject_attribute_accuracy(images: np.ndarray, subject_object: dict, items: np.ndarray,
                               left_only: list[bool] | None = None) -> dict:
    """Score uint8 images (N, H, W, 3) against the subject's object record (``subject.json["object"]``).

    Returns ``subject_attr_acc`` (mean combined score), the mean of each part, ``delta_e_body`` (mean
    dE00 of the body colour), ``iou`` (mean shape IoU), ``print_read`` (count of each print type read)
    and ``n`` (images scored)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"subject_attribute_accuracy needs uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ValueError("subject_attribute_accuracy needs at least one image")
    truth = subject_truth(subject_object, items)
    left_only = left_only or [False] * len(images)
    per = [image_parts(read_object(im, lo), truth) for im, lo in zip(images, left_only)]
    out = {"subject_attr_acc": float(np.mean([combine(p["parts"]) for p in per])), "n": len(per)}
    for k in PARTS:
        vals = [p["parts"][k] for p in per if k in p["parts"]]
        if vals:
            out[f"attr_{k}"] = float(np.mean(vals))
    des = [p["delta_e_body"] for p in per if p["delta_e_body"] is not None]
    out["delta_e_body"] = float(np.mean(des)) if des else None
    out["iou"] = float(np.mean([p["iou"] for p in per]))
    reads = [p["print_read"] or "none" for p in per]
    out["print_read"] = {t: reads.count(t) for t in sorted(set(reads))}
    return out


def subject_items(subject: dict) -> np.ndarray | None:
    """The item array of the subject's Fashion-MNIST split, or None when the subject is not a world
    object (no ``object`` record) or the data set is not on disk."""
    if not isinstance(subject.get("object"), dict):
        return None
    from ..world.fmnist import load_fmnist
    try:
        return load_fmnist(subject.get("fmnist_split", "test"))[0]
    except FileNotFoundError:
        return None


# ----------------------------------------------------------------------------- hand-made cases
OTHER_PRINT = {"solid": "stripes", "stripes": "dots", "dots": "twotone", "twotone": "stripes"}


def contrast_cases(subject: dict, items: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Renders that should rank from the subject's own photos down to its class word alone, each in the
    scenes of the subject's photos (same backgrounds, positions, sizes) and seeded:

        photos        the subject itself
        other_item    its colouring and print on another item of its class
        wrong_print   its item and body colour, another print (solid -> stripes)
        wrong_colour  its item and print, body in the palette colour farthest from its own
        class_word    another item of its class, a palette colour and a random print (what the class
                      word alone draws)
    """
    from ..world.render import COLOURS, COLOUR_NAMES, PRINTS, Scene, render
    rng = np.random.default_rng(seed)
    obj = subject["object"]
    same_cls = [int(i) for i in np.flatnonzero(labels == obj["cls"]) if i != obj["item"]]
    body = rgb_to_lab(np.asarray(obj["rgb"], dtype=np.float64))
    far = max(COLOUR_NAMES, key=lambda c: float(delta_e00(body, rgb_to_lab(COLOURS[c]))))
    out: dict[str, list] = {k: [] for k in ("photos", "other_item", "wrong_print", "wrong_colour", "class_word")}
    for p in subject["photos"]:
        scene = Scene.from_dict(p["scene"])
        o = scene.objects[0]

        def with_obj(**kw) -> np.ndarray:
            s = Scene.from_dict(scene.to_dict())
            for k, v in kw.items():
                setattr(s.objects[0], k, v)
            return render(s, items)

        out["photos"].append(render(scene, items))
        out["other_item"].append(with_obj(item=int(rng.choice(same_cls))))
        out["wrong_print"].append(with_obj(print=OTHER_PRINT[o.print], print_rgb=o.print_rgb or (245, 245, 245)))
        out["wrong_colour"].append(with_obj(rgb=COLOURS[far], colour=COLOUR_NAMES.index(far)))
        c = int(rng.integers(len(COLOUR_NAMES)))
        pr = str(rng.choice(PRINTS))
        out["class_word"].append(with_obj(item=int(rng.choice(same_cls)), colour=c, rgb=COLOURS[COLOUR_NAMES[c]],
                                          print=pr, print_rgb=COLOURS[COLOUR_NAMES[(c + 5) % 10]]))
    return {k: np.stack(v) for k, v in out.items()}
