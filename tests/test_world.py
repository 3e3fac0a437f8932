import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import needs_fmnist
from quantdream.world.captions import caption, vocabulary_words
from quantdream.world.render import (CLASSES, COLOUR_NAMES, POSITIONS, RES, Obj, Scene, render, render_batch,
                                     sample_scene)

SUBJECTS = Path(__file__).resolve().parent.parent / "examples" / "subjects"


def fake_items(n=50, seed=0):
    rng = np.random.default_rng(seed)
    items = np.zeros((n, 28, 28), np.uint8)
    items[:, 6:22, 8:20] = rng.integers(80, 255, (n, 16, 12))
    return items, np.arange(n) % 10


def test_render_is_deterministic_and_shaped():
    items, labels = fake_items()
    s1 = [sample_scene(np.random.default_rng(3), labels) for _ in range(4)]
    s2 = [sample_scene(np.random.default_rng(3), labels) for _ in range(4)]
    a, m = render_batch(s1, items, return_mask=True)
    assert a.shape == (4, RES, RES, 3) and a.dtype == np.uint8 and m.shape == (4, RES, RES)
    assert np.array_equal(a, render_batch(s2, items))


def test_position_moves_the_object():
    items, _ = fake_items()
    def centroid(pos):
        sc = Scene(objects=[Obj(cls=0, item=0, colour=0)], size=0, position=POSITIONS.index(pos),
                   bg_pattern=0, bg_colour=4)
        _, m = render(sc, items, return_mask=True)
        yy, xx = np.nonzero(m > 0.5)
        return xx.mean(), yy.mean()
    (lx, ly), (rx, ry), (cx, cy) = centroid("top left"), centroid("bottom right"), centroid("center")
    assert lx < cx < rx and ly < cy < ry


def test_caption_names_exactly_what_it_says():
    items, labels = fake_items()
    rng = np.random.default_rng(0)
    for _ in range(200):
        sc = sample_scene(rng, labels)
        text, named = caption(sc, rng)
        attrs = sc.attributes()
        for k, v in named.items():
            assert attrs[k] == v
            assert v in text
        assert named["class"] == CLASSES[sc.objects[0].cls]
    full, named = caption(Scene(objects=[Obj(cls=8, item=0, colour=0)], size=1, position=5, bg_pattern=1,
                                bg_colour=4))
    assert full == "a large red bag on a striped blue background at the top left"
    assert set(named) == {"class", "colour", "size", "position", "bg_pattern", "bg_colour"}


def test_tokenizer_covers_the_grammar_with_single_token_class_words():
    from transformers import CLIPTokenizer
    from quantdream.models.embedded import TOKENIZER_DIR
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    for w in CLASSES + COLOUR_NAMES:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    for w in vocabulary_words():
        assert tok.unk_token_id not in tok(w, add_special_tokens=False).input_ids, w
    # a placeholder is added exactly as in SD
    n = len(tok)
    assert tok.add_tokens("<my-bag>") == 1 and len(tok) == n + 1
    assert tok("a <my-bag>", add_special_tokens=False).input_ids[-1] == n


def test_committed_subjects_are_complete():
    dirs = sorted(d for d in SUBJECTS.iterdir() if d.is_dir())
    assert len(dirs) >= 10
    for d in dirs:
        meta = json.loads((d / "subject.json").read_text())
        pngs = sorted(d.glob("*.png"))
        assert 4 <= len(pngs) <= 6
        assert all(Image.open(p).size == (64, 64) for p in pngs)
        assert meta["class_word"] in CLASSES and meta["fmnist_split"] == "test"
        kinds = {p["kind"] for p in meta["prompts"]}
        assert kinds == {"context", "property", "composition"}
        caps = json.loads((d / "captions.json").read_text())
        assert set(caps) == {p.name for p in pngs} and all("{}" in c for c in caps.values())


@needs_fmnist
def test_subject_photos_rerender_from_their_records():
    from quantdream.world.fmnist import load_fmnist
    items, _ = load_fmnist("test")
    for d in sorted(SUBJECTS.iterdir())[:3]:
        meta = json.loads((d / "subject.json").read_text())
        for ph in meta["photos"]:
            img = render(Scene.from_dict(ph["scene"]), items)
            assert np.array_equal(img, np.asarray(Image.open(d / ph["file"]).convert("RGB")))


def test_missing_fmnist_gives_clear_error(tmp_path):
    from quantdream.world.fmnist import load_fmnist
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fmnist("train", tmp_path)
