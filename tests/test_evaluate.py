"""`quantdream evaluate`: the DreamBooth protocol end to end on a random tiny model and a random world
evaluator (numbers are meaningless, the plumbing is not), and a clear error for every bad input."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from quantdream.cli.main import main
from quantdream.eval.protocol import (ADAPTERS, Adapter, RunInfo, adapter_for, parse_kinds, read_run,
                                      register_adapter, select_prompts)

SUBJECT = Path(__file__).resolve().parent.parent / "examples" / "subjects" / "teal_bag"


@pytest.fixture(scope="module")
def zoodip_run(tiny_model, tmp_path_factory):
    from quantdream.train import build_config, personalize
    out = tmp_path_factory.mktemp("runs") / "zoodip-teal-bag"
    personalize(build_config(overrides=dict(
        images=str(SUBJECT), token="<teal-bag>", init_word="bag", model=str(tiny_model), weights="int8",
        method="zoodip", out=str(out), threads=1, steps=2, sample_every=0, sample_steps=2, sample_images=1)))
    return out


def fake_run(root: Path, method="zoodip", images=None, embeds=True, **extra) -> Path:
    d = root / f"run-{method}"
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"method": method, "model": "tiny", "weights": "int8", "token": "<x>",
                                            "init_word": "bag", **extra}))
    if images is not None:
        (d / "config.toml").write_text(f'images = "{images}"\n')
    if embeds:
        (d / "learned_embeds.safetensors").write_bytes(b"")
    return d


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_evaluate_zoodip_run_and_baseline(zoodip_run, random_evaluator, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["evaluate", str(zoodip_run), "--out", str(out), "--baseline", "--images-per-prompt", "2",
               "--prompts", "property,composition", "--steps", "2", "--threads", "1",
               "--evaluator", str(random_evaluator)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "real CLIP-I / CLIP-T skipped" in err and "real DINO skipped" in err
    m = json.loads((out / "metrics.json").read_text())
    assert [r["method"] for r in m["rows"]] == ["baseline", "zoodip"]
    base, run = m["rows"]
    # TI-style prompts: the token alone; baseline: the init word; CLIP-T: the class word
    assert run["prompts"][0] == "a red <teal-bag>" and base["prompts"][0] == "a red bag"
    assert run["clip_t_texts"][0] == "a red bag"
    assert set(run["kinds"]) == {"property", "composition"} and len(run["prompts"]) == 6
    for key in ("world_clip_i", "world_clip_t", "effnet", "prompt_accuracy", "prompt_accuracy_property",
                "prompt_accuracy_composition"):
        assert isinstance(run["metrics"][key], float), key
    assert "prompt_accuracy_context" not in run["metrics"]
    # subject attribute accuracy: the 4 non-colour prompts x 2 images ("a red {}", "a purple {}" ask for a change)
    assert 0 <= run["metrics"]["subject_attr_acc"] <= 1 and run["metrics"]["subject_attr_parts"]["n"] == 8
    assert m["subject_ceiling"]["teal_bag"]["subject_attr_acc"] > 0.8
    assert [g["group"] for g in m["means"]][1].startswith("zoodip (int8")
    md = (out / "metrics.md").read_text()
    assert "Mean over subjects" in md and "zoodip" in md and "class word" in md
    assert "| world CLIP-I | subject attr. acc. |" in md
    grid = Image.open(out / run["grid"])
    assert grid.size == (2 * 66 + 2, 6 * 66 + 2)              # rows = prompts, columns = images per prompt
    # an --out that already holds metrics is refused (no silent overwrite)
    assert main(["evaluate", str(zoodip_run), "--out", str(out), "--evaluator", str(random_evaluator)]) == 2
    assert "already holds metrics.json" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_qlora_run_with_baseline(tiny_model, random_evaluator, tmp_path):
    """A QLoRA run (weights nf4) renders on the float UNet, as stock load_lora_weights does; so does its floor."""
    run = tmp_path / "qlora"
    assert main(["personalize", "--images", str(SUBJECT), "--init-word", "bag", "--model", str(tiny_model),
                 "--method", "qlora", "--steps", "1", "--threads", "1", "--set", "sample_images=0",
                 "--out", str(run)]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--out", str(out), "--baseline", "--images-per-prompt", "1",
                 "--prompts", "property", "--steps", "2", "--threads", "1", "--evaluator", str(random_evaluator)]) == 0
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert [(r["method"], r["weights"]) for r in rows] == [("baseline", "none"), ("qlora", "nf4")]
    assert rows[0]["prompts"][0] == "a red bag" and rows[1]["prompts"][0] == "a red sks bag"


@pytest.mark.slow
def test_scale_method_floor_is_the_model_its_scales_apply_to(tiny_model, tmp_path):
    """PEQA / TuneQDM files apply to a float pipeline whose UNet alone is quantized; the --baseline floor is
    that model with nothing learned: with lr 0 the run's pipeline and the floor's give the same UNet output."""
    import torch
    from quantdream.eval.protocol import adapter_for, read_run
    from quantdream.quant import quantized_layers
    run = tmp_path / "peqa"
    assert main(["personalize", "--images", str(SUBJECT), "--init-word", "bag", "--model", str(tiny_model),
                 "--method", "peqa", "--steps", "1", "--threads", "1", "--set", "sample_images=0",
                 "--set", "peqa.lr=0", "--out", str(run)]) == 0
    info = read_run(run)
    adapter = adapter_for(info)
    assert adapter.base_weights(info) == "int8-unet"
    floor, tuned = adapter.load_floor(info), adapter.load(info, "cpu", torch.float32)
    assert list(quantized_layers(floor.unet)) and not list(quantized_layers(floor.text_encoder))
    assert not list(quantized_layers(floor.vae))
    torch.manual_seed(0)
    c = floor.unet.config
    x, t = torch.randn(1, c.in_channels, c.sample_size, c.sample_size), torch.tensor([700])
    h = torch.randn(1, 8, c.cross_attention_dim)
    with torch.no_grad():
        assert torch.equal(floor.unet(x, t, h).sample, tuned.unet(x, t, h).sample)


# ----------------------------------------------------------------------------- bad inputs
def test_run_dir_without_run_json(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"")
    assert main(["evaluate", str(tmp_path / "r"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not a finished personalization run: no run.json" in err and "--resume" in err
    assert not (tmp_path / "o").exists()


def test_missing_run_dir(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_subject(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    run = fake_run(tmp_path, images=photos)
    assert main(["evaluate", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no subject.json" in err and "--subject" in err
    assert main(["evaluate", str(run), "--subject", str(photos), "--out", str(tmp_path / "o")]) == 2
    assert "is not a subject folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_method(tmp_path, capsys):
    run = fake_run(tmp_path, method="magic", images=SUBJECT)
    assert main(["evaluate", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "method 'magic'" in err and "zoodip" in err


def test_missing_learned_output(tmp_path, capsys):
    run = fake_run(tmp_path, images=SUBJECT, embeds=False)
    assert main(["evaluate", str(run), "--out", str(tmp_path / "o")]) == 2
    assert "no learned_embeds.safetensors" in capsys.readouterr().err


def test_clip_path_that_is_not_clip(tmp_path, capsys):
    run = fake_run(tmp_path, images=SUBJECT)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["evaluate", str(run), "--out", str(tmp_path / "o"), "--clip", str(bert)]) == 2
    assert "holds a 'bert' model, not a CLIP" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--out", str(tmp_path / "o"), "--clip", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--out", str(tmp_path / "o"), "--clip", str(run)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--out", str(tmp_path / "o"), "--dino", str(bert)]) == 2
    assert "not a DINO" in capsys.readouterr().err


def test_bad_prompt_kind():
    with pytest.raises(ValueError, match="unknown kind"):
        parse_kinds("context,colour")
    assert parse_kinds("context, property") == ("context", "property")


def test_prompt_selection_and_styles(tmp_path):
    from quantdream.world.subjects import load_subject
    subj = load_subject(SUBJECT)
    assert {p["kind"] for p in select_prompts(subj, ("composition",))} == {"composition"}
    run = read_run(fake_run(tmp_path, images=SUBJECT))
    assert isinstance(run, RunInfo) and run.images == str(SUBJECT)
    assert adapter_for(run).subject_text(run, "bag") == "<x>"
    # extension point: a DreamBooth-style method renders "<token> <class word>"
    db = Adapter("class", lambda r: None, lambda r, device, dtype: None)
    register_adapter("dreambooth-test", db)
    try:
        assert db.subject_text(run, "bag") == "<x> bag"
    finally:
        ADAPTERS.pop("dreambooth-test")


# ----------------------------------------------------------------------------- real encoders (tiny, random)
def test_real_clip_and_dino_from_local_folders(tmp_path):
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, Dinov2Config,
                              Dinov2Model, BitImageProcessor)
    from quantdream.eval.real_encoders import RealClip, RealDino
    from quantdream.models.embedded import TOKENIZER_DIR
    clip_dir, dino_dir = tmp_path / "clip", tmp_path / "dino"
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=32),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=4, image_size=32, patch_size=8),
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(str(clip_dir))
    tok.save_pretrained(str(clip_dir))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(clip_dir))
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
                             image_size=32, patch_size=8)).save_pretrained(str(dino_dir))
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(dino_dir))
    imgs = [Image.open(SUBJECT / f"0{i}.png") for i in range(3)]
    clip = RealClip(clip_dir)
    f, t = clip.image(imgs), clip.text(["a bag", "a red bag", "a bag on a green background"])
    assert f.shape == (3, 16) and t.shape == (3, 16)
    assert torch.allclose(f.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert "CLIP ViT-" in clip.name
    dino = RealDino(dino_dir)
    assert dino.image(imgs).shape == (3, 32) and dino.name.startswith("DINOv2")
