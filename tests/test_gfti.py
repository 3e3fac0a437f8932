"""GF-TI pieces on toy problems: the CMA-ES adapter solves a sphere, resumes exactly, the PCA subspace
fits an embedded-sized vocabulary, class attention is the softmax-weighted mean of class rows."""
import pytest
import torch

from quantdream.methods.gfti import CMAES, class_attention_init, fit_pca


def test_cmaes_solves_a_16d_sphere_through_the_adapter():
    c = torch.linspace(-1, 1, 16)
    es = CMAES(16, sigma0=1.0, popsize=20, seed=3)
    best = float("inf")
    for _ in range(250):
        Q = es.ask()                                              # (20, 16)
        f = (Q - c).pow(2).sum(1)
        es.tell(f)
        best = min(best, float(f.min()))
    assert best < 1e-6
    assert (es.mean - c).abs().max() < 1e-3


def test_cmaes_state_round_trip_continues_identically():
    a = CMAES(8, popsize=6, seed=1)
    for _ in range(3):
        a.tell(a.ask().pow(2).sum(1))
    b = CMAES(8, popsize=6, seed=99)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.ask(), b.ask())


def test_pca_on_an_embedded_sized_vocabulary():
    table = torch.randn(1722, 768)                                # the embedded model: ~1.7k rows
    mu, V = fit_pca(table, 256)
    assert mu.shape == (768,) and V.shape == (256, 768)
    torch.testing.assert_close(V @ V.T, torch.eye(256), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="needs more than 256 vocabulary rows; this model has 100"):
        fit_pca(torch.randn(100, 768), 256)


def test_pca_in_chunks_equals_the_dense_pca_and_leaves_out_excluded_rows():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1000, 32, generator=g) * torch.linspace(3, 0.1, 32)
    table[7] = 1e3                                               # a placeholder row: must not enter the PCA
    keep = torch.ones(1000, dtype=torch.bool)
    keep[7] = False
    X = table[keep].double()
    evals, evecs = torch.linalg.eigh((X - X.mean(0)).T @ (X - X.mean(0)))
    dense = evecs[:, evals.argsort(descending=True)[:5]].T
    mu, V = fit_pca(table, 5, exclude=[7], chunk=96)
    torch.testing.assert_close(mu, X.mean(0).float())
    torch.testing.assert_close((V.double() @ dense.T).abs(), torch.eye(5, dtype=torch.float64), atol=1e-6, rtol=0)


class FakeEvaluator:
    def __init__(self, text_feats, image_feats):
        self.t, self.i = text_feats, image_feats

    def clip_text(self, prompts):
        return self.t[prompts[0].split()[-1]].expand(len(prompts), -1)

    def clip_image(self, pixels):
        return self.i.expand(pixels.shape[0], -1)


def test_class_attention_is_the_softmax_weighted_class_rows():
    from transformers import CLIPTokenizer
    from quantdream.models.embedded import TOKENIZER_DIR
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    table = torch.randn(len(tok), 768)
    k = {"bag": torch.tensor([1.0, 0.0]), "boot": torch.tensor([0.0, 1.0])}
    ev = FakeEvaluator(k, torch.tensor([1.0, 0.0]))
    e0 = class_attention_init(ev, torch.zeros(2, 3, 64, 64), tok, table, ["bag", "boot"], ["a photo of a {}"])
    w = torch.tensor([1.0, 0.0]).softmax(0)                       # raw cosines: 1 and 0
    rows = torch.stack([table[tok.encode(c, add_special_tokens=False)].mean(0) for c in ("bag", "boot")])
    torch.testing.assert_close(e0, w @ rows)
