"""What every personalization method shares: the placeholder token, the objective, the random
streams, and the result of a run.

    L(theta) = E_{x, y, eps, t} || eps - eps_phi(z_t, t, c(y; theta)) ||^2         (LDM Eq. 1)

(with v or z in place of eps when the scheduler's ``prediction_type`` says so: diffusion.target)

theta (num_vectors, d) are the rows of the new token; they are spliced into the text encoder's
input embeddings by a forward hook on the token-embedding layer, so one batch can carry a different
theta per row (the clean and the n perturbed tokens of ZOODiP) and the frozen embedding table is
never trained. ``objective(theta, batch, generator)`` evaluates K candidates on one batch with common
random numbers: one draw of t and eps from ``generator`` serves every candidate.
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.dataset import Batch
from ..diffusion import TimestepSampler, add_noise, check_prediction_type, denoising_mse, draw_noise, target, uniform


# ----------------------------------------------------------------------------- randomness
@dataclass
class Streams:
    """The one place a seed becomes generators. Each consumer has its own stream, so previews or an
    extra ZO direction never shift the data or noise a step sees; all states go into checkpoints."""

    data: torch.Generator        # image, flip, caption, VAE-posterior sample
    noise: torch.Generator       # t and eps (shared by all candidates of a step)
    directions: torch.Generator  # ZO directions e_i

    @classmethod
    def from_seed(cls, seed: int, device: str | torch.device = "cpu") -> "Streams":
        def gen(offset: int, dev) -> torch.Generator:
            return torch.Generator(device=dev).manual_seed(seed * 1000 + offset)
        return cls(data=gen(1, "cpu"), noise=gen(2, device), directions=gen(3, device))

    def state_dict(self) -> dict:
        return {k: getattr(self, k).get_state() for k in ("data", "noise", "directions")}

    def load_state_dict(self, state: dict) -> None:
        for k, s in state.items():
            getattr(self, k).set_state(s)


def preview_generator(seed: int) -> torch.Generator:
    """Previews restart from the same seed every time, so grids at different steps are comparable."""
    return torch.Generator().manual_seed(seed * 1000 + 4)


# ----------------------------------------------------------------------------- placeholder token
@dataclass
class Placeholder:
    token: str                 # what the user types in prompts, e.g. "<my-bag>"
    tokens: list[str]          # [token, token_1, ...], one per vector (diffusers' multi-vector naming)
    ids: list[int]
    init_vectors: torch.Tensor  # (num_vectors, d) float32

    @property
    def text(self) -> str:
        """What replaces '{}' in a caption."""
        return " ".join(self.tokens)


def check_placeholder(tokenizer, text_encoder, token: str, init_word: str, num_vectors: int = 1,
                      init_vectors: torch.Tensor | None = None) -> int:
    """Validate everything about the new token before anything is changed; returns the init word's id."""
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"--token {token!r} must be one word without spaces, e.g. '<my-bag>'")
    if num_vectors < 1:
        raise ValueError(f"--num-vectors must be >= 1, got {num_vectors}")
    vocab = tokenizer.get_vocab()
    names = [token] + [f"{token}_{i}" for i in range(1, num_vectors)]
    for name in names:
        ids = tokenizer.encode(name, add_special_tokens=False)
        if name in vocab or (len(ids) == 1 and ids[0] != tokenizer.unk_token_id):
            raise ValueError(f"--token {name!r} is already in the tokenizer's vocabulary; choose a new string "
                             f"such as '<my-{token.strip('<>')}>' so prompts using the word keep their meaning")
    ids = tokenizer.encode(init_word, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"--init-word {init_word!r} splits into {len(ids)} tokens {pieces}; choose a word "
                         f"that is a single token of this model's tokenizer (e.g. the class noun)")
    width = text_encoder.get_input_embeddings().weight.shape[1]
    if init_vectors is not None and tuple(init_vectors.shape) != (num_vectors, width):
        raise ValueError(f"initial embedding has shape {tuple(init_vectors.shape)} but this model needs "
                         f"({num_vectors}, {width}): {width}-wide text encoder "
                         f"({'SD-1.x' if width == 768 else 'SD-2.x' if width == 1024 else 'this model'}), "
                         f"{num_vectors} vector(s)")
    return ids[0]


class GrownEmbedding(nn.Embedding):
    """A token table grown by new rows without copying it: ids past ``weight`` read ``extra_rows``.
    For tables memory-mapped from a model file (``load_quantized(narrow_embeddings=True)``), where
    transformers' ``resize_token_embeddings`` would copy all 49,408 rows into memory (72 MiB in fp16)
    and so undo the mapping. Hooks on the module (lookup casts, the objective's splice) still apply."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.weight.shape[0]
        out = F.embedding(ids.clamp(max=n - 1), self.weight, self.padding_idx, self.max_norm,
                          self.norm_type, self.scale_grad_by_freq, self.sparse)
        new = (ids >= n).unsqueeze(-1)
        return torch.where(new, self.extra_rows[(ids - n).clamp(min=0)].to(out.dtype), out)


def _grow(embedding: nn.Embedding, n_new: int) -> None:
    """Give ``embedding`` ``n_new`` zero rows past its table, in place (a :class:`GrownEmbedding`)."""
    w = embedding.weight
    rows = torch.zeros(n_new, w.shape[1], dtype=w.dtype, device=w.device)
    if isinstance(embedding, GrownEmbedding):
        rows = torch.cat([embedding.extra_rows, rows])
    else:
        embedding.__class__ = GrownEmbedding
    embedding.register_buffer("extra_rows", rows)
    embedding.num_embeddings = w.shape[0] + rows.shape[0]


def _row(embedding: nn.Embedding, i: int) -> tuple[torch.Tensor, int]:
    """(tensor, index) holding token id ``i``'s row: the table, or a grown table's extra rows."""
    n = embedding.weight.shape[0]
    return (embedding.extra_rows, i - n) if i >= n else (embedding.weight, i)


def add_placeholder(tokenizer, text_encoder, token: str, init_word: str, num_vectors: int = 1,
                    init_vectors: torch.Tensor | None = None) -> Placeholder:
    """Add the token as Stable Diffusion's TI does (tokenizer.add_tokens + resize_token_embeddings),
    each new row initialised from the init word (or ``init_vectors``). Validates first. A table mapped
    from a file (``mapped_from``) grows by the new rows instead of being copied (:class:`GrownEmbedding`)."""
    init_id = check_placeholder(tokenizer, text_encoder, token, init_word, num_vectors, init_vectors)
    # ---- validated; mutate
    tokens = [token] + [f"{token}_{i}" for i in range(1, num_vectors)]
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    emb = text_encoder.get_input_embeddings()
    if getattr(emb, "mapped_from", None):
        if len(tokenizer) > emb.num_embeddings:         # else the new ids already index rows of the table
            _grow(emb, len(tokenizer) - emb.num_embeddings)
    else:
        try:  # the new rows are overwritten below; skip transformers' mean/covariance initialisation
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        except TypeError:
            text_encoder.resize_token_embeddings(len(tokenizer))
        emb = text_encoder.get_input_embeddings()
    if init_vectors is None:
        init_vectors = emb.weight[init_id].detach().float().clone().expand(num_vectors, -1).clone()
    placeholder = Placeholder(token=token, tokens=tokens, ids=list(ids), init_vectors=init_vectors.float().clone())
    write_rows(text_encoder, placeholder, init_vectors)
    return placeholder


def identifier_placeholder(identifier: str, class_word: str, width: int) -> Placeholder:
    """DreamBooth-style prompt text "<identifier> <class>" (e.g. "sks bag") for weight methods: nothing is
    added to the tokenizer, so theta is empty (0, d) and the text encoder reads its own table."""
    words = [w for w in (identifier, class_word) if w]
    return Placeholder(token=identifier, tokens=words, ids=[], init_vectors=torch.zeros(0, width))


def write_rows(text_encoder, placeholder: Placeholder, theta: torch.Tensor) -> None:
    """Store the learned rows in the embedding table (for pipelines that read the table)."""
    emb = text_encoder.get_input_embeddings()
    with torch.no_grad():
        for i, vec in zip(placeholder.ids, theta):
            table, j = _row(emb, i)
            table[j] = vec.to(device=table.device, dtype=table.dtype)


def compute_dtype(text_encoder) -> torch.dtype:
    """The dtype the text encoder computes in: its layer norms' (quantized tables may hold narrower codes)."""
    norms = [m.weight for m in text_encoder.modules() if isinstance(m, torch.nn.LayerNorm) and m.weight is not None]
    return norms[0].dtype if norms else torch.float32


# ----------------------------------------------------------------------------- the objective
class DenoisingObjective:
    """L(theta) on one batch for K candidate tokens at once: theta (K, V, d) -> losses (K,).

    The K candidates share the batch's latents and captions and one draw of (t, eps) from
    ``generator`` (common random numbers); all K*B rows go through the text encoder and the UNet
    as one batch. Gradients flow to theta when the caller enables them (textual inversion).
    ``unet_batch`` > 0 caps the rows per UNet call (same inputs, same result up to float rounding;
    a lower activation peak at high resolution: the low-memory mode sets it to 1)."""

    def __init__(self, tokenizer, text_encoder, unet, scheduler, placeholder: Placeholder,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 timesteps: TimestepSampler | None = None, unet_batch: int = 0) -> None:
        self.tokenizer, self.text_encoder, self.unet = tokenizer, text_encoder, unet
        self.unet_batch = unet_batch
        self.placeholder = placeholder
        self.device, self.dtype = torch.device(device), dtype
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device)
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.prediction_type = check_prediction_type(scheduler.config.get("prediction_type", "epsilon"))
        self.timesteps = timesteps or uniform(self.num_train_timesteps)
        self.max_length = tokenizer.model_max_length
        self.forward_passes = 0          # UNet evaluations of one sample (K * B per call)
        self._ids_cache: dict[str, torch.Tensor] = {}
        self._rows: torch.Tensor | None = None
        self._pid = torch.tensor(placeholder.ids, device=self.device)
        self._compute_dtype = compute_dtype(text_encoder)
        self._hook = text_encoder.get_input_embeddings().register_forward_hook(self._splice)

    def close(self) -> None:
        """Detach from the text encoder (the model then reads only its embedding table)."""
        self._hook.remove()

    def set_timesteps(self, sampler: TimestepSampler) -> None:
        sampler.check(self.num_train_timesteps)
        self.timesteps = sampler

    # -- text
    def _splice(self, module, inputs, out):
        if self._rows is None:
            return out
        ids = inputs[0]                                            # (N, L)
        out = out.to(self._splice_dtype(out.dtype))
        for j in range(self._pid.numel()):
            m = (ids == self._pid[j]).unsqueeze(-1)                # (N, L, 1)
            out = torch.where(m, self._rows[:, j, None, :].to(out.dtype), out)
        return out

    def _splice_dtype(self, table_dtype: torch.dtype) -> torch.dtype:
        """The dtype the spliced embeddings leave the table in: wide enough not to round theta (a narrow, e.g.
        int8-dequantized, table under a float32 encoder), but never wider than the encoder computes in (a float16
        encoder's layer norms refuse float32 inputs)."""
        wide = torch.promote_types(table_dtype, self._rows.dtype)
        return wide if self._compute_dtype.itemsize >= wide.itemsize else self._compute_dtype

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        rows = []
        for c in captions:
            if c not in self._ids_cache:
                self._ids_cache[c] = self.tokenizer(c, padding="max_length", max_length=self.max_length,
                                                    truncation=True, return_tensors="pt").input_ids[0]
            rows.append(self._ids_cache[c])
        return torch.stack(rows).to(self.device)

    @contextmanager
    def spliced(self, rows: torch.Tensor):
        """Within the block, placeholder positions of row r of a text batch read rows[r]: (N, V, d)."""
        self._rows = rows.to(self.device)
        try:
            yield
        finally:
            self._rows = None

    def encode_text(self, theta: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """theta (K, V, d), B captions -> conditioning (K*B, L, d), candidate-major."""
        K, B = theta.shape[0], len(captions)
        ids = self.token_ids(captions).repeat(K, 1)                 # (K*B, L)
        with self.spliced(theta.repeat_interleave(B, 0)):
            return self.text_encoder(ids)[0].to(self.dtype)

    def unconditional(self, theta: torch.Tensor, n: int) -> torch.Tensor:
        """Classifier-free guidance's unconditional input for ``n`` rows: the empty prompt."""
        return self.encode_text(theta, [""] * n)

    @staticmethod
    def cat_cond(conds: list) -> torch.Tensor:
        return torch.cat(conds)

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The UNet's prediction for N rows (``unet_batch`` rows per call): z_t (N, C, h, w), t (N,)."""
        n = z_t.shape[0]
        m = self.unet_batch if self.unet_batch > 0 else n
        return torch.cat([self.unet(z_t[i:i + m], t[i:i + m], cond[i:i + m]).sample for i in range(0, n, m)])

    def token_table(self) -> torch.Tensor:
        """The vocabulary's token rows (N, d) in theta's layout (GF-TI's and zoodip-fast's PCA)."""
        return self.text_encoder.get_input_embeddings().weight

    def write_rows(self, theta: torch.Tensor) -> None:
        """Store theta in the text encoder's table (for pipelines that read the table)."""
        write_rows(self.text_encoder, self.placeholder, theta)

    # -- loss
    def __call__(self, theta: torch.Tensor, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        if theta.dim() == 2:
            theta = theta[None]
        K = theta.shape[0]
        z = batch.latents.to(self.device)
        B = z.shape[0]
        noise = draw_noise(tuple(z.shape), self.timesteps, generator)
        eps, t = noise.eps.to(self.device), noise.t.to(self.device)
        z_t = add_noise(z, eps, t, self.alphas_cumprod)             # forward diffusion
        y = target(z, eps, t, self.alphas_cumprod, self.prediction_type)   # eps, v or z: the scheduler's type
        cond = self.encode_text(theta, batch.captions)              # (K*B, L, d)
        t = t.repeat(K)                                             # (K*B,)
        z_t = z_t.repeat(K, 1, 1, 1).to(self.dtype)
        pred = self.denoise(z_t, t, cond)
        self.forward_passes += K * B
        return denoising_mse(pred, y.repeat(K, 1, 1, 1)).view(K, B).mean(1)


# ----------------------------------------------------------------------------- methods
class Method:
    """A personalization method: owns what it trains and how it is updated, nothing else.

    Token methods (``kind = "token"``: ti, zoodip, gf-ti) learn theta (V, d), the rows of a new token.
    Weight methods (``kind = "weights"``, methods/gradient.py) adapt the UNet; their theta is empty
    (0, d) and their prompt carries an identifier ("sks <class>") instead of a new token. The scaffold
    calls, in order: ``prepare_model`` (quantize the frozen model) -> ``__init__`` -> ``setup(ctx)`` ->
    ``step`` ... -> ``export``."""

    name = "base"
    config_class: type = object
    kind = "token"
    default_weights = "int8"                    # what --weights auto means for this method
    integrations: tuple[str, ...] = ()          # optional libraries diffusers must see (memory.skip_unused_integrations)
    weight_choices: tuple[str, ...] = ("int8", "int4", "none")

    def __init__(self, objective: DenoisingObjective, theta0: torch.Tensor, config) -> None:
        self.objective, self.config = objective, config
        self.theta = theta0.detach().float().clone().to(objective.device)

    @classmethod
    def prepare_model(cls, text_encoder, vae, unet, weights: str, config) -> None:
        """Quantize the frozen model in place before training. ZOODiP's setting: UNet at ``weights``,
        VAE and text encoder int8. NOTE(paper): its int4 variant (§S3.2) puts only the UNet at int4."""
        if weights == "none":
            return
        from ..quant import quantize_model
        quantize_model(unet, weights=weights)
        quantize_model(vae, weights="int8")
        quantize_model(text_encoder, weights="int8")

    def setup(self, ctx) -> None:
        """Run-time preparation that needs the data or the output folder (``ctx``: see train.RunContext)."""

    def trainable_parameters(self) -> list[torch.Tensor]:
        return [self.theta]

    def snapshot(self, folder, step: int, token: str) -> None:
        """An intermediate result at a checkpoint (token methods: the embedding file)."""
        from ..export import save_diffusers
        path = Path(folder) / f"step_{step:06d}.safetensors"
        if getattr(self.objective, "widths", None):        # SDXL: clip_l + clip_g (models/sdxl.py)
            from ..export import save_sdxl
            save_sdxl(path, token, self.theta, self.objective.widths)
        else:
            save_diffusers(path, token, self.theta)

    def export(self, out, token: str, step: int, a1111: bool = False) -> list[Path]:
        """Write the result files into ``out``; token methods: diffusers (and A1111) embedding files."""
        from ..export import save_a1111, save_diffusers
        if getattr(self.objective, "widths", None):        # SDXL: one file with clip_l + clip_g, which A1111 reads
            from ..export import save_sdxl
            return [save_sdxl(out, token, self.theta, self.objective.widths)]
        files = [save_a1111(Path(out) / "learned_embeds.pt", token, self.theta, step)] if a1111 else []
        return files + [save_diffusers(out, token, self.theta)]

    def summary(self) -> dict:
        """Method-specific facts for run.json (e.g. GF-TI's forward-pass budget)."""
        return {}

    @property
    def lr(self) -> float:
        return float(self.config.lr)

    def step(self, batch: Batch, streams: Streams) -> torch.Tensor:
        """One optimisation step; returns the step's loss (a 0-d tensor, not synchronised)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


def config_from_dict(cls, values: dict[str, Any], section: str):
    """Build a frozen config dataclass, refusing unknown keys with the closest valid one."""
    import dataclasses
    valid = [f.name for f in dataclasses.fields(cls)]
    for k in values:
        if k not in valid:
            close = difflib.get_close_matches(k, valid, n=1)
            hint = f"; did you mean {section}.{close[0]}?" if close else f"; valid keys: {', '.join(valid)}"
            raise ValueError(f"unknown setting {section}.{k}{hint}")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    out = {}
    for k, v in values.items():
        ref = defaults[k]
        if isinstance(ref, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        elif isinstance(ref, tuple) and isinstance(v, list):
            v = tuple(v)
        elif type(v) is not type(ref):
            raise ValueError(f"{section}.{k} = {v!r} should be a {type(ref).__name__} (like {ref!r})")
        out[k] = v
    return cls(**out)


@dataclass
class RunResult:
    """What a finished (or interrupted) run hands back; ``run.json`` is its ``summary``."""

    theta: torch.Tensor
    placeholder: Placeholder
    step: int
    completed: bool
    losses: list[float] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
