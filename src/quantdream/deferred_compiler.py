"""``torch._dynamo`` imported only when something needs it (the low-memory mode's part 0).

diffusers and transformers import torch's compiler front end at import time (+25 MiB resident on
torch 2.13, beside the sympy that transformers imports anyway) only to decorate functions for
``torch.compile``: ``torch.compiler.disable`` on diffusers' hooks, ``allow_in_graph`` on its blocks,
``assume_constant_result`` on transformers' kernels, and an ``isinstance(m, OptimizedModule)`` check on
every pipeline part. In a process that compiles nothing those decorators are the identity and no
module is an ``OptimizedModule``: that is all :class:`DeferredDynamo` answers. Anything else (an
attribute it does not have, a submodule other than the standalone one transformers imports) imports
the real package, which then replaces the stand-in for good: a run that needs torch's compiler gets
it, a run that does not never pays for it. Hand-written: torch has no switch for this.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
import types
from pathlib import Path

logger = logging.getLogger(__name__)

NAME = "torch._dynamo"
# Submodules that import nothing from torch._dynamo and so load fine under the stand-in
# (transformers.masking_utils imports TransformGetItemToIndex from this one).
STANDALONE = frozenset({f"{NAME}._trace_wrapped_higher_order_op"})


class _NeverCompiled:
    """No module is compiled before the real torch._dynamo exists (``torch.compile`` imports it)."""


def _identity_decorator(fn=None, *args, **kwargs):
    return fn if callable(fn) else (lambda f: f)


class DeferredDynamo(types.ModuleType):
    """Stands in for ``torch._dynamo`` until something needs more than the decorators below; once the real
    package is loaded, a reference kept to the stand-in answers with the real package's attributes."""

    def __init__(self, name: str):
        super().__init__(name)
        self.disable = _identity_decorator         # torch.compiler.disable(fn, recursive, reason=...)
        self.allow_in_graph = _identity_decorator
        self.assume_constant_result = _identity_decorator
        self.eval_frame = types.SimpleNamespace(OptimizedModule=_NeverCompiled)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(load_real(f"attribute {name!r}"), name)


def load_real(why: str = "") -> types.ModuleType:
    """Replace the stand-in with the real torch._dynamo (imported now if need be) and return it."""
    import torch
    stand_in = sys.modules.get(NAME)
    if isinstance(stand_in, DeferredDynamo):
        logger.debug("torch._dynamo needed (%s): importing the real package", why)
        del sys.modules[NAME]
        if torch.__dict__.get("_dynamo") is stand_in:
            del torch._dynamo
        real = importlib.import_module(NAME)
        stand_in.__dict__.update(real.__dict__)
        for sub in STANDALONE:     # loaded under the stand-in: reachable as attributes of the real package too
            if sub in sys.modules and not hasattr(real, sub.rpartition(".")[2]):
                setattr(real, sub.rpartition(".")[2], sys.modules[sub])
        return real
    return importlib.import_module(NAME)


class _Loaded(importlib.abc.Loader):
    """Loader of a submodule the real package's own import already loaded: hands back that module."""

    def create_module(self, spec):
        return sys.modules[spec.name]

    def exec_module(self, module):
        pass


class _SubmoduleFinder(importlib.abc.MetaPathFinder):
    """``import torch._dynamo.X`` under the stand-in: the real package first (X usually needs it)."""

    def find_spec(self, name, path=None, target=None):
        if not name.startswith(NAME + ".") or name in STANDALONE or not isinstance(sys.modules.get(NAME),
                                                                                     DeferredDynamo):
            return None
        load_real(f"submodule {name}")
        if name in sys.modules:
            return importlib.util.spec_from_loader(name, _Loaded())
        return None                 # the path finders find it in the real package's folder


def install() -> bool:
    """Put the stand-in in place. False (nothing done) when torch._dynamo is already imported."""
    import torch
    if NAME in sys.modules:
        return False
    stand_in = DeferredDynamo(NAME)
    stand_in.__path__ = [str(Path(torch.__file__).parent / "_dynamo")]
    if not any(isinstance(f, _SubmoduleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SubmoduleFinder())
    sys.modules[NAME] = stand_in
    torch._dynamo = stand_in
    return True
