"""Personalization methods on one scaffold: each learns the rows theta (num_vectors, d) of a new token.

    ti      textual inversion, backpropagation to the token rows only
    zoodip  ZOODiP (CVPR 2025): RGE + ZO-Adam + Subspace Gradient + PUTS, forward passes only
"""
METHODS = ("zoodip", "ti")


def method_class(name: str):
    if name == "zoodip":
        from .zoodip import Zoodip
        return Zoodip
    if name == "ti":
        from .ti import TextualInversion
        return TextualInversion
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
