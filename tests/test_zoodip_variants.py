"""ZOODiP's beyond-the-paper switches on a toy objective: the cosine step-size schedule and
directions drawn inside the Subspace Gradient's kept subspace or the vocabulary's principal subspace.
Defaults must stay the paper's."""
import math
from types import SimpleNamespace

import pytest
import torch

from quantdream.methods.base import Streams
from quantdream.methods.zoodip import Zoodip, ZoodipConfig, ZoodipFast, ZoodipFastConfig

D = 24


class Quadratic:
    """Stands in for DenoisingObjective: L(theta) = 0.5 |theta - target|^2, batched over candidates."""

    num_train_timesteps = 1000
    device = torch.device("cpu")

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.target = torch.randn(1, D, generator=g)
        self.seen = []
        # a token table whose rows vary in the first 6 coordinates (and barely elsewhere); row 99 is the placeholder
        table = torch.cat([torch.randn(100, 6, generator=g) * 3, torch.randn(100, D - 6, generator=g) * 1e-3], 1)
        table[99] = 100.0
        emb = torch.nn.Embedding(100, D)
        emb.weight.data.copy_(table)
        self.text_encoder = SimpleNamespace(get_input_embeddings=lambda: emb)
        self.placeholder = SimpleNamespace(ids=[99])

    def set_timesteps(self, sampler):
        pass

    def token_table(self):
        return self.text_encoder.get_input_embeddings().weight

    def __call__(self, candidates, batch, generator):
        self.seen.append(candidates.clone())
        return 0.5 * (candidates - self.target).pow(2).flatten(1).sum(1)


def make(**kw):
    obj = Quadratic()
    m = Zoodip(obj, torch.zeros(1, D), ZoodipConfig(**kw))
    m.setup(SimpleNamespace(steps=kw.pop("_steps", 50)))
    return m, obj


def run(m, steps):
    streams = Streams.from_seed(0)
    for _ in range(steps):
        m.step(None, streams)


def test_defaults_are_the_papers():
    c = ZoodipConfig()
    assert (c.schedule, c.subspace_directions) == ("constant", False)
    m, _ = make()
    run(m, 5)
    assert m.lr == c.lr and m.adam.lr == c.lr


def test_cosine_schedule_starts_at_lr_and_ends_at_final_fraction():
    m, _ = make(lr=0.1, schedule="cosine", final_lr=0.2, tau=4)
    assert m.lr == pytest.approx(0.1)
    run(m, 25)
    mid = 0.1 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 25 / 49)))
    assert m.lr == pytest.approx(mid)
    run(m, 24)
    assert m.lr == pytest.approx(0.02)            # the 50th (last) step runs at lr * final_lr


def test_schedule_resumes_from_the_adam_step_count():
    a, _ = make(lr=0.1, schedule="cosine", tau=4)
    run(a, 10)
    b, _ = make(lr=0.1, schedule="cosine", tau=4)
    b.load_state_dict(a.state_dict())
    assert b.lr == a.lr and b.adam.k == 10


def test_subspace_directions_are_orthogonal_to_the_removed_directions():
    m, obj = make(lr=0.05, tau=8, nu=0.2, subspace_directions=True)
    run(m, 8)                                     # the 8th push builds P_nu
    P = m.sg.P
    assert P is not None and P.shape[0] > 0
    obj.seen.clear()
    run(m, 3)
    for cand in obj.seen:
        e = (cand[1:] - cand[:1]).reshape(len(cand) - 1, -1)   # mu * e_i
        assert (e @ P.T).abs().max() < 1e-4 * e.abs().max()   # float32 rounding of theta + mu e
        assert e.abs().max() > 0


def test_subspace_directions_still_minimise():
    m, obj = make(lr=0.05, tau=8, subspace_directions=True, schedule="cosine", n=4)
    start = float(obj(m.theta[None], None, None))
    run(m, 50)
    assert float(obj(m.theta[None], None, None)) < 0.5 * start


def test_vocab_directions_lie_in_the_vocabulary_subspace_and_minimise():
    m, obj = make(lr=0.05, vocab_directions=6, schedule="cosine", n=4)
    assert m.d_eff == 6
    run(m, 60)
    for cand in obj.seen:
        e = (cand[1:] - cand[:1]).reshape(len(cand) - 1, -1)   # mu * e_i
        assert e[:, 6:].abs().max() < 1e-2 * e[:, :6].abs().max()      # the placeholder row (100.0) was left out
    target = obj.target.clone()
    target[:, 6:] = 0                                             # the best point the subspace can reach
    assert (m.theta - target).norm() < 0.5 * target.norm()


def test_expected_estimator_is_the_mean_of_the_rge_estimates():
    """The study oracle (estimator = "expected") gives E_e[g]: the RGE estimates' average over many directions."""
    m, obj = make(estimator="expected", sg=False, n=2, lr=0.05)
    g, loss = m.expected_estimate(None, Streams.from_seed(0))
    exact = (m.theta - obj.target) / math.sqrt((D + 2 - 1) / 2)
    assert torch.allclose(g, exact, atol=1e-6) and float(loss) == pytest.approx(0.5 * float(obj.target.pow(2).sum()))
    gen = torch.Generator().manual_seed(1)
    draws = [m.estimator(lambda c: obj(c, None, None), m.theta, gen, D)[0] for _ in range(20000)]
    assert (torch.stack(draws).mean(0) - exact).norm() < 0.05 * exact.norm()
    run(m, 50)                                    # and it minimises through ZO-Adam as the real estimator does
    assert float(obj(m.theta[None], None, None)) < 0.5 * float(obj(torch.zeros(1, 1, D), None, None))


@pytest.mark.parametrize("kw,match", [({"schedule": "linear"}, "zoodip.schedule = 'linear'"),
                                      ({"estimator": "exact"}, "zoodip.estimator = 'exact'"),
                                      ({"vocab_directions": -1}, "zoodip.vocab_directions = -1"),
                                      ({"subspace_directions": True, "sg": False}, "needs zoodip.sg = true")])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_zoodip_fast_is_zoodip_with_16_vocabulary_directions():
    """The shipped method is exactly the benchmarked variant: same steps as Zoodip(vocab_directions=16)."""
    assert ZoodipFastConfig() == ZoodipFastConfig(**{**ZoodipConfig().__dict__, "vocab_directions": 16})
    a = Zoodip(Quadratic(), torch.zeros(1, D), ZoodipConfig(vocab_directions=16, tau=8))
    b = ZoodipFast(Quadratic(), torch.zeros(1, D), ZoodipFastConfig(tau=8))
    for m in (a, b):
        m.setup(SimpleNamespace(steps=20))
        run(m, 20)
    assert b.d_eff == 16 and torch.equal(a.theta, b.theta)
    with pytest.raises(ValueError, match="zoodip_fast.vocab_directions = 99"):
        ZoodipFast(Quadratic(), torch.zeros(1, D), ZoodipFastConfig(vocab_directions=99))
