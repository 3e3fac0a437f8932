"""Every method's objective targets what the model's scheduler says its UNet predicts (epsilon,
v_prediction, sample): a stand-in UNet that returns the exact target of one type has loss 0 under
that type and a clearly positive loss under the others."""
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from quantdream.data.dataset import Batch
from quantdream.diffusion import PREDICTION_TYPES, TimestepSampler, target
from quantdream.methods.base import DenoisingObjective, add_placeholder
from quantdream.models.embedded import LATENT_CHANNELS, SCHEDULER_CONFIG


class ExactUNet(torch.nn.Module):
    """Knows the clean latents z, so from z_t and t it recovers eps and returns the exact target."""

    def __init__(self, z, alphas_cumprod, prediction_type):
        super().__init__()
        self.z, self.abar, self.kind = z, alphas_cumprod, prediction_type
        self.dtype = torch.float32

    def forward(self, z_t, t, cond):
        z = self.z.repeat(z_t.shape[0] // self.z.shape[0], 1, 1, 1)
        a = self.abar[t].view(-1, 1, 1, 1)
        eps = (z_t - a.sqrt() * z) / (1 - a).sqrt()
        return SimpleNamespace(sample=target(z, eps, t, self.abar, self.kind))


def loss(frozen_tiny, trained_on: str, returns: str) -> float:
    sched = DDPMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": trained_on})
    tok, te = frozen_tiny["tokenizer"], frozen_tiny["text_encoder"]
    token = f"<bag-{trained_on}-{returns}>"
    ph = add_placeholder(tok, te, token, "bag")
    z = torch.randn(2, LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(0))
    unet = ExactUNet(z, sched.alphas_cumprod.float(), returns)
    obj = DenoisingObjective(tok, te, unet, sched, ph, timesteps=TimestepSampler(100, 900))
    batch = Batch(latents=z, captions=[f"a photo of a {token}"] * 2, index=[0, 0], flipped=[False, False])
    theta = torch.stack([ph.init_vectors, ph.init_vectors + 0.1])       # two candidates (K = 2)
    return obj(theta, batch, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_exact_prediction_has_zero_loss(frozen_tiny, kind):
    right = loss(frozen_tiny, kind, kind)
    assert right.shape == (2,) and right.abs().max().item() < 1e-8
    for other in PREDICTION_TYPES:
        if other != kind:
            assert loss(frozen_tiny, kind, other).min().item() > 1e-2, (kind, other)


def test_v_target_matches_diffusers():
    sched = DDPMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    torch.testing.assert_close(target(z, eps, t, sched.alphas_cumprod, "v_prediction"), sched.get_velocity(z, eps, t))


def test_unknown_prediction_type_is_refused(frozen_tiny):
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        target(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([0]), torch.ones(10), "flow")
