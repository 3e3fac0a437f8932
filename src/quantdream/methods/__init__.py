"""Personalization methods on one scaffold (train.py). Token methods learn theta (num_vectors, d), the rows
of a new token; weight methods adapt the UNet and keep the prompt's identifier ("sks <class>").

    ti          textual inversion, backpropagation to the token rows only
    zoodip      ZOODiP (CVPR 2025): RGE + ZO-Adam + Subspace Gradient + PUTS, forward passes only
    zoodip-fast ZOODiP with directions in the vocabulary's top-16 principal subspace (beyond the paper;
                1/3 of the passes on the embedded model, docs/personalization.md)
    gf-ti       GF-TI (ACM MM 2023): CMA-ES in a 256-d PCA subspace of the vocabulary, forward passes only
    dreambooth  full UNet fine-tune (float), optional prior preservation
    lora        peft LoRA on the attention projections (float base)
    qlora       the same LoRA over an NF4 (bitsandbytes) Linear + int4 Conv2d base
    peqa        per-output-channel scales of the quantized UNet
    tuneqdm     TuneQDM ECCV: output- and input-channel scales (MCSU) x N timestep experts (TAS)
    tuneqdm-s1  TuneQDM v1 S1: one scale set used only inside a timestep interval
    tuneqdm-s2  TuneQDM v1 S2: one scale set per timestep interval
"""
METHODS = ("zoodip", "zoodip-fast", "ti", "gf-ti", "dreambooth", "lora", "qlora", "peqa", "tuneqdm", "tuneqdm-s1", "tuneqdm-s2")

_CLASSES = {
    "zoodip": ("zoodip", "Zoodip"), "zoodip-fast": ("zoodip", "ZoodipFast"), "ti": ("ti", "TextualInversion"), "gf-ti": ("gfti", "GFTI"),
    "dreambooth": ("dreambooth", "Dreambooth"), "lora": ("lora", "Lora"), "qlora": ("lora", "QLora"),
    "peqa": ("peqa", "Peqa"), "tuneqdm": ("tuneqdm", "TuneQDM"), "tuneqdm-s1": ("tuneqdm", "TuneQDMS1"),
    "tuneqdm-s2": ("tuneqdm", "TuneQDMS2"),
}


def section_name(method: str) -> str:
    """The settings table of a method: its name with '-' as '_' (``[tuneqdm_s1]``, ``--set gf_ti.popsize=10``)."""
    return method.replace("-", "_")


def method_class(name: str):
    if name not in _CLASSES:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    import importlib
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(f".{module}", __name__), cls)
