"""The embedded model that ships in the package: stock diffusers loads it with no quantdream code, and it
respects the issue's budgets (40 MB of safetensors, 64x64 images). Its quality is measured by
benchmarks/embedded_model.py, not here."""
import json

import numpy as np
import pytest
import torch

from quantdream.models.embedded import PACKAGE_MODEL_DIR

shipped = pytest.mark.skipif(not (PACKAGE_MODEL_DIR / "model_index.json").is_file(),
                             reason="the packaged embedded model is still training (only its autoencoder ships)")


def test_weights_fit_the_budget():
    files = list(PACKAGE_MODEL_DIR.rglob("*.safetensors"))
    assert files, "at least the trained autoencoder ships"
    assert sum(f.stat().st_size for f in files) <= 40e6


@shipped
def test_stock_pipeline_loads_and_renders_the_packaged_model():
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(PACKAGE_MODEL_DIR), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    info = json.loads((PACKAGE_MODEL_DIR / "training.json").read_text())
    assert info["unet_steps"] > 0 and info["scaling_factor"] == pipe.vae.config.scaling_factor
    out = pipe("a large red bag on a striped blue background", num_inference_steps=4, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all() and out.std() > 0.01
