"""Subject attribute accuracy: colour science against published values, and hand-made renders that must
rank from the subject's photos down to its class word alone."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import needs_fmnist
from quantdream.eval.subject_attr import (contrast_cases, delta_e00, read_object, rgb_to_lab,
                                          subject_attribute_accuracy)

SUBJECTS = Path(__file__).resolve().parent.parent / "examples" / "subjects"

# Sharma, Wu & Dalal (2005), Table 1: (Lab 1, Lab 2, dE00) with k_L = k_C = k_H = 1
SHARMA = [((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
          ((50.0, -1.3802, -84.2814), (50.0, 0.0, -82.7485), 1.0000),
          ((50.0, 2.5, 0.0), (50.0, 0.0, -2.5), 4.3065),
          ((50.0, 2.5, 0.0), (73.0, 25.0, -18.0), 27.1492),
          ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
          ((22.7233, 20.0904, -46.6940), (23.0331, 14.9730, -42.5619), 2.0373),
          ((2.0776, 0.0795, -1.1350), (0.9033, -0.0636, -0.5514), 0.9082)]


def test_ciede2000_matches_sharma_table():
    a, b, want = (np.array(x) for x in zip(*SHARMA))
    np.testing.assert_allclose(delta_e00(a, b, k_l=1.0), want, atol=1e-4)
    np.testing.assert_allclose(delta_e00(b, a, k_l=1.0), want, atol=1e-4)  # symmetric


def test_rgb_to_lab_white_black_and_red():
    lab = rgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0]], dtype=np.uint8))
    np.testing.assert_allclose(lab[0], [100, 0, 0], atol=0.01)
    np.testing.assert_allclose(lab[1], [0, 0, 0], atol=0.01)
    np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.05)  # the standard sRGB red


def test_rejects_bad_images():
    with pytest.raises(ValueError, match="uint8"):
        subject_attribute_accuracy(np.zeros((2, 64, 64, 3), np.float32), {}, np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="at least one"):
        subject_attribute_accuracy(np.zeros((0, 64, 64, 3), np.uint8), {}, np.zeros((1, 28, 28), np.uint8))


def test_plain_background_reads_nothing():
    r = read_object(np.full((64, 64, 3), 120, np.uint8))
    assert r.body_lab is None and not r.mask.any()


@needs_fmnist
def test_hand_made_cases_rank_photos_above_class_word():
    """In the scenes of each subject's photos: the photos score high, the class word's renders (another
    item, a palette colour, a random print) low, the right colour with the wrong print in between."""
    from quantdream.world.fmnist import load_fmnist
    from quantdream.world.subjects import load_subject
    items, labels = load_fmnist("test")
    scores: dict[str, list[float]] = {}
    for name in ("coral_top", "mustard_boot", "teal_bag", "mint_trousers"):  # stripes, twotone, dots, solid
        s = load_subject(SUBJECTS / name)
        cases = contrast_cases(s, items, labels, seed=0)
        r = {k: subject_attribute_accuracy(v, s["object"], items)["subject_attr_acc"] for k, v in cases.items()}
        assert r["photos"] > r["wrong_print"] > r["class_word"], (name, r)
        assert r["photos"] > r["wrong_colour"] > r["class_word"] - 0.1, (name, r)
        for k, v in r.items():
            scores.setdefault(k, []).append(v)
    m = {k: float(np.mean(v)) for k, v in scores.items()}
    assert m["photos"] >= 0.85 and m["class_word"] <= 0.3, m
    assert m["photos"] > m["other_item"] > m["wrong_print"] > m["wrong_colour"] > m["class_word"], m


@needs_fmnist
def test_photos_read_the_subjects_colour_and_print():
    from quantdream.world.fmnist import load_fmnist
    from quantdream.world.subjects import load_subject
    items, labels = load_fmnist("test")
    s = load_subject(SUBJECTS / "navy_pullover")
    r = subject_attribute_accuracy(contrast_cases(s, items, labels)["photos"], s["object"], items)
    assert r["delta_e_body"] < 2.0 and r["print_read"] == {"dots": 5}, r
    assert r["attr_colour"] == 1.0 and r["attr_print"] == 1.0 and r["iou"] > 0.85, r


@needs_fmnist
def test_protocol_scores_skip_colour_prompts_and_non_world_subjects():
    """evaluate's scoring: images whose prompt names a colour are not scored (the subject is asked to
    change), a subject without an ``object`` record gets no column, the ceiling has the photos' score."""
    from quantdream.eval.protocol import Encoders, attribute_scores, subject_ceiling
    from quantdream.world.fmnist import load_fmnist
    from quantdream.world.subjects import load_subject
    items, labels = load_fmnist("test")
    s = load_subject(SUBJECTS / "teal_bag")
    photos = contrast_cases(s, items, labels)["photos"]
    wrong = contrast_cases(s, items, labels)["wrong_colour"]
    flat = np.concatenate([photos, wrong])
    # the wrong-colour images come from "a red {}"-style prompts: left out, so the score is the photos'
    a = attribute_scores(flat, [{}] * 5 + [{"colour": "red"}] * 5, s)
    b = attribute_scores(photos, [{}] * 5, s)
    assert a["subject_attr_acc"] == pytest.approx(b["subject_attr_acc"]) and a["subject_attr_parts"]["n"] == 5
    assert attribute_scores(flat, [{}] * 10, s)["subject_attr_acc"] < b["subject_attr_acc"] - 0.1
    assert attribute_scores(photos, [{}] * 5, {k: v for k, v in s.items() if k != "object"}) == {}
    from PIL import Image
    ceil = subject_ceiling([Image.fromarray(p) for p in photos], Encoders(), s)
    assert ceil["subject_attr_acc"] == pytest.approx(b["subject_attr_acc"])


def test_report_shows_dash_for_runs_evaluated_before_the_column():
    from quantdream.eval.report import cell, table_markdown
    assert cell("subject_attr_acc", None) == "-" and cell("world_clip_i", None) == ""
    rows = [{"method": "ti", "status": "ok", "world_clip_i": 0.5},
            {"method": "zoodip", "status": "ok", "world_clip_i": 0.5, "subject_attr_acc": 0.61}]
    head, _, ti, zd = table_markdown(rows)
    assert "subject attr. acc." in head and "| - |" in ti and "0.610" in zd
    assert "subject attr. acc." not in table_markdown(rows[:1])[0]  # old JSONs: no empty column
