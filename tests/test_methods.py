"""Contract tests over every personalization method on a tiny random model (peft's test matrix idea):
only the declared tensors change after 3 steps; export -> load round-trips through the stock loader
where one exists (load_textual_inversion, load_lora_weights, UNet2DConditionModel.from_pretrained) and
through ``quantdream generate --adapter``'s apply_adapter; a 2-step CLI run writes its outputs and
run.json. Method math: TuneQDM at init is the frozen layer, experts follow the timestep, S1 uses
frozen scales outside its interval."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from quantdream.data.dataset import Batch
from quantdream.methods import METHODS, method_class, section_name
from quantdream.methods.base import DenoisingObjective, Streams, add_placeholder, identifier_placeholder
from quantdream.models.embedded import LATENT_CHANNELS

# settings that make 3 steps visible (the papers' learning rates move scales by ~1e-6 per step)
TEST_SETTINGS = {
    "zoodip": {"lr": 1e-2, "tau": 2}, "zoodip-fast": {"lr": 1e-2, "tau": 2, "vocab_directions": 4}, "ti": {"lr": 1e-2}, "gf-ti": {"dim": 16, "popsize": 4, "init": "word"},
    "dreambooth": {"lr": 1e-3}, "lora": {"lr": 1e-2}, "qlora": {"lr": 1e-2}, "peqa": {"lr": 1e-4},
    "tuneqdm": {"lr": 1e-4}, "tuneqdm-s1": {"lr": 1e-4}, "tuneqdm-s2": {"lr": 1e-4},
}


def load_pipe(tiny_model):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build(tiny_model, name, **settings):
    """The scaffold's build order (train.personalize) in memory: prepare -> objective -> method -> setup."""
    from quantdream.train import resolve_weights
    pipe = load_pipe(tiny_model)
    mcls = method_class(name)
    from quantdream.methods.base import config_from_dict
    config = config_from_dict(mcls.config_class, {**TEST_SETTINGS[name], **settings}, section_name(name))
    te, vae, unet, tok = pipe.text_encoder, pipe.vae, pipe.unet, pipe.tokenizer
    for m in (te, vae, unet):
        m.requires_grad_(False).eval()
    if mcls.kind == "token":
        ph = add_placeholder(tok, te, "<my-bag>", "bag")
    else:
        ph = identifier_placeholder("sks", "bag", 768)
    weights = resolve_weights(SimpleNamespace(weights="auto", method=name), mcls)
    mcls.prepare_model(te, vae, unet, weights, config)
    from diffusers import DDPMScheduler
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    obj = DenoisingObjective(tok, te, unet, sched, ph)
    method = mcls(obj, ph.init_vectors, config)
    data = SimpleNamespace(pixels=torch.rand(3, 3, 64, 64) * 2 - 1)
    method.setup(SimpleNamespace(placeholder=ph, class_word="bag", data=data, tokenizer=tok, embedded=True,
                                 init_vectors_given=False, batch_size=1, steps=3))
    return SimpleNamespace(pipe=pipe, method=method, objective=obj, placeholder=ph, unet=unet, te=te, vae=vae)


def batch(text, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(latents=torch.randn(1, LATENT_CHANNELS, 16, 16, generator=g), captions=[f"a photo of {text}"], index=[0],
                 flipped=[False])


def tensors(*modules):
    out = {}
    for i, m in enumerate(modules):
        for n, t in list(m.named_parameters()) + list(m.named_buffers()):
            out[f"{i}.{n}"] = t
    return out


def unet_out(unet, t, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, LATENT_CHANNELS, 16, 16, generator=g)
    c = torch.randn(1, 32, 768, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([t]), c).sample


# ----------------------------------------------------------------------------- contract: what trains
@pytest.mark.parametrize("name", METHODS)
def test_only_declared_tensors_change(tiny_model, name):
    r = build(tiny_model, name)
    before = {k: v.detach().clone() for k, v in tensors(r.te, r.vae, r.unet).items()}
    declared = {id(p) for p in r.method.trainable_parameters()}
    names = {k for k, v in tensors(r.te, r.vae, r.unet).items() if id(v) in declared}
    theta0 = r.method.theta.clone()
    streams = Streams.from_seed(0)
    visited = set()
    for s in range(3):
        loss = r.method.step(batch(r.placeholder.text, s), streams)
        assert torch.isfinite(loss)
        sel = getattr(r.method, "selector", None)
        if sel is not None:
            visited.add(sel.current)
    after = tensors(r.te, r.vae, r.unet)
    changed = {k for k, v in before.items() if not torch.equal(v, after[k].detach())}
    assert changed <= names, f"frozen tensors moved: {sorted(changed - names)[:5]}"
    if r.method.kind == "token":
        assert not names and not torch.equal(r.method.theta, theta0)
    elif getattr(r.method, "selector", None) is not None and r.method.selector.num_experts > 1:
        moved = {int(k.rsplit(".", 1)[1]) for k in changed}
        assert moved == visited                            # TAS: exactly the experts whose t was drawn
    else:
        assert changed == names, f"declared tensors that did not train: {sorted(names - changed)[:5]}"
    assert r.method.theta.shape[0] == (0 if r.method.kind == "weights" else 1)


# ----------------------------------------------------------------------------- contract: export -> load
@pytest.mark.parametrize("name", ["gf-ti", "dreambooth", "lora", "qlora", "peqa", "tuneqdm", "tuneqdm-s1",
                                  "tuneqdm-s2"])
def test_export_load_round_trip(tiny_model, name, tmp_path):
    from quantdream.methods.adapters import apply_adapter
    r = build(tiny_model, name)
    streams = Streams.from_seed(0)
    for s in range(3):
        r.method.step(batch(r.placeholder.text, s), streams)
    files = r.method.export(tmp_path, "<my-bag>", 3)
    assert all(f.exists() for f in files)
    pipe = load_pipe(tiny_model)
    if name == "gf-ti":                                       # stock: load_textual_inversion
        pipe.load_textual_inversion(str(tmp_path))
        tid = pipe.tokenizer.convert_tokens_to_ids("<my-bag>")
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[tid], r.method.theta[0])
        return
    info = json.loads((tmp_path / "adapter.json").read_text())
    assert info["method"] == name and info["prompt_text"] == "sks bag"
    if name == "dreambooth":                                  # stock: UNet2DConditionModel.from_pretrained
        from diffusers import UNet2DConditionModel
        unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet"))
        torch.testing.assert_close(unet_out(unet, 500), unet_out(r.unet, 500))
    elif name == "lora":                                      # stock: load_lora_weights on the float base
        pipe.load_lora_weights(str(tmp_path))
        torch.testing.assert_close(unet_out(pipe.unet, 500), unet_out(r.unet, 500), atol=1e-5, rtol=1e-4)
    elif name == "qlora":                                     # same adapter tensors; the base is NF4 vs float
        from peft.utils import get_peft_model_state_dict
        pipe.load_lora_weights(str(tmp_path))
        a = get_peft_model_state_dict(pipe.unet, adapter_name=pipe.unet.active_adapters()[0])
        b = get_peft_model_state_dict(r.unet)
        assert len(a) == len(b) > 0
        for x, y in zip(sorted(a.items()), sorted(b.items())):
            torch.testing.assert_close(x[1], y[1])
    else:                                                     # scales: quantize like the run, load, hook
        out = apply_adapter(pipe, tmp_path)
        assert out["kind"] == "scales" and out["prompt_text"] == "sks bag"
        frozen = load_pipe(tiny_model).unet
        method_class(name).prepare_model(None, None, frozen, "int8", r.method.config)
        for t in (100, 300, 600, 900):             # int8 changes: a hundredth of what training changed
            got, want = unet_out(pipe.unet, t), unet_out(r.unet, t)
            assert (got - want).norm() <= 1e-2 * (want - unet_out(frozen, t)).norm(), t


# ----------------------------------------------------------------------------- TuneQDM math
def test_tuneqdm_at_init_equals_the_frozen_quantized_layer(tiny_model):
    """s_in = 1 and s_out = the quantizer scale: every expert reproduces the frozen int8 model exactly."""
    r = build(tiny_model, "tuneqdm")
    frozen = load_pipe(tiny_model).unet
    method_class("tuneqdm").prepare_model(None, None, frozen, "int8", r.method.config)
    for t in (0, 249, 250, 600, 999):
        torch.testing.assert_close(unet_out(r.unet, t), unet_out(frozen, t), atol=0, rtol=0)


def test_tuneqdm_expert_follows_the_timestep(tiny_model):
    r = build(tiny_model, "tuneqdm", num_experts=4)
    for t, j in ((0, 0), (249, 0), (250, 1), (500, 2), (749, 2), (750, 3), (999, 3)):
        unet_out(r.unet, t)
        assert r.method.selector.current == j


def test_tuneqdm_lr_in_gives_input_scales_their_own_rate(tiny_model):
    """lr = 0 for s_out, lr_in > 0 for s_in: one step moves every trained s_in and no s_out."""
    from quantdream.quant import quantized_layers
    r = build(tiny_model, "tuneqdm", num_experts=1, lr=0.0, lr_in=1e-2, weight_decay=0.0)
    layers = [m for _, m in quantized_layers(r.unet)]
    s_out0 = [m.s_out[0].detach().clone() for m in layers]
    r.method.step(batch(r.placeholder.text), Streams.from_seed(0))
    assert all(torch.equal(m.s_out[0], s) for m, s in zip(layers, s_out0))
    moved = [bool((m.s_in[0] - 1).abs().max() > 1e-3) for m in layers]
    assert sum(moved) > len(layers) // 2
    with pytest.raises(ValueError, match="mcsu"):
        build(tiny_model, "tuneqdm", mcsu=False, lr_in=1e-3)
    with pytest.raises(ValueError, match=r"tuneqdm_s2.file_dtype = 'fp8'; choose one of int8, float16, float32"):
        build(tiny_model, "tuneqdm-s2", file_dtype="fp8")


def test_s1_uses_frozen_scales_outside_its_interval(tiny_model):
    r = build(tiny_model, "tuneqdm-s1")                       # interval [500, 1000)
    assert r.method.selector.interval == (500.0, 1000.0)
    assert (r.objective.timesteps.t_low, r.objective.timesteps.t_high) == (500, 1000)   # trains inside only
    with torch.no_grad():
        for p in r.method.params:
            p.mul_(1.5)
    frozen = load_pipe(tiny_model).unet
    method_class("peqa").prepare_model(None, None, frozen, "int8", r.method.config)
    torch.testing.assert_close(unet_out(r.unet, 499), unet_out(frozen, 499), atol=0, rtol=0)
    assert r.method.selector.current is None
    assert not torch.allclose(unet_out(r.unet, 500), unet_out(frozen, 500))


def test_peqa_int4_is_per_output_channel(tiny_model):
    r = build(tiny_model, "peqa")
    from quantdream.quant import quantized_layers
    layers = [m for _, m in quantized_layers(r.unet)]
    assert layers and all(m.scale.shape[1] == 1 for m in layers)
    n = sum(p.numel() for p in r.method.params)
    assert n == sum(m.weight_shape[0] for m in layers)        # one scale per output channel


def test_weight_methods_refuse_the_wrong_bit_width():
    from quantdream.train import resolve_weights
    with pytest.raises(ValueError, match="--weights int8 does not apply to --method dreambooth; choose none"):
        resolve_weights(SimpleNamespace(weights="int8", method="dreambooth"), method_class("dreambooth"))
    with pytest.raises(ValueError, match="--weights none does not apply to --method peqa; choose int8 or int4"):
        resolve_weights(SimpleNamespace(weights="none", method="peqa"), method_class("peqa"))


# ----------------------------------------------------------------------------- CLI, every method
def cli_args(tiny_model, photos, out, name, *extra):
    a = ["personalize", "--images", str(photos), "--init-word", "bag", "--model", str(tiny_model), "--out", str(out),
         "--method", name, "--steps", "2", "--threads", "1", "--set", "sample_steps=2", "--set", "sample_images=1"]
    if method_class(name).kind == "token":
        a += ["--token", "<my-bag>"]
    if name == "gf-ti":
        a += ["--set", "gf_ti.popsize=4", "--set", "gf_ti.dim=16"]
    return a + list(extra)


EXPECTED_OUTPUT = {"zoodip": "learned_embeds.safetensors", "zoodip-fast": "learned_embeds.safetensors", "ti": "learned_embeds.safetensors",
                   "gf-ti": "learned_embeds.safetensors", "dreambooth": "unet",
                   "lora": "pytorch_lora_weights.safetensors", "qlora": "pytorch_lora_weights.safetensors",
                   "peqa": "scales.safetensors", "tuneqdm": "scales.safetensors",
                   "tuneqdm-s1": "scales.safetensors", "tuneqdm-s2": "scales.safetensors"}


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_two_step_cli_run_and_generate_with_the_adapter(tiny_model, photos, tmp_path, name):
    from quantdream.cli.main import main
    out = tmp_path / "run"
    assert main(cli_args(tiny_model, photos, out, name)) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == name and run["steps"] == 2 and np.isfinite(run["final_loss"])
    assert EXPECTED_OUTPUT[name] in run["outputs"] and (out / EXPECTED_OUTPUT[name]).exists()
    assert run["trainable_parameters"] > 0 and run["output_bytes"] > 0
    per_step = {"zoodip": 3, "zoodip-fast": 3, "gf-ti": 4}.get(name, 1)
    assert run["unet_forward_passes"] == 2 * per_step
    if name == "gf-ti":
        assert run["method_info"]["forward_pass_budget"] == 8 and run["method_info"]["generations"] == 2
    assert (out / "samples" / "step_000002.png").is_file()
    gen = tmp_path / "gen"
    assert main(["generate", "a photo of {}", "--model", str(tiny_model), "--adapter", str(out), "-n", "1",
                 "--steps", "2", "--out", str(gen)]) == 0
    assert (gen / "grid.png").is_file()


@pytest.mark.slow
def test_dreambooth_prior_preservation_caches_class_images(tiny_model, photos, tmp_path):
    from quantdream.cli.main import main
    out = tmp_path / "db"
    assert main(cli_args(tiny_model, photos, out, "dreambooth", "--set", "dreambooth.prior_preservation=true",
                         "--set", "dreambooth.num_class_images=2", "--set", "dreambooth.class_sample_steps=2")) == 0
    assert sorted(p.name for p in (out / "class_images").iterdir()) == ["class_0000.png", "class_0001.png"]
    run = json.loads((out / "run.json").read_text())
    assert run["unet_forward_passes"] == 4                     # instance + class batch per step


@pytest.mark.slow
def test_activation_calibrated_base(tiny_model, photos, tmp_path):
    """--acts 8: the PEQA run trains on a Q-Diffusion-style W8A8 UNet."""
    from quantdream.cli.main import main
    out = tmp_path / "w8a8"
    assert main(cli_args(tiny_model, photos, out, "peqa", "--acts", "8",
                         "--set", "sample_prompts=['a photo of a {}']")) == 0
    assert json.loads((out / "run.json").read_text())["acts"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("name", ["peqa", "tuneqdm", "lora", "gf-ti"])
def test_resume_after_ctrl_c_matches_an_uninterrupted_run(tiny_model, photos, tmp_path, name):
    import os
    import signal
    from quantdream.train import build_config, personalize
    kw = dict(images=str(photos), token="<my-bag>" if name == "gf-ti" else "", init_word="bag", model=str(tiny_model),
              method=name, steps=3, threads=1, sample_every=0, sample_steps=2, sample_images=1, checkpoint_every=2)
    kw.update({section_name(name): TEST_SETTINGS[name]})
    full = personalize(build_config(overrides={**kw, "out": str(tmp_path / "full")}))

    def interrupt(info):
        if info["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
    cut = personalize(build_config(overrides={**kw, "out": str(tmp_path / "cut")}), callback=interrupt)
    assert not cut.completed and cut.step == 2
    done = personalize(build_config(overrides={**kw, "out": str(tmp_path / "cut"), "resume": True}))
    assert done.completed and done.losses == pytest.approx(full.losses, abs=0)
    a, b = json.loads((tmp_path / "full" / "run.json").read_text()), json.loads((tmp_path / "cut" / "run.json").read_text())
    assert a["outputs"] == b["outputs"]
    for f in a["outputs"]:
        if f.endswith(".safetensors"):
            from safetensors.torch import load_file
            x, y = load_file(str(tmp_path / "full" / f)), load_file(str(tmp_path / "cut" / f))
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dreambooth", "lora", "tuneqdm-s2"])
def test_evaluate_can_load_weight_method_runs(tiny_model, photos, tmp_path, name):
    from quantdream.cli.main import main
    from quantdream.eval import protocol
    out = tmp_path / "run"
    assert main(cli_args(tiny_model, photos, out, name)) == 0
    protocol.register_weight_methods()
    run = protocol.read_run(out)
    adapter = protocol.adapter_for(run)
    adapter.check(run)
    assert adapter.subject_text(run, "bag") == "sks bag"
    pipe = adapter.load(run, "cpu", torch.float32)
    assert pipe.unet is not None


def test_gfti_scores_its_population_a_few_rows_at_a_time_with_the_same_losses(tiny_model):
    """GF-TI's 20 candidates need not share one UNet call: gf_ti.unet_rows caps the rows (activation
    memory) per call, and the losses are those of the whole population at once."""
    r = build(tiny_model, "gf-ti", unet_rows=3)
    assert r.objective.unet_batch == 3
    theta = r.placeholder.init_vectors[None] + 0.1 * torch.randn(5, 1, 768, generator=torch.Generator().manual_seed(0))
    few = r.objective(theta, batch("<my-bag>"), torch.Generator().manual_seed(1))
    r.objective.unet_batch = 0
    whole = r.objective(theta, batch("<my-bag>"), torch.Generator().manual_seed(1))
    torch.testing.assert_close(few, whole, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="unet_rows must be >= 0"):
        build(tiny_model, "gf-ti", unet_rows=-1)
