"""Post-training activation quantization, Q-Diffusion style (methods.md §4.2), for W8A8 / W4A8.

Each quantized layer of the UNet gets a per-tensor asymmetric fake quantizer on its input::

    x_hat = s * (clamp(round(x / s) + z, 0, 2^b - 1) - z)

calibrated on inputs collected across the sampling timesteps (timestep-aware calibration), with
``(s, z)`` from an MSE search over clipping ranges. The 1x1 shortcut convs of the up-blocks read
``concat(h, skip)``; with shortcut splitting the two halves get separate ``(s, z)``. Attention
(``QuantAttnProcessor``) quantizes q, k, v at the activation width and the softmax output at 16 bits.

Not done (say so, do not pretend): BRECQ / AdaRound block reconstruction and LSQ step learning.
Weights stay round-to-nearest; every quantizer is calibrated from the same full-precision-activation
pass (weights already quantized), not sequentially.
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping

import torch
from torch import nn

from .apply import quantized_layers

logger = logging.getLogger(__name__)


class ActQuantizer(nn.Module):
    """Per-tensor fake quantizer; ``split=c`` gives channels ``[:c]`` and ``[c:]`` (dim 1) their own
    ``(s, z)`` (Q-Diffusion's shortcut splitting). Straight-through gradient inside the range.

    ``mode``: ``"quant"`` (after calibration), ``"observe"`` (record samples, pass through), ``"off"``.
    """

    def __init__(self, bits: int = 8, split: int | None = None, device=None):
        super().__init__()
        if not 2 <= bits <= 16:
            raise ValueError(f"activation width must be 2..16 bits, got {bits}")
        self.bits, self.split = bits, split
        k = 1 if split is None else 2
        self.register_buffer("scale", torch.ones(k, device=device))
        self.register_buffer("zero", torch.zeros(k, device=device))
        self.mode = "quant"
        self._samples: list[list[torch.Tensor]] = [[] for _ in range(k)]
        self._range = [[float("inf"), float("-inf")] for _ in range(k)]
        self.samples_per_call = 4096
        self.generator: torch.Generator | None = None

    def _parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x] if self.split is None else [x[:, :self.split], x[:, self.split:]]

    def _fake(self, x: torch.Tensor, i: int) -> torch.Tensor:
        s, z = self.scale[i].to(x.dtype), self.zero[i].to(x.dtype)
        q_max = 2 ** self.bits - 1
        lo, hi = (0 - z) * s, (q_max - z) * s
        x_c = torch.maximum(torch.minimum(x, hi), lo)  # gradient 1 inside the range, 0 outside
        x_q = (torch.round(x_c / s) + z).clamp_(0, q_max).sub_(z).mul_(s)
        return x_c + (x_q - x_c).detach()

    def _observe(self, x: torch.Tensor) -> None:
        for i, part in enumerate(self._parts(x.detach())):
            flat = part.reshape(-1).float()
            r = self._range[i]
            r[0], r[1] = min(r[0], flat.min().item()), max(r[1], flat.max().item())
            if flat.numel() > self.samples_per_call:
                idx = torch.randint(flat.numel(), (self.samples_per_call,), generator=self.generator,
                                    device=flat.device)
                flat = flat[idx]
            self._samples[i].append(flat.cpu())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            self._observe(x)
            return x
        parts = [self._fake(p, i) for i, p in enumerate(self._parts(x))]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def calibrate(self, search_steps: int = 80, p: float = 2.0, max_samples: int = 1 << 16) -> None:
        """MSE (L_p) search: shrink the observed [min, max] by ``1 - k/100``, k < search_steps, and
        keep the range with the smallest quantization error on the recorded samples."""
        q_max = 2 ** self.bits - 1
        for i in range(len(self._samples)):
            if not self._samples[i]:
                raise RuntimeError("activation quantizer saw no calibration data; was the layer ever called?")
            x = torch.cat(self._samples[i])
            if x.numel() > max_samples:
                x = x[torch.randperm(x.numel(), generator=self.generator)[:max_samples]]
            lo0, hi0 = min(self._range[i][0], 0.0), max(self._range[i][1], 0.0)
            shrink = 1 - torch.arange(search_steps, dtype=torch.float64) / 100
            lo, hi = lo0 * shrink, hi0 * shrink                      # (K,) candidate ranges
            s = ((hi - lo).clamp_min(1e-8) / q_max).float()[:, None]  # (K, 1)
            z = torch.round(-lo.float()[:, None] / s)
            err = ((torch.clamp(torch.round(x[None] / s) + z, 0, q_max) - z) * s - x[None]).abs().pow(p).mean(1)
            k = int(torch.argmin(err))
            self.scale[i] = s[k, 0]
            self.zero[i] = z[k, 0]
            self._samples[i] = []
        self.mode = "quant"

    def extra_repr(self) -> str:
        return f"bits={self.bits}" + (f", split={self.split}" if self.split is not None else "")


class QuantAttnProcessor(nn.Module):
    """diffusers attention processor with fake-quantized q, k, v (``bits``) and softmax (``softmax_bits``).

    Same steps as diffusers' plain ``AttnProcessor`` (it materializes the attention matrix, so it is
    slower and heavier than SDPA; only A8 settings use it)."""

    def __init__(self, bits: int = 8, softmax_bits: int = 16, device=None):
        super().__init__()
        self.bits, self.softmax_bits = bits, softmax_bits
        self.q_quant = ActQuantizer(bits, device=device)
        self.k_quant = ActQuantizer(bits, device=device)
        self.v_quant = ActQuantizer(bits, device=device)
        self.p_quant = ActQuantizer(softmax_bits, device=device)

    def quantizers(self) -> list[ActQuantizer]:
        return [self.q_quant, self.k_quant, self.v_quant, self.p_quant]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # (B, C, H, W) -> (B, HW, C)
            B, C, H, W = hidden_states.shape
            hidden_states = hidden_states.view(B, C, H * W).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, seq_len, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = self.q_quant(attn.head_to_batch_dim(attn.to_q(hidden_states)))  # (B*heads, N, d)
        k = self.k_quant(attn.head_to_batch_dim(attn.to_k(context)))
        v = self.v_quant(attn.head_to_batch_dim(attn.to_v(context)))
        probs = self.p_quant(attn.get_attention_scores(q, k, attention_mask))  # (B*heads, N, M)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, v))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(B, C, H, W)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _attention_modules(model: nn.Module):
    from diffusers.models.attention_processor import Attention
    for name, mod in model.named_modules():
        if isinstance(mod, Attention):
            yield name, mod


def shortcut_splits(unet: nn.Module) -> dict[str, int]:
    """``{"up_blocks.i.resnets.j.conv_shortcut": c}``: the shortcut conv reads ``concat(h, skip)`` and
    ``h`` has ``c`` channels (the previous resnet's output, or the previous block's / the mid block's)."""
    splits = {}
    if not hasattr(unet, "up_blocks") or getattr(unet, "mid_block", None) is None:
        return splits
    prev = unet.mid_block.resnets[-1].out_channels
    for i, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(getattr(block, "resnets", [])):
            if getattr(resnet, "conv_shortcut", None) is not None:
                splits[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = prev
            prev = resnet.out_channels
    return splits


def activation_spec(model: nn.Module) -> dict:
    """What ``apply_activation_spec`` needs to rebuild the quantizers (recorded in saved folders)."""
    layers = {name: {"bits": m.act_quant.bits, "split": m.act_quant.split}
              for name, m in quantized_layers(model) if isinstance(m.act_quant, ActQuantizer)}
    attention = {}
    for name, mod in (_attention_modules(model) if layers else []):
        if isinstance(mod.processor, QuantAttnProcessor):
            attention[name] = {"bits": mod.processor.bits, "softmax_bits": mod.processor.softmax_bits}
    return {"layers": layers, "attention": attention} if layers or attention else {}


def apply_activation_spec(model: nn.Module, spec: Mapping) -> None:
    """Install empty (uncalibrated) quantizers as described by ``spec`` (on the model's device, meta ok)."""
    qlayers = dict(quantized_layers(model))
    for name, s in spec.get("layers", {}).items():
        if name not in qlayers:
            raise ValueError(f"activation quantizer for {name!r}, which is not a quantized layer of this model")
        dev = qlayers[name].qweight.device
        qlayers[name].act_quant = ActQuantizer(s["bits"], s.get("split"), device=dev)
    if spec.get("attention"):
        attn = dict(_attention_modules(model))
        for name, s in spec["attention"].items():
            if name not in attn:
                raise ValueError(f"attention quantizers for {name!r}, which is not an Attention module here")
            dev = next(attn[name].parameters()).device
            attn[name].set_processor(QuantAttnProcessor(s["bits"], s["softmax_bits"], device=dev))


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def calibrate_activations(unet: nn.Module, inputs: Iterable[Mapping], bits: int = 8, *,
                          softmax_bits: int = 16, split_shortcuts: bool = True, attention: bool = True,
                          samples_per_call: int = 4096, search_steps: int = 80, seed: int = 0) -> dict:
    """Install and calibrate activation quantizers on a weight-quantized UNet (in place).

    inputs: UNet keyword arguments, one dict per call (``sample``, ``timestep``,
        ``encoder_hidden_states``, ...), collected across sampling timesteps
        (:func:`collect_unet_inputs`).
    Returns ``{"quantizers": n, "calls": k}``.
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"--acts {bits}: activation width must be 2..16 bits")
    layers = list(quantized_layers(unet))
    if not layers:
        raise ValueError("calibrate_activations needs a weight-quantized model; run quantize_model first")
    splits = shortcut_splits(unet) if split_shortcuts else {}
    gen = torch.Generator().manual_seed(seed)
    spec = {"layers": {name: {"bits": bits, "split": splits.get(name)} for name, _ in layers}, "attention": {}}
    if attention:
        spec["attention"] = {name: {"bits": bits, "softmax_bits": softmax_bits}
                             for name, _ in _attention_modules(unet)}
    apply_activation_spec(unet, spec)
    quantizers = act_quantizers(unet)
    for q in quantizers:
        q.mode, q.samples_per_call, q.generator = "observe", samples_per_call, gen
    calls = 0
    try:
        with torch.no_grad():
            for kwargs in inputs:
                unet(**kwargs)
                calls += 1
        if calls == 0:
            raise ValueError("no calibration inputs were given")
        for q in quantizers:
            q.calibrate(search_steps)
    finally:
        for q in quantizers:
            q.generator = None
            if q.mode == "observe":
                q.mode = "quant"
    logger.info("calibrated %d activation quantizers on %d UNet calls", len(quantizers), calls)
    return {"quantizers": len(quantizers), "calls": calls}


def set_activation_quant(model: nn.Module, enabled: bool) -> None:
    """Switch every activation quantizer on (``quant``) or off (weight-only compute)."""
    for q in act_quantizers(model):
        q.mode = "quant" if enabled else "off"


@torch.no_grad()
def collect_unet_inputs(unet, text_encoder, tokenizer, scheduler, prompts: list[str], *,
                        num_inference_steps: int = 25, guidance_scale: float = 7.5, height: int | None = None,
                        width: int | None = None, vae_scale_factor: int = 8, every: int = 1,
                        seed: int = 0) -> list[dict]:
    """Timestep-aware calibration set (Q-Diffusion): sample each prompt with the float model and keep
    the UNet's inputs (x_t, t, text embedding; CFG batch of 2) at every ``every``-th step.

    ``scheduler`` is used as is (``set_timesteps``/``step``); latents are ``(1, C, H/f, W/f)`` with
    ``f = vae_scale_factor`` (``height``/``width`` default to the UNet's sample size times ``f``).
    """
    if not prompts:
        raise ValueError("no calibration prompts")
    gen = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    h = (height // vae_scale_factor) if height else size
    w = (width // vae_scale_factor) if width else size
    device = next(unet.parameters()).device

    def encode(texts):
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        return text_encoder(ids)[0]

    uncond = encode([""])
    out = []
    for prompt in prompts:
        cond = torch.cat([uncond, encode([prompt])])
        scheduler.set_timesteps(num_inference_steps)
        latents = torch.randn(1, unet.config.in_channels, h, w, generator=gen) * scheduler.init_noise_sigma
        latents = latents.to(device)
        for i, t in enumerate(scheduler.timesteps):
            x_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            if i % every == 0:
                out.append({"sample": x_in.clone(), "timestep": t.clone() if torch.is_tensor(t) else t,
                            "encoder_hidden_states": cond})
            eps_u, eps_c = unet(x_in, t, encoder_hidden_states=cond).sample.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents).prev_sample
    return out
