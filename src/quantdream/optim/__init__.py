"""Optimizers that need no gradients: random-direction estimators, ZO-Adam, Subspace Gradient."""
from .subspace import SubspaceGradient
from .zo import RandomGradientEstimator, ZOAdam

__all__ = ["RandomGradientEstimator", "SubspaceGradient", "ZOAdam"]
