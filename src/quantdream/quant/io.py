"""Quantized model folders: write and read low-bit components without float staging.

Layout of a folder written by :func:`save_quantized`::

    DIR/quantdream.json                    format, version, components, how they were quantized
    DIR/<module>/config.json               the component's own config (diffusers / transformers)
    DIR/<module>/quantized.safetensors     codes, scales, zero-points, float tensors
    DIR/<other>/...                        tokenizer / scheduler via their save_pretrained

The safetensors files are written and read one tensor at a time (no second in-memory copy), and
:func:`load_quantized` builds each module on the meta device, swaps in empty quantized layers, then
reads every tensor straight into its final buffer, so the load peak is the quantized size.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .activations import ActQuantizer, activation_spec, apply_activation_spec
from .apply import quantized_layers
from .modules import QConv2d, QLinear, QuantizedLayer

logger = logging.getLogger(__name__)

FORMAT = "quantdream-quantized"
FORMAT_VERSION = 1
INDEX = "quantdream.json"
WEIGHTS = "quantized.safetensors"
LIBRARIES = ("diffusers", "transformers")

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# -- safetensors, streamed ------------------------------------------------------------------------
def write_safetensors(path: str | os.PathLike, tensors: Sequence[tuple[str, torch.Tensor]],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write a standard safetensors file tensor by tensor; returns the file size in bytes."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _, t in tensors:
            t = t.detach().to("cpu").contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return 8 + len(hb) + offset


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """``(header, data_start)``; a ValueError in plain words for anything that is not safetensors."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ValueError(f"{path} is not a safetensors file (header is not JSON)") from None
    for name, e in header.items():
        if name == "__metadata__":
            continue
        a, b = e["data_offsets"]
        if e["dtype"] not in _ST_NAMES or not 0 <= a <= b or 8 + n + b > size:
            raise ValueError(f"{path} is truncated or corrupt (tensor {name!r})")
    return header, 8 + n


def _map_tensor(path: Path, data_start: int, entry: dict) -> torch.Tensor:
    """The tensor as a private (copy-on-write) memory map of the file: a page becomes resident only
    when it is read, so a lookup table costs the rows a prompt touches, not the whole table."""
    a, b = entry["data_offsets"]
    if b == a:
        return torch.empty(entry["shape"], dtype=_ST_NAMES[entry["dtype"]])
    raw = np.memmap(path, dtype=np.uint8, mode="c", offset=data_start + a, shape=(b - a,))
    return torch.from_numpy(raw).view(_ST_NAMES[entry["dtype"]]).reshape(entry["shape"])


def _read_tensor(f, data_start: int, entry: dict) -> torch.Tensor:
    t = torch.empty(entry["shape"], dtype=_ST_NAMES[entry["dtype"]])
    a, b = entry["data_offsets"]
    if b > a:
        buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        f.seek(data_start + a)
        got = 0
        while got < b - a:
            k = f.readinto(buf[got:])
            if not k:
                raise ValueError(f"{f.name} ended early while reading a tensor")
            got += k
    return t


# -- helpers ------------------------------------------------------------------------------------------
def _library(model: nn.Module) -> str:
    return type(model).__module__.split(".")[0]


def _model_config(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    if _library(model) == "transformers":
        return cfg.to_dict()
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cfg).items()}


def _tensors(model: nn.Module):
    """Every (name, tensor, is_param, owner, local_name), non-persistent buffers included."""
    for mname, mod in model.named_modules():
        for kind, table in (("param", mod._parameters), ("buffer", mod._buffers)):
            for tname, t in table.items():
                if t is not None:
                    yield (f"{mname}.{tname}" if mname else tname), t, kind == "param", mod, tname


def _keeps_fp32(owner: nn.Module, tname: str) -> bool:
    """Quantizer metadata (scales, zero-points) is stored and kept in float32."""
    return isinstance(owner, (QuantizedLayer, ActQuantizer)) and tname in ("scale", "zero")


def _resolve_class(library: str, name: str) -> type:
    if library not in LIBRARIES:
        raise ValueError(f"component class from library {library!r}; quantized folders hold only "
                         f"{' / '.join(LIBRARIES)} models")
    mod = __import__(library)
    cls = getattr(mod, name, None)
    if not isinstance(cls, type):
        raise ValueError(f"{library} has no class {name!r} (written by a newer {library}?)")
    return cls


def _check_module(name: str, model: nn.Module) -> None:
    if _library(model) not in LIBRARIES or getattr(model, "config", None) is None:
        raise ValueError(f"component {name!r} is a {type(model).__name__}; save_quantized stores diffusers or "
                         "transformers models (classes with a .config), so it can rebuild them")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError(f"component {name!r} still has tensors on the meta device")


# -- save ------------------------------------------------------------------------------------------------
def save_quantized(components: Mapping[str, Any], out_dir: str | os.PathLike, config: Mapping | None = None, *,
                   float_dtype: torch.dtype | str | None = None, overwrite: bool = False) -> Path:
    """Write ``components`` (quantized or float ``nn.Module`` s, plus tokenizers / schedulers with
    ``save_pretrained``) to ``out_dir``. ``config`` is free-form provenance stored in quantdream.json
    (source model, weights, acts...). ``float_dtype`` ("fp16", "bf16", ...) stores the non-quantized
    tensors (embeddings, norms, biases) narrower; scales always stay float32.

    Written into a temporary sibling folder and renamed at the end: a failure leaves nothing behind.
    """
    from .. import __version__
    out_dir = Path(out_dir)
    if isinstance(float_dtype, str):
        if float_dtype not in FLOAT_DTYPES:
            raise ValueError(f"float dtype {float_dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
        float_dtype = FLOAT_DTYPES[float_dtype]
    if not components:
        raise ValueError("no components to save")
    for name, comp in components.items():
        if not name or "/" in name or name.startswith(".") or name == INDEX:
            raise ValueError(f"component name {name!r} cannot be a folder name")
        if isinstance(comp, nn.Module):
            _check_module(name, comp)
        elif not hasattr(comp, "save_pretrained"):
            raise ValueError(f"component {name!r} ({type(comp).__name__}) is neither a model nor has save_pretrained")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ValueError(f"{out_dir} exists and is not empty; choose another --out or pass --overwrite")
    try:
        json.dumps(dict(config or {}))
    except TypeError as e:
        raise ValueError(f"config must be JSON-serializable: {e}") from None
    # -- checks done; write --
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        index = {"format": FORMAT, "format_version": FORMAT_VERSION, "quantdream_version": __version__,
                 "config": dict(config or {}), "components": {}}
        for name, comp in components.items():
            sub = stage / name
            sub.mkdir()
            if not isinstance(comp, nn.Module):
                comp.save_pretrained(str(sub))
                index["components"][name] = {"type": "pretrained", "library": type(comp).__module__.split(".")[0],
                                             "class": type(comp).__name__}
                continue
            (sub / "config.json").write_text(json.dumps(_model_config(comp), indent=2, default=str) + "\n")
            tensors = []
            for key, t, _, owner, tname in _tensors(comp):
                if float_dtype is not None and t.is_floating_point() and not _keeps_fp32(owner, tname):
                    if t.dtype != float_dtype and torch.isfinite(t.detach().to(float_dtype)).all():
                        t = t.detach().to(float_dtype)  # (one tensor at a time)
                tensors.append((key, t))
            nbytes = write_safetensors(sub / WEIGHTS, tensors, {"format": FORMAT, "format_version": str(FORMAT_VERSION)})
            del tensors
            layers = {n: {"kind": "conv2d" if isinstance(m, QConv2d) else "linear", "bits": m.bits,
                          "group_size": m.group_size} for n, m in quantized_layers(comp)}
            index["components"][name] = {
                "type": "module", "library": _library(comp), "class": type(comp).__name__,
                "layers": layers, "activations": activation_spec(comp), "bytes": nbytes,
                "float_dtype": str(float_dtype).replace("torch.", "") if float_dtype else None}
        (stage / INDEX).write_text(json.dumps(index, indent=2, default=str) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out_dir


# -- load -------------------------------------------------------------------------------------------------
def _component_config(path: Path, name: str) -> dict | None:
    f = path / name / "config.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{f} is not valid JSON") from None


def check_architecture(path: str | os.PathLike, embedded_dir: str | os.PathLike | None = None) -> None:
    """A quantized folder must be one model: its parts' configs agree with each other (the UNet's
    cross-attention width is the text encoder's width, or the sum of both on SDXL; the UNet's input
    channels are the autoencoder's latent channels), and a folder whose recorded source is the embedded
    model (``embedded_dir``) has the embedded model's UNet. Reads configs only (cheap); the tensors are
    checked against the configs when loading."""
    path = Path(path)
    unet, te, te2, vae = (_component_config(path, n) for n in ("unet", "text_encoder", "text_encoder_2", "vae"))
    redo = "re-run `quantdream quantize` on one diffusers pipeline folder"
    if unet and te:
        width = te.get("hidden_size", 0) + (te2.get("hidden_size", 0) if te2 else 0)
        if unet.get("cross_attention_dim") != width:
            parts = f"{te.get('hidden_size')}" + (f" + {te2.get('hidden_size')}" if te2 else "")
            raise ValueError(f"{path} mixes architectures: its UNet reads {unet.get('cross_attention_dim')}-wide "
                             f"text but its text encoder(s) give {parts}; {redo}")
    if unet and vae and unet.get("in_channels") != vae.get("latent_channels"):
        raise ValueError(f"{path} mixes architectures: its UNet takes {unet.get('in_channels')} latent channels but "
                         f"its autoencoder makes {vae.get('latent_channels')}; {redo}")
    source = read_index(path)["config"].get("source")
    if embedded_dir is not None and unet and source and Path(source).resolve() == Path(embedded_dir).resolve():
        ref = json.loads((Path(embedded_dir) / "unet" / "config.json").read_text())
        keys = ("sample_size", "cross_attention_dim", "block_out_channels", "in_channels")
        diff = [k for k in keys if unet.get(k) != ref.get(k)]
        if diff:
            raise ValueError(f"{path} says it was made from the embedded model ('tiny') but its UNet is another "
                             f"architecture ({', '.join(f'{k} {unet.get(k)} vs {ref.get(k)}' for k in diff)}); {redo}")


class DroppedModule(nn.Module):
    """Stands in for a submodule that ``load_quantized(..., drop=...)`` did not load."""

    def __init__(self, name: str, why: str = "was not loaded (load_quantized(drop=...)); load it to use it"):
        super().__init__()
        self.dropped_name, self.why = name, why

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.dropped_name} {self.why}")


def read_index(path: str | os.PathLike) -> dict:
    """Validate ``path`` as a quantized folder and return its quantdream.json."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; a quantized model is a folder written by `quantdream quantize`")
    if not (path / INDEX).is_file():
        if (path / "model_index.json").is_file():
            raise ValueError(f"{path} is a float diffusers pipeline, not a quantized folder; quantize it with "
                             f"`quantdream quantize --model {path} --weights int8 --out DIR`, or pass it with --weights")
        raise ValueError(f"{path} has an unknown folder layout: expected {INDEX} (a folder written by "
                         "`quantdream quantize`) or model_index.json (a diffusers pipeline)")
    try:
        index = json.loads((path / INDEX).read_text())
    except ValueError:
        raise ValueError(f"{path / INDEX} is not valid JSON") from None
    if index.get("format") != FORMAT:
        raise ValueError(f"{path / INDEX} is not a quantdream quantized-model index (format={index.get('format')!r})")
    if index.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} was written with quantized-folder format version {index.get('format_version')} "
                         f"(quantdream {index.get('quantdream_version', '?')}); this quantdream reads version "
                         f"{FORMAT_VERSION}. Re-run `quantdream quantize` on the float model")
    return index


def _build_meta(name: str, entry: dict, folder: Path) -> nn.Module:
    cls = _resolve_class(entry["library"], entry["class"])
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"component {name!r}: {cfg_path} is missing")
    config = json.loads(cfg_path.read_text())
    with torch.device("meta"):
        if entry["library"] == "diffusers":
            model = cls.from_config(config)
        else:
            model = cls(cls.config_class.from_dict(config))
    for lname, spec in entry.get("layers", {}).items():
        path, _, attr = lname.rpartition(".")
        try:
            parent = model.get_submodule(path) if path else model
            orig = getattr(parent, attr)
        except AttributeError:
            raise ValueError(f"component {name!r}: quantized layer {lname!r} does not exist in {entry['class']}") from None
        qcls = {"linear": QLinear, "conv2d": QConv2d}.get(spec["kind"])
        if qcls is None or not isinstance(orig, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"component {name!r}: cannot rebuild layer {lname!r} of kind {spec['kind']!r}")
        setattr(parent, attr, qcls.from_module(orig, spec["bits"], spec["group_size"], quantize=False))
    if entry.get("activations"):
        apply_activation_spec(model, entry["activations"])
    return model


def _drop(model: nn.Module, names: Sequence[str], component: str) -> list[str]:
    prefixes = []
    for n in names:
        path, _, attr = n.rpartition(".")
        try:
            parent = model.get_submodule(path) if path else model
            getattr(parent, attr)
        except AttributeError:
            raise ValueError(f"drop: {component} has no submodule {n!r}") from None
        setattr(parent, attr, DroppedModule(f"{component}.{n}"))
        prefixes.append(n + ".")
    return prefixes


def widen_lookups(embedding: nn.Embedding, dtype: torch.dtype) -> None:
    """Keep ``embedding``'s table in its (narrower) dtype and cast each lookup to ``dtype``."""
    def hook(module, inputs, out):
        return out.to(dtype)
    embedding.register_forward_hook(hook)


def load_quantized(path: str | os.PathLike, components: Sequence[str] | None = None, *,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   drop: Mapping[str, Sequence[str]] | None = None, narrow_embeddings: bool = False) -> dict:
    """Load a folder written by :func:`save_quantized` -> ``{name: component}``.

    components: which to load (default all). dtype: float tensors other than scales (embeddings,
    norms, biases). narrow_embeddings: embedding tables stay as stored and each lookup is cast to
    ``dtype`` (the same numbers as casting the table: a cast is elementwise); on CPU the table is a
    private memory map of the file, so only the pages of the rows a prompt reads become resident (CLIP's
    49,408 x 768 fp16 token table: a few KiB instead of 72 MiB) and writing a row never touches the
    file; the module gets ``mapped_from`` (the file). The model's ``.dtype`` (its first parameter's) then
    reads the table's dtype, which stock pipelines cast prompts to; so only for callers that set their
    own compute dtype (personalize's objective, the benchmarks). drop: submodules not to load, e.g.
    ``{"vae": ["decoder", "post_quant_conv"]}`` for an encoder-only VAE. Every check (layout, version,
    classes, tensor names and shapes) runs
    before any tensor is allocated.
    """
    path = Path(path)
    index = read_index(path)
    entries = index["components"]
    names = list(entries) if components is None else list(components)
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise ValueError(f"{path} has no component(s) {unknown}; it holds {', '.join(entries)}")
    for n in (drop or {}):
        if n not in names:
            raise ValueError(f"drop names component {n!r}, which is not being loaded")
    plans = {}
    for name in names:
        entry = entries[name]
        if entry.get("type") == "pretrained":
            plans[name] = ("pretrained", _resolve_class(entry["library"], entry["class"]))
            continue
        model = _build_meta(name, entry, path / name)
        prefixes = _drop(model, (drop or {}).get(name, []), name)
        wfile = path / name / WEIGHTS
        if not wfile.is_file():
            raise ValueError(f"component {name!r}: {wfile} is missing")
        header, start = read_safetensors_header(wfile)
        expected = {k: (t, own, tn, is_p) for k, t, is_p, own, tn in _tensors(model)}
        stored = {k for k in header if k != "__metadata__" and not any(k.startswith(p) for p in prefixes)}
        missing, extra = sorted(set(expected) - stored), sorted(stored - set(expected))
        if missing or extra:
            raise ValueError(f"component {name!r} in {path} does not match its {entry['class']} config: "
                             f"{len(missing)} tensors missing (e.g. {missing[:3]}), {len(extra)} unexpected "
                             f"(e.g. {extra[:3]}): its weights come from another architecture than "
                             f"{name}/config.json describes; re-run `quantdream quantize`")
        for k, (t, *_rest) in expected.items():
            e = header[k]
            if tuple(e["shape"]) != tuple(t.shape):
                raise ValueError(f"component {name!r}: tensor {k} is {tuple(e['shape'])} in the file, "
                                 f"{tuple(t.shape)} in the model: its weights come from another architecture "
                                 f"than {name}/config.json describes; re-run `quantdream quantize`")
            if _ST_NAMES[e["dtype"]].is_floating_point != t.is_floating_point():
                raise ValueError(f"component {name!r}: tensor {k} is {e['dtype']} in the file, {t.dtype} in the model")
        plans[name] = ("module", model, wfile, header, start, expected)
    # -- checks done; allocate and read --
    out = {}
    for name in names:
        plan = plans[name]
        if plan[0] == "pretrained":
            out[name] = plan[1].from_pretrained(str(path / name))
            continue
        _, model, wfile, header, start, expected = plan
        with open(wfile, "rb") as f:
            for key, (_, owner, tname, is_param) in expected.items():
                e = header[key]
                stored = _ST_NAMES[e["dtype"]]
                on_cpu = torch.device(device).type == "cpu"
                if narrow_embeddings and isinstance(owner, nn.Embedding) and stored.is_floating_point \
                        and (on_cpu or stored.itemsize <= dtype.itemsize):
                    # the table stays as stored (casting each lookup = casting the table); on CPU it is
                    # mapped, so only the rows read become resident
                    t = _map_tensor(wfile, start, e) if on_cpu else _read_tensor(f, start, e)
                    if on_cpu:
                        owner.mapped_from = str(wfile)
                    if stored != dtype:
                        widen_lookups(owner, dtype)
                else:
                    t = _read_tensor(f, start, e)
                    if t.is_floating_point():
                        t = t.float() if _keeps_fp32(owner, tname) else t.to(dtype)
                t = t.to(device)
                if is_param:
                    old = owner._parameters[tname]
                    owner._parameters[tname] = nn.Parameter(t, requires_grad=old.requires_grad and t.is_floating_point())
                else:
                    owner._buffers[tname] = t
        model.eval()
        out[name] = model
    return out
