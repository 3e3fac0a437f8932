"""Test helper: write a diffusers pipeline's weights as one checkpoint in the original LDM / A1111 layout
(the inverse of what diffusers' ``from_single_file`` converts), and tiny architectures to build them from.

    sd = to_ldm(pipe, "sd15" | "sd21" | "sdxl")      {ldm key: tensor}
    write(sd, path)                                  .safetensors, or .ckpt as {"state_dict": ...}
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return dict(_RESNET).get(head, head) + "." + tail


def unet_key(k: str, n: int, up_attn: list[bool]) -> str:
    """One diffusers UNet key in LDM's numbering: ``n`` resnets per down block (each with its attention,
    and a downsampler after all but the last), ``n + 1`` per up block (the upsampler rides in the last)."""
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + i * (n + 1) + j
        return f"input_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op.{m[2]}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = i * (n + 1) + j
        return f"output_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", k)
    if m:
        i = int(m[1])
        return f"output_blocks.{i * (n + 1) + n}.{2 if up_attn[i] else 1}.{m[2]}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.*)", k)
    if m:
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if k.startswith("mid_block.attentions.0."):
        return "middle_block.1." + k[len("mid_block.attentions.0."):]
    head, _, param = k.rpartition(".")
    return f"{_UNET_TOP[head]}.{param}"


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(k: str, levels: int) -> str:
    k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    m = re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    m = re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", k)
    if m:
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k)
    if m:
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", k)
    if m:
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", k)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", k)
    if m:
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    return k


_OPENCLIP = (("text_model.encoder.layers.", "transformer.resblocks."), ("self_attn.out_proj", "attn.out_proj"),
             ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
             ("text_model.final_layer_norm", "ln_final"),
             ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
             ("text_model.embeddings.position_embedding.weight", "positional_embedding"))


def openclip(sd: dict, hidden: int, projection: torch.Tensor | None = None) -> dict:
    """transformers' CLIP text model in OpenCLIP's layout: q/k/v fused into ``in_proj``, projection transposed."""
    out, qkv = {}, {}
    for k, v in sd.items():
        m = re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)", k)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = v
            continue
        if k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
            continue
        for old, new in _OPENCLIP:
            k = k.replace(old, new)
        out[k] = v
    for (layer, kind), parts in qkv.items():
        for old, new in _OPENCLIP[:1]:
            layer = layer.replace(old, new)
        out[f"{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if "text_projection" not in out:                     # SD-2.x files carry OpenCLIP's projection too
        out["text_projection"] = torch.eye(hidden) if projection is None else projection
    return out


def _text_state(model) -> dict:
    """A CLIP text model's weights with transformers' ``text_model.`` names (newer transformers flatten
    CLIPTextModel; checkpoints keep the prefix)."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def to_ldm(pipe, arch: str) -> dict[str, torch.Tensor]:
    ucfg = pipe.unet.config
    n = ucfg.layers_per_block if isinstance(ucfg.layers_per_block, int) else ucfg.layers_per_block[0]
    up_attn = ["CrossAttn" in t for t in ucfg.up_block_types]
    sd = {"model.diffusion_model." + unet_key(k, n, up_attn): v for k, v in pipe.unet.state_dict().items()}
    levels = len(pipe.vae.config.block_out_channels)
    for k, v in pipe.vae.state_dict().items():
        new = vae_key(k, levels)
        if ".mid.attn_1." in new and new.endswith(".weight") and v.dim() == 2:
            v = v[:, :, None, None]                      # LDM's VAE attention uses 1x1 convolutions
        sd["first_stage_model." + new] = v
    te = _text_state(pipe.text_encoder)
    if arch == "sd15":
        sd.update({"cond_stage_model.transformer." + k: v for k, v in te.items()})
    elif arch == "sd21":
        hidden = pipe.text_encoder.config.hidden_size
        sd.update({"cond_stage_model.model." + k: v for k, v in openclip(te, hidden).items()})
    else:
        sd.update({"conditioner.embedders.0.transformer." + k: v for k, v in te.items()})
        te2 = _text_state(pipe.text_encoder_2)
        hidden = pipe.text_encoder_2.config.hidden_size
        sd.update({"conditioner.embedders.1.model." + k: v for k, v in openclip(te2, hidden).items()})
    # what real files carry besides the weights: the DDPM schedule, CLIP's position ids, SDXL's sigmas
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    sd.update(betas=betas, alphas_cumprod=torch.cumprod(1 - betas, 0))
    if arch == "sd15":
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    if arch == "sdxl":
        sd["denoiser.sigmas"] = ((1 - sd["alphas_cumprod"]) / sd["alphas_cumprod"]) ** 0.5
        sd["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    return {k: v.contiguous() for k, v in sd.items()}


def write(sd: dict, path: Path) -> Path:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 1}, str(path))
    return path


# ---- tiny architectures in the three layouts (small widths; CLIP's real 49,408-token vocabulary) ----

def _text(hidden=32, layers=2, proj=32, act="quick_gelu"):
    return {"vocab_size": 49408, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": act, "projection_dim": proj,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}


_VAE = {"act_fn": "silu", "block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 32, "scaling_factor": 0.18215}


def _unet(cross, down, up, heads, linear=False, **extra):
    return {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
            "block_out_channels": [16, 32], "down_block_types": down, "up_block_types": up,
            "cross_attention_dim": cross, "attention_head_dim": heads, "norm_num_groups": 8,
            "use_linear_projection": linear, **extra}


TINY = {
    "sd15": {"unet": {"library": "diffusers", "class": "UNet2DConditionModel", "config": _unet(
                 32, ["CrossAttnDownBlock2D", "DownBlock2D"], ["UpBlock2D", "CrossAttnUpBlock2D"], 4)},
             "text_encoder": {"library": "transformers", "class": "CLIPTextModel", "config": _text()},
             "vae": {"library": "diffusers", "class": "AutoencoderKL", "config": _VAE}},
    "sd21": {"unet": {"library": "diffusers", "class": "UNet2DConditionModel", "config": _unet(
                 32, ["CrossAttnDownBlock2D", "DownBlock2D"], ["UpBlock2D", "CrossAttnUpBlock2D"], [2, 4],
                 linear=True, upcast_attention=True)},
             "text_encoder": {"library": "transformers", "class": "CLIPTextModel", "config": _text(act="gelu")},
             "vae": {"library": "diffusers", "class": "AutoencoderKL", "config": _VAE}},
    # SDXL: the two encoders differ in width (as 768 / 1280 do), which is how diffusers tells them apart
    "sdxl": {"unet": {"library": "diffusers", "class": "UNet2DConditionModel", "config": _unet(
                 32 + 48, ["DownBlock2D", "CrossAttnDownBlock2D"], ["CrossAttnUpBlock2D", "UpBlock2D"], [2, 4],
                 linear=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=8 * 6 + 32, transformer_layers_per_block=[1, 1])},
             "text_encoder": {"library": "transformers", "class": "CLIPTextModel", "config": _text()},
             "text_encoder_2": {"library": "transformers", "class": "CLIPTextModelWithProjection",
                                "config": _text(hidden=48, act="gelu")},
             "vae": {"library": "diffusers", "class": "AutoencoderKL", "config": dict(_VAE, scaling_factor=0.13025)}},
}


def write_tiny_arch_dir(dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for arch, spec in TINY.items():
        (dst / f"{arch}.json").write_text(json.dumps(spec))
    return dst


def tiny_pipeline(arch: str, seed: int = 0):
    """A random-weight pipeline of the tiny ``arch`` with the package's tokenizers and scheduler."""
    import diffusers
    import transformers
    from diffusers import schedulers

    from quantdream.models import single_file
    torch.manual_seed(seed)
    parts = {}
    for name, e in TINY[arch].items():
        if e["library"] == "diffusers":
            parts[name] = getattr(diffusers, e["class"]).from_config(e["config"]).eval()
        else:
            cls = getattr(transformers, e["class"])
            parts[name] = cls(cls.config_class(**e["config"])).eval()
    extras = single_file._extras()[arch]
    s = dict(extras["scheduler"])
    parts["scheduler"] = getattr(schedulers, s.pop("_class_name")).from_config(s)
    for name, pad in extras["tokenizers"].items():
        parts[name] = single_file.clip_tokenizer(pad)
    if arch == "sdxl":
        return diffusers.StableDiffusionXLPipeline(**parts)
    return diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
