"""Embedded model v2: identities in captions, the Fashion-MNIST subset tool, and the budgeted run end to end."""
import json
import time

import numpy as np
import pytest

from conftest import needs_fmnist


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    from quantdream.models.embedded import TOKENIZER_DIR
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def test_instance_words_are_free_single_tokens(tokenizer):
    from quantdream.models.vocab import corpus_words
    from quantdream.world.identities import instance_words
    corpus = set(corpus_words())
    words = instance_words(tokenizer, corpus, 176)
    assert len(set(words)) == 176
    assert all(len(tokenizer.tokenize(w)) == 1 and w not in corpus for w in words)
    with pytest.raises(ValueError, match="free single-token words"):
        instance_words(tokenizer, corpus, 10_000)


def test_named_instances_keep_their_identity_and_captions_name_them():
    from quantdream.world.identities import caption_v2, make_instances, sample_scene_v2, shade_rgb
    labels = np.arange(100) % 10
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    inst = make_instances(np.random.default_rng(0), labels, ["alpha", "beta", "gamma"])
    rng = np.random.default_rng(1)
    named, texts = 0, []
    for _ in range(300):
        scene, extra = sample_scene_v2(rng, by_class, inst, p_named=0.5)
        text = caption_v2(scene, extra, rng)
        texts.append(text)
        if extra["instance"]:
            named += 1
            i = next(i for i in inst if i.word == extra["instance"])
            o = scene.objects[0]
            assert (o.item, o.rgb, o.print, o.print_rgb, o.print_phase) == (i.obj.item, i.obj.rgb, i.obj.print,
                                                                           i.obj.print_rgb, i.obj.print_phase)
            assert f" {i.word}" in text and scene.bg_colour != o.colour
    assert 100 < named < 200
    assert any(" light " in t or " dark " in t for t in texts)  # shades are named compositionally
    assert any(" dots" in t or " stripes" in t or " bottom " in t for t in texts)  # and prints
    assert shade_rgb((200, 100, 0), "dark") < (200, 100, 0) and shade_rgb((200, 100, 0), "light")[2] > 0


@needs_fmnist
def test_fmnist_subset_round_trips(tmp_path):
    from quantdream.world.fmnist import load_fmnist, main
    main(["subset", "--per-class", "7", "--test-per-class", "3", "--out", str(tmp_path)])
    x, y = load_fmnist("train", tmp_path)
    assert x.shape == (70, 28, 28) and np.bincount(y).tolist() == [7] * 10
    full_x, full_y = load_fmnist("train")
    idx = json.loads((tmp_path / "subset.json").read_text())["train_indices"]
    assert np.array_equal(full_x[idx], x) and np.array_equal(full_y[idx], y)
    assert load_fmnist("test", tmp_path)[0].shape == (30, 28, 28)
    with pytest.raises(SystemExit):
        main(["subset", "--per-class", "0", "--out", str(tmp_path / "no")])
    assert not (tmp_path / "no").exists()


@needs_fmnist
@pytest.mark.slow
def test_gpu_v2_runs_tiny_on_cpu_and_exports_a_stock_pipeline(tmp_path, monkeypatch):
    import torch
    from diffusers import StableDiffusionPipeline

    from quantdream.models import train_v2
    from quantdream.world.fmnist import write_subset
    write_subset(tmp_path / "fm", per_class=20, test_per_class=2)
    monkeypatch.setattr(train_v2, "T_START", time.time())
    out = tmp_path / "run"
    train_v2.main(["--device", "cpu", "--tiny", "--minutes", "0.5", "--out", str(out),
                   "--fmnist", str(tmp_path / "fm")])
    log = json.loads((out / "log.json").read_text())
    assert {"vae_done", "latents", "unet_done", "exported", "grid"} <= set(log["phases"])
    assert log["phases"]["unet_done"]["steps"] >= 1 and (out / "grid.png").is_file()
    model = out / "model"
    size = sum(f.stat().st_size for f in model.rglob("*.safetensors"))
    assert size <= 40e6, size
    info = json.loads((model / "training.json").read_text())
    inst = json.loads((model / "instances.json").read_text())
    assert info["recipe"] == "v2" and len(inst["named"]) == 160 and len(inst["held_out"]) == 16
    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert len(pipe.unet.config.block_out_channels) == 4  # 16 -> 8 -> 4 -> 2
    pipe.set_progress_bar_config(disable=True)
    img = pipe(f"a {inst['named'][0]['word']} bag at the top left", height=64, width=64, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


@needs_fmnist
@pytest.mark.slow
def test_resumable_v2_run_continues_after_ctrl_c_in_each_stage(tmp_path, monkeypatch):
    import torch

    from quantdream.models import train_v2
    from quantdream.world.fmnist import write_subset
    write_subset(tmp_path / "fm", per_class=20, test_per_class=2)
    out = tmp_path / "run"
    argv = ["--device", "cpu", "--tiny", "--minutes", "3", "--out", str(out), "--fmnist", str(tmp_path / "fm"),
            "--vae-steps", "2", "--unet-steps", "3", "--threads", "1"]
    log_step = train_v2.Log.step

    def interrupt_at(stage):
        def step(self, **kw):
            log_step(self, **kw)
            if kw["stage"] == stage:
                raise KeyboardInterrupt
        return step

    for stage in ("vae", "unet"):  # Ctrl-C after the first step of each stage
        monkeypatch.setattr(train_v2, "T_START", time.time())
        monkeypatch.setattr(train_v2.Log, "step", interrupt_at(stage))
        with pytest.raises(SystemExit, match="the same command continues"):
            train_v2.main(argv)
        assert torch.load(out / f"{stage}-state.pt", weights_only=False)["step"] == 1
    monkeypatch.setattr(train_v2.Log, "step", log_step)
    monkeypatch.setattr(train_v2, "T_START", time.time())
    train_v2.main(argv)
    log = json.loads((out / "log.json").read_text())
    ph = log["phases"]
    assert ph["vae_resumed"]["step"] == 1 and ph["vae_done"]["steps"] == 2
    assert ph["unet_resumed"]["step"] == 1 and ph["unet_done"]["steps"] == 3
    assert log["status"] == "complete" and log["invocations"] == 3
    assert [s["step"] for s in log["steps"] if s["stage"] == "unet"] == [1]  # step 1 logged once, not redone
    assert json.loads((out / "model" / "training.json").read_text())["unet_steps"] == 3
    with pytest.raises(SystemExit):
        train_v2.main(argv[:-4] + ["--vae-steps", "2"])  # one step target without the other


def test_embedded_models_by_name(tmp_path, monkeypatch):
    from quantdream.models import embedded, load
    assert load.resolve_model("tiny") == load.resolve_model("tiny-v1") == embedded.PACKAGE_MODEL_DIR
    assert load.is_tiny(embedded.PACKAGE_MODEL_DIR) and not load.is_tiny(tmp_path)
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "tiny-v2", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="'tiny-v2' is not in this build"):
        load.resolve_model("tiny-v2")
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "model_index.json").write_text("{}")
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "tiny-v2", tmp_path / "v2")
    assert load.resolve_model("tiny-v2") == tmp_path / "v2" and load.is_tiny(tmp_path / "v2")
    monkeypatch.setattr(embedded, "TINY_DEFAULT", "tiny-v2")
    assert load.resolve_model("tiny") == tmp_path / "v2"


@needs_fmnist
def test_instance_subjects_render_the_same_item_from_the_subset_or_the_full_split(tmp_path):
    from PIL import Image

    from quantdream.models import train_v2
    from quantdream.world.fmnist import write_subset
    from quantdream.world.identities import main as identities_main
    from quantdream.world.subjects import load_subject
    write_subset(tmp_path / "fm", per_class=20, test_per_class=1)
    rec = train_v2.make_identities(train_v2.V2Config(fmnist=str(tmp_path / "fm")))
    (tmp_path / "instances.json").write_text(json.dumps(rec))
    identities_main([str(tmp_path / "instances.json"), "--out", str(tmp_path / "sub"), "--fmnist",
                     str(tmp_path / "fm"), "--photos", "2"])
    identities_main([str(tmp_path / "instances.json"), "--out", str(tmp_path / "full"), "--photos", "2"])
    names = sorted(p.name for p in (tmp_path / "sub").iterdir())
    assert len(names) == 16 and names == sorted(p.name for p in (tmp_path / "full").iterdir())
    for n in names[:4]:
        meta = load_subject(tmp_path / "sub" / n)
        assert meta["instance_word"] in n and meta["fmnist_split"] == "train"
        a = np.asarray(Image.open(tmp_path / "sub" / n / "00.png"))
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / "full" / n / "00.png")))
