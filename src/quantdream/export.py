"""Learned-token files other programs read.

    diffusers  learned_embeds.safetensors   {token: float32 [num_vectors, d]}   (pipe.load_textual_inversion)
    A1111      <name>.pt                     {"string_to_token": {"*": 265}, "string_to_param": {"*": [n, d]},
                                              "name": token, "step": step}
    SDXL       learned_embeds.safetensors    {"clip_l": [n, 768], "clip_g": [n, 1280]}, metadata token
                                             (A1111 / ComfyUI / kohya; written by save_sdxl)

``load_embedding`` reads all four formats back (plus kohya's {"emb_params": [n, d]}); an SDXL file comes back
as [n, 768 + 1280], clip_l first.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import atomic_write

DIFFUSERS_NAME = "learned_embeds.safetensors"


def _rows(theta: torch.Tensor) -> torch.Tensor:
    theta = theta.detach().float().cpu()
    if theta.dim() == 1:
        theta = theta[None]
    if theta.dim() != 2:
        raise ValueError(f"an embedding must be [num_vectors, dim], got shape {tuple(theta.shape)}")
    return theta.contiguous()


def save_diffusers(path: str | Path, token: str, theta: torch.Tensor) -> Path:
    """Write {token: [num_vectors, d]} as safetensors (atomic). ``path`` may be a folder."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / DIFFUSERS_NAME
    rows = _rows(theta)
    atomic_write(path, lambda tmp: save_file({token: rows}, tmp))
    return path


def save_a1111(path: str | Path, token: str, theta: torch.Tensor, step: int = 0) -> Path:
    """Write an AUTOMATIC1111 embedding (.pt, the token's name is the file's ``name`` field)."""
    path = Path(path)
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": _rows(theta)}, "name": token,
            "step": int(step), "sd_checkpoint": None, "sd_checkpoint_name": None}
    atomic_write(path, lambda tmp: torch.save(data, tmp))
    return path


def load_embedding(path: str | Path) -> tuple[str | None, torch.Tensor]:
    """(token or None, [num_vectors, d]) from a diffusers, A1111 or kohya file."""
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {str(path)!r} does not exist")
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else \
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read embedding file {str(path)!r}: {e}") from None
    if isinstance(state, torch.Tensor):
        return None, _rows(state)
    if "string_to_param" in state:
        return state.get("name"), _rows(state["string_to_param"]["*"])
    if "emb_params" in state:
        return None, _rows(state["emb_params"])
    if "clip_l" in state and "clip_g" in state:   # SDXL: theta = [clip_l | clip_g] (models/sdxl.py)
        return None, torch.cat([_rows(state["clip_l"]), _rows(state["clip_g"])], -1)
    if len(state) == 1:
        token, rows = next(iter(state.items()))
        return token, _rows(rows)
    raise ValueError(f"{str(path)!r} is not an embedding file quantdream knows: expected one tensor keyed by the "
                     f"token (diffusers), 'string_to_param' (A1111) or 'emb_params' (kohya); found keys {list(state)[:5]}")


def check_embedding_fits(path: str | Path, widths: list[int], flag: str = "--embedding") -> None:
    """Refuse, with both widths named, an embedding made for another text encoder: 768 (SD-1.x),
    1024 (SD-2.x), or an SDXL clip_l/clip_g pair on a one-encoder model. ``widths``: the model's text
    encoder widths (one for SD-1.x/2.x). A damaged or foreign file is refused by :func:`load_embedding`.
    SDXL models (two widths) are left to the loader."""
    path = Path(path)
    if len(widths) != 1:
        return
    family = {768: "SD-1.x", 1024: "SD-2.x"}
    need = widths[0]
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"{flag} {str(path)!r} is not a readable safetensors file ({type(e).__name__}: "
                             f"{e}); point it at the learned_embeds.safetensors a run wrote") from None
        if "clip_l" in shapes or "clip_g" in shapes:
            pair = " + ".join(f"{k} {shapes[k][-1]}" for k in ("clip_l", "clip_g") if k in shapes)
            raise ValueError(f"{flag} {str(path)!r} is an SDXL embedding ({pair} wide, one tensor per text "
                             f"encoder), but this model has one {need}-wide text encoder "
                             f"({family.get(need, 'not SDXL')}): use it with an SDXL model")
    try:
        _, rows = load_embedding(path)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None
    if rows.shape[1] != need:
        raise ValueError(f"{flag} {str(path)!r} is {rows.shape[1]} wide ({family.get(rows.shape[1], 'another model')}) "
                         f"but this model's text encoder is {need} wide ({family.get(need, 'this model')}): use the "
                         f"embedding with the model it was learned on")


def split(theta: torch.Tensor, dims: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """theta (..., d_l + d_g) -> (theta_l (..., d_l), theta_g (..., d_g))."""
    if theta.shape[-1] != sum(dims):
        raise ValueError(f"an SDXL embedding is {dims[0]} + {dims[1]} = {sum(dims)} wide (clip_l + clip_g), "
                         f"got {theta.shape[-1]}")
    return theta[..., :dims[0]], theta[..., dims[0]:]


def save_sdxl(path: str | Path, token: str, theta: torch.Tensor, dims: tuple[int, int]) -> Path:
    """{"clip_l": (V, 768), "clip_g": (V, 1280)} safetensors (A1111 / ComfyUI / kohya SDXL embedding), the
    token's name in the file's metadata. ``path`` may be a folder (learned_embeds.safetensors in it)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / DIFFUSERS_NAME
    theta_l, theta_g = split(_rows(theta), dims)
    tensors = {"clip_l": theta_l.contiguous(), "clip_g": theta_g.contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"token": token}))
    return path
