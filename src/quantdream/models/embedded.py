"""The embedded model: Stable Diffusion's component classes at a size that trains on 2 CPU cores.

Same classes as SD-1.x (``AutoencoderKL``, ``UNet2DConditionModel``, ``CLIPTextModel`` +
``CLIPTokenizer``, ``DDPMScheduler``), text width 768 so a learned token has SD-1.5's shape.
Differences from SD-1.5, each for the training/storage budget: 64 px images, a 4x autoencoder
(16x16x8 latents: 8 channels instead of SD's 4, because with 4 a 2,400-step autoencoder kept backgrounds
but blurred the objects and erased their prints, object PSNR 17.5 dB), a 2-layer text encoder with a 1.7k-token CLIP-format vocabulary, 32-token
prompts, a 3-level UNet.
"""
from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TEXT_WIDTH = 768
LATENT_CHANNELS = 8
MAX_LENGTH = 32
PACKAGE_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "embedded-model"
TOKENIZER_DIR = PACKAGE_MODEL_DIR / "tokenizer"
# embedded models by name (``--model NAME``); ``tiny`` is an alias of TINY_DEFAULT
EMBEDDED_MODELS = {"tiny-v1": PACKAGE_MODEL_DIR, "tiny-v2": PACKAGE_MODEL_DIR.parent / "embedded-model-v2"}
TINY_DEFAULT = "tiny-v1"


def embedded_model_dir(name: str) -> Path | None:
    """The folder of embedded model ``name`` ("tiny", "tiny-v1", "tiny-v2"), or None if ``name`` is no such name."""
    return EMBEDDED_MODELS.get(TINY_DEFAULT if name == "tiny" else name)

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(64, 96, 128), layers_per_block=1, norm_num_groups=16,
    mid_block_add_attention=False, scaling_factor=1.0,  # set from the latents' std after VAE training
)

UNET_CONFIG = dict(
    sample_size=16, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
    block_out_channels=(64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=32,
)

SCHEDULER_CONFIG = dict(  # SD-1.x's training schedule
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, steps_offset=1,
)


# v2 (models/train_v2.py): a 4-level UNet that reaches 2x2 (position is decided where every latent
# pixel sees every other), v-prediction, and a narrower text MLP to stay inside the size budget
UNET_CONFIG_V2 = dict(
    sample_size=16, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
    block_out_channels=(64, 96, 96, 128),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=32,
)
SCHEDULER_CONFIG_V2 = dict(SCHEDULER_CONFIG, prediction_type="v_prediction")
TEXT_INTERMEDIATE = {"v1": 1024, "v2": 512}


def text_config(tokenizer: CLIPTokenizer, recipe: str = "v1") -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=TEXT_INTERMEDIATE[recipe],
        num_hidden_layers=2,
        num_attention_heads=12, max_position_embeddings=MAX_LENGTH, projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_components(tokenizer_dir: str | Path = TOKENIZER_DIR, recipe: str = "v1") -> dict:
    """Fresh, randomly initialized components of the embedded model (``recipe`` "v1" or "v2")."""
    if recipe not in TEXT_INTERMEDIATE:
        raise ValueError(f"recipe must be one of {sorted(TEXT_INTERMEDIATE)}, got {recipe!r}")
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    v2 = recipe == "v2"
    return dict(
        tokenizer=tokenizer,
        text_encoder=CLIPTextModel(text_config(tokenizer, recipe)),
        vae=AutoencoderKL(**VAE_CONFIG),
        unet=UNet2DConditionModel(**(UNET_CONFIG_V2 if v2 else UNET_CONFIG)),
        scheduler=DDPMScheduler(**(SCHEDULER_CONFIG_V2 if v2 else SCHEDULER_CONFIG)),
    )


def vae_loss(vae, x, m, kl_weight: float):
    """The autoencoder's training loss (v1 and v2): object-weighted L1, an edge term against blur, and KL."""
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample()).sample.float()
    w = 1.0 + 4.0 * m  # the renderer knows the object: weight its pixels 5x
    l1 = ((rec - x).abs() * w).mean()
    # edge term against blur: match horizontal and vertical differences
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]
    edge = ((dx(rec) - dx(x)).abs() * w[..., :, 1:]).mean() + ((dy(rec) - dy(x)).abs() * w[..., 1:, :]).mean()
    kl = post.kl().mean() / x[0].numel()
    return l1 + 0.5 * edge + kl_weight * kl, rec


def vae_train_step(vae, opt, x, m, kl_weight: float, device_type: str, bf16: bool):
    """One optimizer step on ``vae_loss`` (bf16 autocast when ``bf16``, gradients clipped at norm 1)."""
    import torch
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        loss, rec = vae_loss(vae, x, m, kl_weight)
    clipped_step(opt, loss, vae.parameters())
    return loss, rec


def clipped_step(opt, loss, params) -> None:
    """The training step of every embedded-model stage: backward, gradients clipped at norm 1, update."""
    import torch
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
