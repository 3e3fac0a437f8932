"""Subspace Gradient (ZOODiP Algorithm 2, Eqs. 4-8): drop the gradient's components along the
directions in which the recent token trajectory barely moves.

    B      = last tau token values theta (tau x d ring buffer; parameters, not gradients)
    B_bar  = (B - mean_B) / std_B                      column-wise, population std       (Eq. 4)
    B_bar  = U S V^T,  lambda_i = S_ii^2               PCA, rows of V sorted by variance (Eq. 5)
    i*     = min { i : sum_{j<=i} lambda_j / sum_j lambda_j > 1 - nu }                    (Eq. 6)
    P_nu   = V[i*+1 .. tau]                            low-variance directions           (Eq. 7)
    g'     = g (I - P_nu^T P_nu)                                                          (Eq. 8)

The projector is rebuilt every tau steps (after the step whose count is a multiple of tau); until
the first rebuild nothing is removed. Only low-variance directions *inside* the tau-dimensional PCA
basis are removed; the d - tau directions outside the buffer's span are kept. d_eff = d - rows(P_nu)
feeds the RGE normalisation. NOTE(paper): the reference stores P_nu in FP16; here it is FP32.
"""
from __future__ import annotations

import torch


def standardize_columns(B: torch.Tensor) -> torch.Tensor:
    """(tau, d) -> zero-mean, unit population-std columns; a constant column is only centered
    (scale 1), as sklearn's StandardScaler does."""
    mean = B.mean(0)
    std = B.std(0, unbiased=False)
    std = torch.where(std < 10 * torch.finfo(B.dtype).eps, torch.ones_like(std), std)
    return (B - mean) / std


def pca(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of the rows of X (tau, d): (components V (k, d) with orthonormal rows sorted by variance,
    explained-variance ratios (k,)), k = min(tau, d). Computed in float64."""
    X = X.double()
    X = X - X.mean(0)
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    lam = S.pow(2)
    total = lam.sum()
    ratio = lam / total if total > 0 else torch.zeros_like(lam)
    return Vh, ratio


def low_variance_directions(B: torch.Tensor, nu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """P_nu (r, d) for a buffer B (tau, d), and the explained-variance ratios. r = 0 when the buffer
    has no variance at all."""
    V, ratio = pca(standardize_columns(B.double()))
    if ratio.sum() == 0:
        return V[:0].float(), ratio
    cum = torch.cumsum(ratio, 0)
    above = torch.nonzero(cum > 1 - nu)
    i_star = int(above[0]) if len(above) else len(ratio) - 1    # 0-based: keep components 0..i_star
    return V[i_star + 1:].float().contiguous(), ratio


class SubspaceGradient:
    """Ring buffer of the last ``tau`` token values and the projector built from it."""

    def __init__(self, dim: int, tau: int = 128, nu: float = 1e-3) -> None:
        if tau < 2:
            raise ValueError(f"Subspace Gradient needs a buffer of at least 2 tokens, got tau={tau}")
        if not 0 <= nu < 1:
            raise ValueError(f"Subspace Gradient nu must lie in [0, 1), got {nu}")
        self.dim, self.tau, self.nu = dim, tau, nu
        self.buffer = torch.zeros(tau, dim)
        self.count = 0                               # tokens pushed so far (= optimizer steps)
        self.P: torch.Tensor | None = None           # (r, dim) directions to remove

    @property
    def d_eff(self) -> int:
        return self.dim - (0 if self.P is None else self.P.shape[0])

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """g - (g P^T) P, for g of any shape with ``dim`` elements."""
        if self.P is None or self.P.shape[0] == 0:
            return g
        flat = g.reshape(-1).float()
        P = self.P.to(flat.device)
        return (flat - (P @ flat) @ P).reshape(g.shape).to(g.dtype)

    def push(self, theta: torch.Tensor) -> bool:
        """Record the token after an optimizer step; rebuild the projector every tau pushes.
        Returns True when the projector was rebuilt."""
        self.buffer[self.count % self.tau] = theta.detach().reshape(-1).float().cpu()
        self.count += 1
        if self.count % self.tau == 0:
            self.P, self.last_ratio = low_variance_directions(self.buffer, self.nu)
            return True
        return False

    def state_dict(self) -> dict:
        return {"dim": self.dim, "tau": self.tau, "nu": self.nu, "buffer": self.buffer.clone(),
                "count": self.count, "P": None if self.P is None else self.P.clone()}

    def load_state_dict(self, state: dict) -> None:
        if (state["dim"], state["tau"]) != (self.dim, self.tau):
            raise ValueError(f"Subspace Gradient state is for dim={state['dim']}, tau={state['tau']}; "
                             f"this run has dim={self.dim}, tau={self.tau}")
        self.nu, self.buffer, self.count, self.P = state["nu"], state["buffer"].clone(), state["count"], state["P"]
