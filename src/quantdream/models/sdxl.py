"""Stable Diffusion XL: one new token in BOTH text encoders, trained as one vector.

SDXL reads a prompt with two CLIP text encoders (``text_encoder``: CLIP ViT-L, 768 wide; ``text_encoder_2``:
OpenCLIP ViT-bigG, 1280 wide). A learned token is a row in each table, so here theta is their concatenation:

    theta = [theta_l | theta_g]   (num_vectors, 768 + 1280 = 2048)

initialised from the init word's row in each table. ZOODiP's directions e ~ N(0, I_2048) perturb both parts at
once, and the official code's normalisation uses that d: g / sqrt((2048 + n - 1) / n) (optim/zo.py).

The UNet's conditioning is built as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` / ``__call__`` build it:

    c       = [h_l^{(-2)} | h_g^{(-2)}]          (L, 2048)  penultimate hidden states of both encoders, concatenated
    pooled  = text_encoder_2(ids_g).text_embeds  (1280,)    the projected EOS state of the second encoder
    time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) = (R, R, 0, 0, R, R)

(R the training resolution: the pipeline's defaults original_size = target_size = (height, width), crops (0, 0)).
The unconditional input of classifier-free guidance is zeros (``force_zeros_for_empty_prompt``, SDXL base's setting).

Export: ``{"clip_l": (V, 768), "clip_g": (V, 1280)}`` safetensors, the SDXL embedding format AUTOMATIC1111,
ComfyUI and kohya read; stock diffusers loads it with ``load_textual_inversion`` once per encoder
(:func:`load_into_pipeline`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..export import split
from ..methods.base import DenoisingObjective, Placeholder, add_placeholder, check_placeholder, write_rows

# Methods the scaffold trains on SDXL. The others need what only SD-1.x/2.x have here (DreamBooth's class images
# and whole-UNet export, QLoRA's bitsandbytes base and TuneQDM's timestep experts are untested on two encoders).
SDXL_METHODS = ("zoodip", "zoodip-fast", "ti", "gf-ti", "lora", "peqa")
SDXL_KEYS = ("clip_l", "clip_g")


def is_sdxl(components: dict) -> bool:
    return components.get("text_encoder_2") is not None


def check_method(method: str, model: str) -> None:
    if method not in SDXL_METHODS:
        raise ValueError(f"--method {method} does not run on SDXL models (--model {model!r}) yet; on SDXL use "
                         f"{', '.join(SDXL_METHODS)}")


# ----------------------------------------------------------------------------- the token in both encoders
@dataclass
class SDXLPlaceholder(Placeholder):
    """A placeholder token in both tokenizers; ``init_vectors`` is [clip_l | clip_g]."""

    ids_2: list[int] = field(default_factory=list)
    widths: tuple[int, int] = (768, 1280)


def widths(text_encoder, text_encoder_2) -> tuple[int, int]:
    return (text_encoder.get_input_embeddings().weight.shape[1], text_encoder_2.get_input_embeddings().weight.shape[1])


def check_sdxl_placeholder(tokenizer, text_encoder, tokenizer_2, text_encoder_2, token: str, init_word: str,
                           num_vectors: int = 1, init_vectors: torch.Tensor | None = None) -> None:
    """Validate the token for both encoders before anything changes (init word one token in each)."""
    dims = widths(text_encoder, text_encoder_2)
    if init_vectors is not None and tuple(init_vectors.shape) != (num_vectors, sum(dims)):
        raise ValueError(f"initial embedding has shape {tuple(init_vectors.shape)} but this SDXL model needs "
                         f"({num_vectors}, {sum(dims)}): clip_l {dims[0]} + clip_g {dims[1]}, {num_vectors} vector(s)")
    parts = split(init_vectors, dims) if init_vectors is not None else (None, None)
    check_placeholder(tokenizer, text_encoder, token, init_word, num_vectors, parts[0])
    check_placeholder(tokenizer_2, text_encoder_2, token, init_word, num_vectors, parts[1])


def add_sdxl_placeholder(tokenizer, text_encoder, tokenizer_2, text_encoder_2, token: str, init_word: str,
                         num_vectors: int = 1, init_vectors: torch.Tensor | None = None) -> SDXLPlaceholder:
    """The token in both tokenizers and tables, each row from the init word's row in that table."""
    check_sdxl_placeholder(tokenizer, text_encoder, tokenizer_2, text_encoder_2, token, init_word, num_vectors,
                           init_vectors)
    dims = widths(text_encoder, text_encoder_2)
    parts = split(init_vectors, dims) if init_vectors is not None else (None, None)
    p_l = add_placeholder(tokenizer, text_encoder, token, init_word, num_vectors, parts[0])
    p_g = add_placeholder(tokenizer_2, text_encoder_2, token, init_word, num_vectors, parts[1])
    return SDXLPlaceholder(token=token, tokens=p_l.tokens, ids=p_l.ids, ids_2=p_g.ids, widths=dims,
                           init_vectors=torch.cat([p_l.init_vectors, p_g.init_vectors], -1))


def identifier_placeholder_sdxl(identifier: str, class_word: str, dims: tuple[int, int]) -> SDXLPlaceholder:
    """Weight methods' prompt text ("sks bag"): nothing added, theta empty (0, 2048)."""
    words = [w for w in (identifier, class_word) if w]
    return SDXLPlaceholder(token=identifier, tokens=words, ids=[], ids_2=[], widths=dims,
                           init_vectors=torch.zeros(0, sum(dims)))


# ----------------------------------------------------------------------------- the objective
@dataclass
class XLCond:
    """SDXL's conditioning for N rows: token states (N, L, 2048) and pooled text embeddings (N, 1280)."""

    embeds: torch.Tensor
    pooled: torch.Tensor

    def __getitem__(self, sl: slice) -> "XLCond":
        return XLCond(self.embeds[sl], self.pooled[sl])

    def __len__(self) -> int:
        return self.embeds.shape[0]


def time_ids(resolution: int) -> list[int]:
    """StableDiffusionXLPipeline._get_add_time_ids at its defaults:
    original_size + crops_coords_top_left + target_size."""
    return [resolution, resolution, 0, 0, resolution, resolution]


class ConcatTable:
    """The two token tables side by side, (N, d_l + d_g), read a slice at a time (no 400 MB copy)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a, self.b = a, b
        self.shape = torch.Size((min(a.shape[0], b.shape[0]), a.shape[1] + b.shape[1]))

    def __getitem__(self, idx) -> torch.Tensor:
        return torch.cat([self.a[idx].float(), self.b[idx].float()], -1)

    def detach(self) -> "ConcatTable":
        return self

    def float(self) -> torch.Tensor:
        return self[: self.shape[0]]


class SDXLObjective(DenoisingObjective):
    """The denoising objective on SDXL: theta (K, V, d_l + d_g); the first d_l columns are spliced into
    ``text_encoder``'s lookups, the rest into ``text_encoder_2``'s; the UNet gets SDXL's added conditioning."""

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, unet, scheduler,
                 placeholder: SDXLPlaceholder, resolution: int, device="cpu", dtype=torch.float32, **kw) -> None:
        super().__init__(tokenizer, text_encoder, unet, scheduler, placeholder, device=device, dtype=dtype, **kw)
        self._hook.remove()
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.widths = widths(text_encoder, text_encoder_2)
        self.resolution = resolution
        self._pids = (self._pid, torch.tensor(placeholder.ids_2, device=self.device, dtype=torch.long))
        self._ids_cache_2: dict[str, torch.Tensor] = {}
        self._hooks = [enc.get_input_embeddings().register_forward_hook(self._splicer(part))
                       for part, enc in enumerate((text_encoder, text_encoder_2))]
        self._time_ids = torch.tensor([time_ids(resolution)], device=self.device, dtype=dtype)
        expect = unet.config.addition_time_embed_dim * 6 + text_encoder_2.config.projection_dim
        have = unet.add_embedding.linear_1.in_features
        if have != expect:
            raise ValueError(f"this SDXL UNet expects {have} added-conditioning features, but 6 time ids and the "
                             f"{text_encoder_2.config.projection_dim}-wide pooled embedding give {expect}")

    def close(self) -> None:
        for h in self._hooks:
            h.remove()

    def _splicer(self, part: int):
        lo = 0 if part == 0 else self.widths[0]
        hi = lo + self.widths[part]

        def splice(module, inputs, out):
            if self._rows is None:
                return out
            ids, pid = inputs[0], self._pids[part]
            out = out.to(torch.promote_types(out.dtype, self._rows.dtype))
            for j in range(pid.numel()):
                m = (ids == pid[j]).unsqueeze(-1)
                out = torch.where(m, self._rows[:, j, None, lo:hi].to(out.dtype), out)
            return out
        return splice

    def _ids(self, tokenizer, cache: dict, captions: list[str]) -> torch.Tensor:
        for c in captions:
            if c not in cache:
                cache[c] = tokenizer(c, padding="max_length", max_length=tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids[0]
        return torch.stack([cache[c] for c in captions]).to(self.device)

    def encode_text(self, theta: torch.Tensor, captions: list[str]) -> XLCond:
        """theta (K, V, 2048), B captions -> XLCond of K*B rows, candidate-major (StableDiffusionXLPipeline's
        encode_prompt with clip_skip None: hidden_states[-2] of each encoder, pooled from text_encoder_2)."""
        K = theta.shape[0]
        ids_l = self._ids(self.tokenizer, self._ids_cache, captions).repeat(K, 1)
        ids_g = self._ids(self.tokenizer_2, self._ids_cache_2, captions).repeat(K, 1)
        with self.spliced(theta.repeat_interleave(len(captions), 0)):
            out_l = self.text_encoder(ids_l, output_hidden_states=True)
            out_g = self.text_encoder_2(ids_g, output_hidden_states=True)
        embeds = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], -1).to(self.dtype)
        return XLCond(embeds, out_g[0].to(self.dtype))

    def unconditional(self, theta: torch.Tensor, n: int) -> XLCond:
        """Zeros, as the SDXL pipeline with ``force_zeros_for_empty_prompt`` (SDXL base) and no negative prompt."""
        c = self.encode_text(theta, [""])
        return XLCond(torch.zeros_like(c.embeds).expand(n, -1, -1), torch.zeros_like(c.pooled).expand(n, -1))

    @staticmethod
    def cat_cond(conds: list[XLCond]) -> XLCond:
        return XLCond(torch.cat([c.embeds for c in conds]), torch.cat([c.pooled for c in conds]))

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, cond: XLCond) -> torch.Tensor:
        n = z_t.shape[0]
        m = self.unet_batch if self.unet_batch > 0 else n
        out = []
        for i in range(0, n, m):
            c = cond[i:i + m]
            added = {"text_embeds": c.pooled, "time_ids": self._time_ids.expand(len(c), -1)}
            out.append(self.unet(z_t[i:i + m], t[i:i + m], c.embeds, added_cond_kwargs=added).sample)
        return torch.cat(out)

    def token_table(self) -> ConcatTable:
        return ConcatTable(self.text_encoder.get_input_embeddings().weight,
                           self.text_encoder_2.get_input_embeddings().weight)

    def write_rows(self, theta: torch.Tensor) -> None:
        theta_l, theta_g = split(theta, self.widths)
        write_rows(self.text_encoder, self.placeholder, theta_l)
        write_rows(self.text_encoder_2, Placeholder(self.placeholder.token, self.placeholder.tokens,
                                                    self.placeholder.ids_2, theta_g), theta_g)


def prepare_text_encoder_2(mcls, text_encoder_2, weights: str, config) -> None:
    """The method's ``prepare_model`` applied to the second text encoder as to the first (ZOODiP: int8)."""
    from torch import nn
    mcls.prepare_model(text_encoder_2, nn.Module(), nn.Module(), weights, config)


# ----------------------------------------------------------------------------- files
def read_sdxl(path: str | Path) -> tuple[str, torch.Tensor, torch.Tensor] | None:
    """(token, clip_l, clip_g) of an SDXL embedding file, or None if ``path`` is not one. The token is the
    file's metadata ``token`` (written by quantdream) or, as A1111 does, the file name."""
    from safetensors import safe_open
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if not set(SDXL_KEYS) <= keys:
                return None
            token = (f.metadata() or {}).get("token") or path.stem
            return token, f.get_tensor("clip_l"), f.get_tensor("clip_g")
    except Exception as e:
        raise ValueError(f"cannot read embedding file {str(path)!r}: {e}") from None


def load_into_pipeline(pipe, path: str | Path) -> list[str]:
    """Load an embedding into ``pipe`` with stock diffusers' ``load_textual_inversion``; an SDXL file
    (clip_l / clip_g) goes in once per encoder with its tokenizer. Returns the tokens added."""
    path = Path(path)
    if path.is_dir():
        from ..export import DIFFUSERS_NAME
        path = path / DIFFUSERS_NAME
    sdxl = read_sdxl(path)
    is_xl_pipe = getattr(pipe, "text_encoder_2", None) is not None
    before = len(pipe.tokenizer)
    if sdxl is None:
        if is_xl_pipe:
            raise ValueError(f"{str(path)!r} is a one-encoder embedding (SD-1.x/2.x); an SDXL model needs an "
                             f"SDXL embedding with clip_l and clip_g tensors")
        pipe.load_textual_inversion(str(path))
    else:
        token, clip_l, clip_g = sdxl
        if not is_xl_pipe:
            raise ValueError(f"{str(path)!r} is an SDXL embedding (clip_l + clip_g); load it into an SDXL model")
        pipe.load_textual_inversion(clip_l, token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(clip_g, token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    return pipe.tokenizer.convert_ids_to_tokens(list(range(before, len(pipe.tokenizer))))
