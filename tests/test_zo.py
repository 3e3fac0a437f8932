"""Math of the zeroth-order estimators and ZO-Adam on toy problems."""
import math

import pytest
import torch

from quantdream.optim.zo import RandomGradientEstimator, ZOAdam


@pytest.fixture(autouse=True)
def one_thread():
    """The suite shares 2 cores with other jobs; one thread avoids oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

D = 16


def quadratic(seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=g)
    A = M @ M.T / d + torch.eye(d)
    b = torch.randn(d, generator=g)
    theta = torch.randn(d, generator=g)
    f = lambda X: 0.5 * torch.einsum("ki,ij,kj->k", X, A, X) + X @ b   # batched (K, d) -> (K,)
    f.A, f.b = A, b
    return f, theta, A @ theta + b


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("scheme,dist", [("forward", "gaussian"), ("central", "gaussian"), ("central", "rademacher")])
def test_estimate_points_along_true_gradient(scheme, dist):
    f, theta, grad = quadratic()
    est = RandomGradientEstimator(n=2000, mu=1e-3, scheme=scheme, distribution=dist, normalize=False)
    g, losses = est(f, theta, torch.Generator().manual_seed(1))
    assert losses.shape == (est.num_evaluations,)
    assert cosine(g, grad) > 0.9


def test_estimate_is_unbiased():
    """The mean over many draws of the unnormalised one-sided estimate approaches the true gradient."""
    f, theta, grad = quadratic()
    est = RandomGradientEstimator(n=10, mu=1e-4, normalize=False)
    gen = torch.Generator().manual_seed(2)
    mean = torch.stack([est(f, theta, gen)[0] for _ in range(2000)]).mean(0)   # 20,000 directions
    assert (mean - grad).norm() / grad.norm() < 0.1


def test_normalisation_is_the_reference_constant():
    f, theta, _ = quadratic()
    raw = RandomGradientEstimator(n=2, normalize=False)
    nrm = RandomGradientEstimator(n=2, normalize=True)
    e = raw.directions(theta.shape, torch.Generator().manual_seed(3))
    losses = f(raw.candidates(theta, e))
    for d_eff in (None, 10):
        d = D if d_eff is None else d_eff
        expected = raw.estimate(losses, e) / math.sqrt((d + 2 - 1) / 2)
        torch.testing.assert_close(nrm.estimate(losses, e, d_eff), expected)
    # d = 768, n = 2: the divisor of methods.md is n * sqrt(384.5) = 39.2
    assert 2 * math.sqrt((768 + 1) / 2) == pytest.approx(39.2, abs=0.05)


def test_common_random_numbers_cancel_shared_noise():
    """A noise term shared by all candidates of one estimate (same image, eps, t) does not enter g."""
    f, theta, _ = quadratic()
    est = RandomGradientEstimator(n=4)
    e = est.directions(theta.shape, torch.Generator().manual_seed(4))
    X = est.candidates(theta, e)
    shared = f(X) + 3.7                       # the same noise draw for every candidate
    torch.testing.assert_close(est.estimate(shared, e), est.estimate(f(X), e))
    independent = f(X) + 1e-2 * torch.randn(len(X), generator=torch.Generator().manual_seed(5))
    assert (est.estimate(independent, e) - est.estimate(f(X), e)).norm() > 1.0


def test_candidates_layout_and_cost():
    theta = torch.arange(3.0)
    fwd = RandomGradientEstimator(n=2, mu=0.5)
    e = fwd.directions(theta.shape, torch.Generator().manual_seed(0))
    X = fwd.candidates(theta, e)
    assert fwd.num_evaluations == 3 and X.shape == (3, 3)
    torch.testing.assert_close(X[0], theta)
    torch.testing.assert_close(X[1:], theta + 0.5 * e)
    cen = RandomGradientEstimator(n=2, mu=0.5, scheme="central")
    assert cen.num_evaluations == 4
    torch.testing.assert_close(cen.candidates(theta, e), torch.cat([theta + 0.5 * e, theta - 0.5 * e]))
    assert set(RandomGradientEstimator(n=3, distribution="rademacher").directions((50,), torch.Generator()).unique().tolist()) == {-1.0, 1.0}


def test_same_generator_state_same_directions():
    est = RandomGradientEstimator(n=2)
    a = est.directions((8,), torch.Generator().manual_seed(9))
    b = est.directions((8,), torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_zo_adam_matches_hand_computed_steps():
    opt = ZOAdam(lr=0.1, betas=(0.9, 0.999), eps=1e-3)
    theta = torch.tensor([1.0, 2.0])
    # step 1: m_hat = g, v_hat = g^2  ->  theta -= lr * g / (|g| + eps)
    opt.step(theta, torch.tensor([0.5, -1.0]))
    expected1 = [1.0 - 0.1 * 0.5 / (0.5 + 1e-3), 2.0 + 0.1 * 1.0 / (1.0 + 1e-3)]
    torch.testing.assert_close(theta, torch.tensor(expected1))
    # step 2, by hand: m = 0.9 m1 + 0.1 g2, v = 0.999 v1 + 0.001 g2^2
    g1, g2 = [0.5, -1.0], [0.25, 0.5]
    m = [0.9 * (0.1 * a) + 0.1 * b for a, b in zip(g1, g2)]
    v = [0.999 * (0.001 * a * a) + 0.001 * b * b for a, b in zip(g1, g2)]
    mh = [x / (1 - 0.9 ** 2) for x in m]
    vh = [x / (1 - 0.999 ** 2) for x in v]
    expected2 = [t - 0.1 * a / (math.sqrt(b) + 1e-3) for t, a, b in zip(expected1, mh, vh)]
    opt.step(theta, torch.tensor(g2))
    torch.testing.assert_close(theta, torch.tensor(expected2))
    assert opt.k == 2


def test_zo_adam_state_round_trip():
    a, b = ZOAdam(lr=0.05), ZOAdam(lr=0.05)
    ta, tb = torch.zeros(4), torch.zeros(4)
    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(4, generator=gen) for _ in range(5)]
    for g in gs[:3]:
        a.step(ta, g)
        b.step(tb, g)
    c = ZOAdam(lr=1.0)
    c.load_state_dict(b.state_dict())
    tc = tb.clone()
    for g in gs[3:]:
        a.step(ta, g)
        c.step(tc, g)
    assert torch.equal(ta, tc)


def test_zo_adam_solves_a_quadratic_from_estimates():
    f, theta, _ = quadratic(d=8)
    est = RandomGradientEstimator(n=2)
    opt = ZOAdam(lr=0.05)
    gen = torch.Generator().manual_seed(0)
    x = theta.clone()
    f_min = float(f(torch.linalg.solve(f.A, -f.b)[None]))
    start = float(f(x[None]))
    for _ in range(600):
        g, _ = est(f, x, gen)
        opt.step(x, g)
    assert float(f(x[None])) - f_min < 0.05 * (start - f_min)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0), "n must be >= 1"), (dict(mu=0.0), "mu must be > 0"),
    (dict(scheme="two-point"), "unknown estimator scheme 'two-point'"),
    (dict(distribution="uniform"), "unknown direction distribution"),
])
def test_bad_estimator_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandomGradientEstimator(**kwargs)


def test_bad_adam_settings():
    with pytest.raises(ValueError, match="learning rate must be > 0"):
        ZOAdam(lr=0)
