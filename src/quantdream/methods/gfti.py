"""GF-TI (Fei et al., ACM MM 2023): textual inversion by CMA-ES in a PCA subspace of the vocabulary.

    e(Q) = e0 + mu_E + Q V,     V: the top d_i = 256 principal directions of the token table E, Q in R^{d_i}
    Q_1..Q_lambda ~ CMA-ES(m, sigma^2 C),   lambda = 20, sigma_0 = 1, m_0 = 0
    f(Q_k) = L(e(Q_k)) on one batch with one (t, eps) for all k (common random numbers); tell(Q, f)
    e0 = normalize( mean_images sum_c softmax_c(q . k_c) u_c )         non-parametric class attention

k_c: unit mean world-CLIP text feature of class c over the caption templates; u_c: mean token row of
c's word pieces; q: unit world-CLIP image feature of a training photo. Every generation is one batch of
lambda candidates through the text encoder and the UNet: lambda forward passes per step.
NOTE(paper): the official code adds mu_E (PCA.inverse_transform), so Q = 0 is not e0; L2-normalises e0
to unit norm; uses raw cosines in the softmax; keys/values over the 1000 ImageNet classes with 80 CLIP
templates (here: the world's 10 classes and the 27 object templates); evaluates each candidate on a
batch of 5 images with fresh eps per candidate (here: ``batch_size`` images, CRN); outputs the best
candidate of the LAST generation (``output = "best"``).
The embedded model's vocabulary has ~1.7k rows (SD: 49,408); a 256-component PCA still fits (rows > 256).
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from .base import DenoisingObjective, Method, Streams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GFTIConfig:
    dim: int = 256                    # d_i, PCA components
    popsize: int = 20                 # lambda (pycma's default for 256-d is also 20)
    sigma0: float = 1.0               # initial step size, in PCA coordinates
    seed: int = 2023                  # G-code's CMA-ES seed
    add_vocab_mean: bool = True       # NOTE(paper): e = e0 + mu_E + Q V as in the official code
    init: str = "auto"                # auto | class-attention | word: e0 (auto: class attention if the
                                      # world evaluator is installed and the model is the embedded one)
    normalize_init: bool = True       # NOTE(paper): unit-norm e0 (official code)
    diagonal: bool = False            # sep-CMA (diagonal covariance): cheaper at large d_i
    output: str = "best"              # best (of the last generation, official) | mean (CMA mean)
    unet_rows: int = 3                # candidates per UNet call (ZOODiP's step holds 3 rows); 0: the whole
                                      # population at once (20 rows: 2.3 GB more at 512 px on SD-1.5)

    @property
    def lr(self) -> float:            # the scaffold logs an lr; CMA-ES has a step size instead
        return self.sigma0


class _Randn:
    """pycma's ``randn`` option: a seeded, picklable normal sampler (the state travels with the ES)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape):
        return self.rng.standard_normal(shape)


class CMAES:
    """Thin adapter over pycma's ask/tell: ``ask() -> (lambda, d)`` tensor, ``tell(f: (lambda,))``."""

    def __init__(self, dim: int, sigma0: float = 1.0, popsize: int = 20, seed: int = 0, diagonal: bool = False):
        import cma
        if dim < 1 or popsize < 2 or sigma0 <= 0:
            raise ValueError(f"CMA-ES needs dim >= 1, popsize >= 2, sigma0 > 0; got {dim}, {popsize}, {sigma0}")
        opts = {"popsize": popsize, "seed": seed or 1, "randn": _Randn(seed), "verbose": -9,
                "maxiter": float("inf"), "tolfun": 0, "tolx": 0, "tolfunhist": 0, "tolstagnation": float("inf"),
                "CMA_diagonal": bool(diagonal)}
        self.es = cma.CMAEvolutionStrategy(np.zeros(dim), sigma0, opts)
        self._asked: list | None = None

    def ask(self) -> torch.Tensor:
        self._asked = self.es.ask()
        return torch.tensor(np.stack(self._asked), dtype=torch.float32)

    def tell(self, f: torch.Tensor) -> None:
        if self._asked is None:
            raise RuntimeError("tell() without ask()")
        self.es.tell(self._asked, [float(v) for v in f.detach().cpu().double()])
        self._asked = None

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(np.asarray(self.es.mean), dtype=torch.float32)

    def state_dict(self) -> dict:
        return {"es": torch.frombuffer(bytearray(pickle.dumps(self.es)), dtype=torch.uint8).clone()}

    def load_state_dict(self, state: dict) -> None:
        self.es = pickle.loads(state["es"].numpy().tobytes())
        self._asked = None


def fit_pca(table: torch.Tensor, dim: int, exclude=(), chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu_E (d,), V (dim, d) orthonormal rows) of the token table (rows, d) without the rows in ``exclude``:
    PCA as sklearn's ``PCA(dim).fit(table)`` (G-code), by an eigendecomposition of the d x d covariance
    (rows >> d), accumulated ``chunk`` rows at a time in float64 so the table is never copied (SD-1.5's
    49,408 x 768 table would cost ~0.9 GB of transient copies at setup otherwise)."""
    keep = torch.ones(table.shape[0], dtype=torch.bool)
    keep[[i for i in exclude if i < len(keep)]] = False
    rows = int(keep.sum())
    if rows <= dim:
        raise ValueError(f"gf-ti.dim = {dim} needs more than {dim} vocabulary rows; this model has "
                         f"{rows}: lower gf_ti.dim")

    def chunks():
        for i in range(0, table.shape[0], chunk):
            yield table[i:i + chunk].detach().cpu()[keep[i:i + chunk]].double()

    mu = sum(x.sum(0) for x in chunks()) / rows
    cov = torch.zeros(table.shape[1], table.shape[1], dtype=torch.float64)
    for x in chunks():
        x = x - mu
        cov += x.T @ x
    evals, evecs = torch.linalg.eigh(cov)                        # ascending
    V = evecs[:, evals.argsort(descending=True)[:dim]].T          # (dim, d)
    V = V * torch.sign(V.gather(1, V.abs().argmax(1, keepdim=True)))   # fixed sign: largest entry > 0
    return mu.float(), V.float()


def vocabulary_pca(objective: DenoisingObjective, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu_E, V (dim, d)): PCA of the text encoder's token table without the placeholder rows (GF-TI's
    search space; zoodip-fast's directions)."""
    return fit_pca(objective.token_table(), dim, exclude=objective.placeholder.ids)


@torch.no_grad()
def class_attention_init(evaluator, pixels: torch.Tensor, tokenizer, table: torch.Tensor,
                         classes: list[str], templates: list[str]) -> torch.Tensor:
    """GF-TI's non-parametric cross-attention e0 (d,) from the evaluator's CLIP encoders."""
    keys = []
    for c in classes:
        k = evaluator.clip_text([t.format(c) for t in templates])            # (T, D) unit rows
        keys.append(torch.nn.functional.normalize(k.mean(0), dim=0))
    K = torch.stack(keys)                                                      # (C, D)
    U = torch.stack([table[tokenizer.encode(c, add_special_tokens=False)].float().mean(0) for c in classes])  # (C, d)
    q = torch.nn.functional.normalize(evaluator.clip_image(pixels), dim=-1)   # (N, D)
    attn = (q @ K.T).softmax(-1)                                               # (N, C), raw cosines
    return (attn @ U).mean(0)                                                  # (d,)


class GFTI(Method):
    name = "gf-ti"
    config_class = GFTIConfig
    integrations = ("scipy",)   # pycma reaches for scipy in some samplers and step-size rules

    def __init__(self, objective: DenoisingObjective, theta0: torch.Tensor, config: GFTIConfig = GFTIConfig()):
        super().__init__(objective, theta0, config)
        if config.output not in ("best", "mean") or config.init not in ("auto", "class-attention", "word"):
            raise ValueError(f"gf_ti.output must be best|mean and gf_ti.init auto|class-attention|word, "
                             f"got {config.output!r}, {config.init!r}")
        from ..diffusion import uniform
        objective.set_timesteps(uniform(objective.num_train_timesteps))      # G-code: t ~ U{0..999}
        if config.unet_rows < 0:
            raise ValueError(f"gf_ti.unet_rows must be >= 0 (0: the whole population at once), got {config.unet_rows}")
        if config.unet_rows and not 0 < objective.unet_batch <= config.unet_rows:
            objective.unet_batch = config.unet_rows                            # same losses, fewer rows at once
        self.mu_E, self.V = vocabulary_pca(objective, config.dim)             # (d,), (d_i, d)
        self.mu_E, self.V = self.mu_E.to(self.theta.device), self.V.to(self.theta.device)
        self.e0 = self.theta.clone()                                           # (V, d); setup may replace it
        self.es = CMAES(config.dim * self.theta.shape[0], config.sigma0, config.popsize, config.seed,
                        config.diagonal)
        self.init_used = "word"
        self.generations = 0

    def setup(self, ctx) -> None:
        """e0 by class attention (world evaluator) when asked and available, else the init word's row."""
        c = self.config
        if ctx.init_vectors_given:
            self.init_used = "init-embedding"
        elif c.init == "class-attention" or (c.init == "auto" and ctx.embedded):
            try:
                from ..eval import load_evaluator
                from ..data.templates import OBJECT_TEMPLATES
                from ..world.render import CLASSES
                table = self.objective.token_table().detach().float().cpu()
                e0 = class_attention_init(load_evaluator(), ctx.data.pixels, ctx.tokenizer, table,
                                          list(CLASSES), list(OBJECT_TEMPLATES))
                self.e0 = e0.to(self.theta.device).expand_as(self.theta).clone()
                self.init_used = "class-attention (world evaluator)"
            except Exception as e:  # evaluator not installed / not trained yet / incompatible
                if c.init == "class-attention":
                    raise ValueError(f"gf_ti.init = 'class-attention' needs the world evaluator: {e}") from None
                logger.warning("gf-ti: class-attention init unavailable (%s); starting from the init word", e)
                self.init_used = f"word (class attention unavailable: {type(e).__name__})"
        if c.normalize_init:
            self.e0 = torch.nn.functional.normalize(self.e0, dim=-1)
        self.theta.copy_(self.embed(torch.zeros(1, self.V.shape[0] * self.theta.shape[0], device=self.theta.device))[0])

    def embed(self, Q: torch.Tensor) -> torch.Tensor:
        """Q (K, V*d_i) -> token rows (K, V, d)."""
        K, Vn = Q.shape[0], self.theta.shape[0]
        e = Q.view(K, Vn, -1).to(self.V) @ self.V                                # (K, V, d)
        return self.e0[None] + (self.mu_E if self.config.add_vocab_mean else 0) + e

    @torch.no_grad()
    def step(self, batch, streams: Streams) -> torch.Tensor:
        Q = self.es.ask()                                                      # (lambda, V*d_i)
        candidates = self.embed(Q.to(self.theta.device))                      # (lambda, V, d)
        f = self.objective(candidates, batch, streams.noise)                   # one batch, CRN
        self.es.tell(f)
        self.generations += 1
        best = int(f.argmin())
        if self.config.output == "best":
            self.theta.copy_(candidates[best])
        else:
            self.theta.copy_(self.embed(self.es.mean[None].to(self.theta.device))[0])
        return f[best]

    def state_dict(self) -> dict:
        return {"theta": self.theta.clone(), "e0": self.e0.clone(), "es": self.es.state_dict(),
                "generations": self.generations, "init_used": self.init_used}

    def load_state_dict(self, state: dict) -> None:
        self.theta.copy_(state["theta"])
        self.e0 = state["e0"].to(self.theta.device)
        self.es.load_state_dict(state["es"])
        self.generations, self.init_used = state["generations"], state["init_used"]

    def summary(self) -> dict:
        p = self.objective.forward_passes
        return {"generations": self.generations, "popsize": self.config.popsize,
                "unet_forward_passes_per_generation": p / max(1, self.generations),
                "forward_pass_budget": p, "zoodip_n2_steps_at_equal_budget": p // 3,
                "init": self.init_used, "pca_components": int(self.V.shape[0])}
