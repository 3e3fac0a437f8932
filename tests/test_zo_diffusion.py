"""Timestep samplers (uniform, PUTS) and the forward-diffusion / loss helpers."""
import pytest
import torch

from quantdream.diffusion import TimestepSampler, add_noise, draw_noise, epsilon_mse, puts, uniform


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_puts_bounds_and_coverage():
    t = puts()(20000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64
    assert int(t.min()) == 500 and int(t.max()) == 899       # [T_L, T_U): 900 excluded, both ends reached
    counts = torch.bincount(t - 500, minlength=400).float()
    assert counts.std() / counts.mean() < 0.25                 # roughly uniform


def test_uniform_covers_all_timesteps():
    t = uniform(1000)(50000, torch.Generator().manual_seed(1))
    assert int(t.min()) == 0 and int(t.max()) == 999


def test_sampler_uses_only_its_generator():
    torch.manual_seed(123)
    a = puts()(8, torch.Generator().manual_seed(5))
    torch.manual_seed(456)
    b = puts()(8, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("lo,hi", [(900, 500), (-1, 10), (5, 5)])
def test_bad_ranges(lo, hi):
    with pytest.raises(ValueError, match=r"timestep range .* is empty or negative"):
        TimestepSampler(lo, hi)


def test_range_past_scheduler_is_refused():
    with pytest.raises(ValueError, match="goes past the scheduler's 1000 training timesteps"):
        TimestepSampler(500, 1200).check(1000)


def test_add_noise_is_the_closed_form():
    abar = torch.linspace(0.99, 0.01, 1000)
    z, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    zt = add_noise(z, eps, t, abar)
    for i in range(3):
        a = abar[t[i]]
        torch.testing.assert_close(zt[i], a.sqrt() * z[i] + (1 - a).sqrt() * eps[i])


def test_epsilon_mse_per_sample():
    pred, eps = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    eps[1] *= 2
    torch.testing.assert_close(epsilon_mse(pred, eps), torch.tensor([1.0, 4.0]))


def test_draw_noise_is_reproducible():
    a = draw_noise((2, 4, 8, 8), puts(), torch.Generator().manual_seed(3))
    b = draw_noise((2, 4, 8, 8), puts(), torch.Generator().manual_seed(3))
    assert torch.equal(a.t, b.t) and torch.equal(a.eps, b.eps)
