"""Subspace Gradient: buffer schedule, cut-off, projector, against sklearn's PCA."""
import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from quantdream.optim.subspace import SubspaceGradient, low_variance_directions, standardize_columns


@pytest.fixture(autouse=True)
def one_thread():
    """The suite shares 2 cores with other jobs; one thread avoids oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def trajectory(tau, d, seed=0, decay=0.5, rotate=True):
    """A random walk whose steps have variances decaying geometrically over d orthogonal axes."""
    g = torch.Generator().manual_seed(seed)
    scales = decay ** torch.arange(d, dtype=torch.float32)
    walk = torch.cumsum(torch.randn(tau, d, generator=g) * scales, 0)
    if not rotate:
        return walk
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return walk @ Q.T


def test_standardize_matches_sklearn_and_keeps_constant_columns():
    B = trajectory(32, 6)
    B[:, 2] = 5.0
    ours = standardize_columns(B.double()).numpy()
    ref = StandardScaler().fit_transform(B.double().numpy())
    np.testing.assert_allclose(ours, ref, atol=1e-10)


def test_cutoff_and_directions_match_sklearn_pca():
    tau, d, nu = 40, 10, 1e-3
    B = trajectory(tau, d, decay=0.3)
    P, ratio = low_variance_directions(B, nu)
    X = StandardScaler().fit_transform(B.double().numpy())
    pca = PCA(n_components=min(tau, d)).fit(X)
    np.testing.assert_allclose(ratio.numpy(), pca.explained_variance_ratio_, atol=1e-10)
    i_star = int(np.where(np.cumsum(pca.explained_variance_ratio_) > 1 - nu)[0][0])
    ref = pca.components_[i_star + 1:]
    assert P.shape == (len(ref), d) and 0 < len(ref) < d
    # same subspace (signs of PCA components are arbitrary): compare projection matrices
    np.testing.assert_allclose(P.double().T @ P.double(), ref.T @ ref, atol=1e-5)


def test_cutoff_keeps_the_fewest_components_above_one_minus_nu():
    B = trajectory(64, 32, decay=0.6)
    for nu in (1e-1, 1e-2, 1e-3, 1e-4):
        P, ratio = low_variance_directions(B, nu)
        kept = len(ratio) - P.shape[0]
        cum = torch.cumsum(ratio, 0)
        assert cum[kept - 1] > 1 - nu
        assert kept == 1 or cum[kept - 2] <= 1 - nu


def test_projector_removes_exactly_the_chosen_directions_and_is_idempotent():
    d = 24
    sg = SubspaceGradient(dim=d, tau=16, nu=1e-2)
    for row in trajectory(16, d, decay=0.4):
        sg.push(row)
    P = sg.P
    r = P.shape[0]
    assert 0 < r < 16 and sg.d_eff == d - r
    torch.testing.assert_close(P @ P.T, torch.eye(r), atol=1e-5, rtol=0)   # orthonormal rows
    g = torch.randn(d, generator=torch.Generator().manual_seed(1))
    pg = sg.project(g)
    torch.testing.assert_close(P @ pg, torch.zeros(r), atol=1e-5, rtol=0)   # removed
    torch.testing.assert_close(sg.project(pg), pg, atol=1e-6, rtol=0)       # idempotent
    # a vector orthogonal to every removed direction passes unchanged
    h = g - (P @ g) @ P
    torch.testing.assert_close(sg.project(h), h, atol=1e-6, rtol=0)
    # directions outside the buffer's span (d - tau of them) are never removed
    assert r <= 16


def test_schedule_projector_only_every_tau_steps():
    d, tau = 12, 8
    sg = SubspaceGradient(dim=d, tau=tau, nu=1e-3)
    rows = trajectory(3 * tau, d)
    g = torch.ones(d)
    for k, row in enumerate(rows, start=1):
        rebuilt = sg.push(row)
        assert rebuilt == (k % tau == 0)
        if k < tau:
            assert sg.P is None and sg.d_eff == d and torch.equal(sg.project(g), g)
    # the last projector comes from exactly the last tau pushes (ring buffer)
    P_ref, _ = low_variance_directions(rows[-tau:], 1e-3)
    torch.testing.assert_close(sg.P.T @ sg.P, P_ref.T @ P_ref, atol=1e-5, rtol=0)


def test_paper_scale_smooth_trajectory():
    """tau=128, nu=1e-3, d=768: a smooth (twice-integrated) trajectory, like Adam's, concentrates its
    variance in few components, so most of the tau directions are removed (Fig. 8: > 80%)."""
    sg = SubspaceGradient(dim=768, tau=128, nu=1e-3)
    smooth = torch.cumsum(trajectory(128, 768, decay=1.0, rotate=False), 0)
    for row in smooth:
        sg.push(row)
    assert 0.5 * 128 < sg.P.shape[0] <= 128
    assert sg.d_eff == 768 - sg.P.shape[0]


def test_multi_vector_tokens_are_flattened():
    sg = SubspaceGradient(dim=2 * 6, tau=4)
    for row in trajectory(4, 12):
        sg.push(row.view(2, 6))
    g = torch.randn(2, 6)
    assert sg.project(g).shape == (2, 6)


def test_state_round_trip():
    sg = SubspaceGradient(dim=10, tau=4)
    for row in trajectory(6, 10):
        sg.push(row)
    other = SubspaceGradient(dim=10, tau=4)
    other.load_state_dict(sg.state_dict())
    assert other.count == 6 and torch.equal(other.P, sg.P) and torch.equal(other.buffer, sg.buffer)
    with pytest.raises(ValueError, match="dim=10, tau=4; this run has dim=10, tau=8"):
        SubspaceGradient(dim=10, tau=8).load_state_dict(sg.state_dict())


def test_bad_settings():
    with pytest.raises(ValueError, match="nu must lie in"):
        SubspaceGradient(dim=4, nu=1.5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        SubspaceGradient(dim=4, tau=1)
