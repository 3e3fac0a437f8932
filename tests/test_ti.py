"""The shared objective and the two methods on a random tiny model (in memory, nothing saved):
the token splice equals a stock pipeline's encoding, TI's gradient reaches only the token rows,
ZOODiP runs without autograd and evaluates all candidates in one batch."""
import copy

import pytest
import torch

from quantdream.data.dataset import Batch
from quantdream.methods.base import DenoisingObjective, Streams, add_placeholder, check_placeholder
from quantdream.methods.ti import TIConfig, TextualInversion
from quantdream.methods.zoodip import ZoodipConfig, Zoodip
from quantdream.models.embedded import LATENT_CHANNELS


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def setup(c, num_vectors=1):
    ph = add_placeholder(c["tokenizer"], c["text_encoder"], "<my-bag>", "bag", num_vectors)
    obj = DenoisingObjective(c["tokenizer"], c["text_encoder"], c["unet"], c["scheduler"], ph)
    return ph, obj


def batch(captions=("a photo of a <my-bag>",), seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(latents=torch.randn(len(captions), LATENT_CHANNELS, 16, 16, generator=g), captions=list(captions),
                 index=[0] * len(captions), flipped=[False] * len(captions))


def test_placeholder_added_like_sd(frozen_tiny):
    tok, te = frozen_tiny["tokenizer"], frozen_tiny["text_encoder"]
    n0 = len(tok)
    ph = add_placeholder(tok, te, "<my-bag>", "bag", num_vectors=3)
    assert ph.tokens == ["<my-bag>", "<my-bag>_1", "<my-bag>_2"] and ph.text == "<my-bag> <my-bag>_1 <my-bag>_2"
    assert len(tok) == n0 + 3 and te.get_input_embeddings().weight.shape[0] == n0 + 3
    bag = tok.encode("bag", add_special_tokens=False)[0]
    for i in ph.ids:
        torch.testing.assert_close(te.get_input_embeddings().weight[i], te.get_input_embeddings().weight[bag])
    assert tok("a <my-bag> <my-bag>_1 <my-bag>_2", add_special_tokens=False).input_ids[1:] == ph.ids


@pytest.mark.parametrize("token,init,match", [
    ("bag", "bag", r"--token 'bag' is already in the tokenizer's vocabulary"),
    ("<my bag>", "bag", "must be one word without spaces"),
    ("<my-bag>", "stuffed animal", r"--init-word 'stuffed animal' splits into 2 tokens"),
])
def test_bad_tokens_are_refused_before_any_change(frozen_tiny, token, init, match):
    tok, te = frozen_tiny["tokenizer"], frozen_tiny["text_encoder"]
    n0, w0 = len(tok), te.get_input_embeddings().weight.clone()
    with pytest.raises(ValueError, match=match):
        add_placeholder(tok, te, token, init)
    assert len(tok) == n0 and torch.equal(te.get_input_embeddings().weight, w0)


def test_width_mismatch_is_refused(frozen_tiny):
    with pytest.raises(ValueError, match=r"shape \(1, 1024\) but this model needs \(1, 768\)"):
        check_placeholder(frozen_tiny["tokenizer"], frozen_tiny["text_encoder"], "<x>", "bag", 1, torch.zeros(1, 1024))


def test_splice_matches_the_embedding_table(frozen_tiny):
    """Conditioning with theta spliced in == writing theta into the table (what a stock pipeline does)."""
    ph, obj = setup(frozen_tiny, num_vectors=2)
    theta = torch.randn(2, 768, generator=torch.Generator().manual_seed(1)) * 0.02
    caps = ["a photo of a " + ph.text]
    cond = obj.encode_text(theta[None], caps)
    obj.close()
    te = frozen_tiny["text_encoder"]
    with torch.no_grad():
        for i, v in zip(ph.ids, theta):
            te.get_input_embeddings().weight[i] = v
    ref = te(obj.token_ids(caps))[0]
    torch.testing.assert_close(cond, ref, atol=1e-5, rtol=1e-5)


def test_candidates_share_noise_and_batching_is_exact(frozen_tiny):
    ph, obj = setup(frozen_tiny)
    b = batch()
    th = ph.init_vectors
    other = th + 0.05 * torch.randn(th.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        both = obj(torch.stack([th, other, th]), b, torch.Generator().manual_seed(7))
        one = obj(th[None], b, torch.Generator().manual_seed(7))
        two = obj(other[None], b, torch.Generator().manual_seed(7))
    torch.testing.assert_close(both[0], both[2])                    # same candidate, same loss: CRN
    torch.testing.assert_close(both, torch.stack([one[0], two[0], one[0]]), atol=1e-5, rtol=1e-5)
    assert obj.forward_passes == 3 + 1 + 1


def test_one_unet_row_at_a_time_gives_the_batched_losses(frozen_tiny):
    ph, obj = setup(frozen_tiny)
    b = batch(("a photo of a <my-bag>", "a red <my-bag>"))
    theta = ph.init_vectors[None] + 0.01 * torch.randn(3, *ph.init_vectors.shape,
                                                       generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = obj(theta, b, torch.Generator().manual_seed(5))
        obj.unet_batch = 1                                          # the low-memory mode's setting
        rows = obj(theta, b, torch.Generator().manual_seed(5))
    torch.testing.assert_close(rows, full, rtol=1e-5, atol=1e-7)
    assert obj.forward_passes == 12


def test_ti_gradient_reaches_only_the_token_rows(frozen_tiny):
    ph, obj = setup(frozen_tiny)
    frozen = {n: p.clone() for m in ("text_encoder", "unet") for n, p in frozen_tiny[m].named_parameters(prefix=m)}
    ti = TextualInversion(obj, ph.init_vectors, TIConfig(lr=1e-2))
    theta0 = ti.theta.detach().clone()
    ti.step(batch(), Streams.from_seed(0))
    assert ti.theta.grad is not None and ti.theta.grad.abs().sum() > 0
    assert not torch.equal(ti.theta.detach(), theta0)
    for m in ("text_encoder", "unet", "vae"):
        for n, p in frozen_tiny[m].named_parameters():
            assert p.grad is None and not p.requires_grad, n
    for m in ("text_encoder", "unet"):
        for n, p in frozen_tiny[m].named_parameters(prefix=m):
            assert torch.equal(p, frozen[n]), n                      # incl. the whole embedding table


def test_ti_gradient_matches_finite_differences(frozen_tiny):
    ph, obj = setup(frozen_tiny)
    theta = ph.init_vectors.clone().requires_grad_(True)
    b = batch()
    loss = obj(theta[None], b, torch.Generator().manual_seed(3))[0]
    (g,) = torch.autograd.grad(loss, theta)
    d = torch.randn(theta.shape, generator=torch.Generator().manual_seed(4))
    d = d / d.norm()
    h = 1e-2
    with torch.no_grad():
        lp = obj((theta + h * d)[None], b, torch.Generator().manual_seed(3))[0]
        lm = obj((theta - h * d)[None], b, torch.Generator().manual_seed(3))[0]
    assert float((lp - lm) / (2 * h)) == pytest.approx(float((g * d).sum()), rel=0.05, abs=1e-5)


def test_zoodip_step_without_autograd_in_one_batch(frozen_tiny):
    ph, obj = setup(frozen_tiny)
    calls = []
    hook = frozen_tiny["unet"].register_forward_hook(lambda m, i, o: calls.append((i[0].shape[0], torch.is_grad_enabled())))
    zo = Zoodip(obj, ph.init_vectors, ZoodipConfig(n=3, tau=4))
    streams = Streams.from_seed(0)
    table0 = frozen_tiny["text_encoder"].get_input_embeddings().weight.clone()
    theta0 = zo.theta.clone()
    for _ in range(5):
        loss = zo.step(batch(), streams)
    hook.remove()
    assert calls == [(4, False)] * 5                                 # clean + 3 perturbed, one UNet call, no grad
    assert not loss.requires_grad and obj.forward_passes == 20
    assert not torch.equal(zo.theta, theta0)
    assert torch.equal(frozen_tiny["text_encoder"].get_input_embeddings().weight, table0)
    assert zo.sg.count == 5 and zo.sg.P is not None and zo.d_eff == 768 - zo.sg.P.shape[0]
    assert obj.timesteps.t_low == 500 and obj.timesteps.t_high == 900


def test_zoodip_switches(frozen_tiny):
    ph, obj = setup(frozen_tiny)
    zo = Zoodip(obj, ph.init_vectors, ZoodipConfig(sg=False, puts=False, scheme="central", n=2))
    assert zo.sg is None and zo.d_eff == 768 and obj.timesteps.t_low == 0 and obj.timesteps.t_high == 1000
    zo.step(batch(), Streams.from_seed(0))
    assert obj.forward_passes == 4


def test_zoodip_state_round_trip_continues_identically(frozen_tiny):
    ph, obj = setup(frozen_tiny)
    cfg = ZoodipConfig(tau=3, lr=1e-2)
    a = Zoodip(obj, ph.init_vectors, cfg)
    sa = Streams.from_seed(1)
    for _ in range(4):
        a.step(batch(), sa)
    b = Zoodip(obj, ph.init_vectors, cfg)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    sb = Streams.from_seed(99)
    sb.load_state_dict(sa.state_dict())
    for _ in range(3):
        a.step(batch(), sa)
        b.step(batch(), sb)
    assert torch.equal(a.theta, b.theta)
