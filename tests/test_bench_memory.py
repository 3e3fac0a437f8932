"""`quantdream bench memory`: every method in its own subprocess through its real training code, numbers
that are there and positive, storage that is the method's own export, 'not implemented' rows for
architectures the scaffold cannot train, clear errors for bad settings; the layer-by-layer build gives
the model the method's prepare_model gives."""
import json

import pytest

from quantdream.bench.memory import (BenchMethod, BenchSpec, _implemented, check_spec, measure_in_process,
                                     memory_markdown, summarize)
from quantdream.cli.main import main
from quantdream.methods import METHODS, method_class

# method -> (default weights, UNet passes per step, files its export writes)
EXPECTED = {
    "zoodip": ("int8", 3, ["learned_embeds.safetensors"]),
    "ti": ("none", 1, ["learned_embeds.safetensors"]),
    "peqa": ("int8", 1, ["scales.safetensors", "adapter.json"]),
    "lora": ("none", 1, ["pytorch_lora_weights.safetensors", "adapter.json"]),
    "dreambooth": ("none", 1, ["unet", "adapter.json"]),
}


@pytest.mark.slow
def test_tiny_token_and_weight_methods_in_subprocesses(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "memory", "--arch", "tiny", "--methods", ",".join(EXPECTED), "--steps", "1",
               "--threads", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((out / "memory.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == list(EXPECTED)
    for name, (weights, passes, files) in EXPECTED.items():
        r = rows[name]
        assert r["status"] == "ok", r.get("note")
        assert r["weights"] == weights and r["resolution"] == 64 and r["steps"] == 1
        assert r["training_peak"]["vmhwm_mib"] > 0 and r["training_peak"]["rss_anon_mib"] > 0
        assert r["whole_process_peak_mib"] >= r["training_peak"]["vmhwm_mib"]
        assert r["seconds_per_step"] > 0 and r["unet_forward_passes_per_step"] == passes
        assert r["storage_files"] == files
        # quantized runs load a quantized folder as a user's `--model DIR` run does; float runs build
        assert r["model"] == ("quantized folder, loaded as --model DIR" if weights == "int8" else "built layer by layer")
        # what is trained is stored: 4 bytes a number in fp32, 1 for the int8 changes of a scale file
        per_number = 1 if name == "peqa" else 4
        assert r["trainable_parameters"] > 0 and r["storage_bytes"] >= per_number * r["trainable_parameters"]
    for name in ("zoodip", "ti"):
        assert rows[name]["trainable_parameters"] == 768 and 3072 < rows[name]["storage_bytes"] < 4096
    db, peqa, lora = rows["dreambooth"], rows["peqa"], rows["lora"]
    assert db["trainable_parameters"] > 50 * max(peqa["trainable_parameters"], lora["trainable_parameters"])
    assert peqa["storage_bytes"] * 50 < db["storage_bytes"] and lora["storage_bytes"] * 20 < db["storage_bytes"]
    assert peqa["method_info"]["weights"] == "int8" and peqa["method_info"]["scale_mode"] == "out"
    md = (out / "memory.md").read_text()
    for name, (weights, _, _) in EXPECTED.items():
        assert f"| {name} | tiny | {weights} | 64 | ok |" in md
    assert set(result["summary"]["whole_process_ratio_to_lowest"]) == {f"{n} ({w})" for n, (w, _, _) in
                                                                       EXPECTED.items()}


def test_every_method_is_measurable():
    for name in METHODS:
        bm = _implemented(name)
        assert isinstance(bm, BenchMethod) and bm.name == name and bm.prepare is not None
        assert bm.default_weights == method_class(name).default_weights
        from quantdream.models.sdxl import SDXL_METHODS
        assert ("sdxl" in bm.archs) == (name in SDXL_METHODS) and "sd15" in bm.archs
    assert {n: _implemented(n).default_weights for n in ("dreambooth", "lora", "qlora", "peqa", "tuneqdm")} == \
        {"dreambooth": "none", "lora": "none", "qlora": "nf4", "peqa": "int8", "tuneqdm": "int8"}
    assert _implemented("not-a-method") is None


def test_sdxl_rows_say_not_implemented():
    row = measure_in_process(BenchSpec(arch="sdxl", method="tuneqdm"))
    assert row["status"] == "not implemented" and row["weights"] == "int8" and "sdxl" in row["note"]


def _structure(model):
    """(name, class) of every module and (name, shape, dtype) of every parameter and buffer."""
    mods = [(n, type(m).__name__) for n, m in model.named_modules()]
    tensors = [(n, tuple(t.shape), t.dtype) for n, t in [*model.named_parameters(), *model.named_buffers()]]
    return mods, tensors


@pytest.mark.parametrize("name,weights", [("zoodip", "int8"), ("peqa", "int4"), ("qlora", "nf4"), ("lora", "none")])
def test_layer_by_layer_build_matches_prepare_model_on_the_whole_model(name, weights):
    """prepare_model on one-layer holders (what the bench does at SD size) = prepare_model on the float model."""
    import torch
    from accelerate import init_empty_weights

    from quantdream.bench.memory import _component_prepare, method_bench, prepare_layer_by_layer
    from quantdream.models import embedded
    prepare = method_bench(name).prepare
    whole = embedded.build_components()
    for m in ("text_encoder", "vae", "unet"):
        whole[m].requires_grad_(False).eval()
    prepare(whole["text_encoder"], whole["vae"], whole["unet"], weights)
    with init_empty_weights(include_buffers=False):
        meta = embedded.build_components()
    for i, m in enumerate(("text_encoder", "vae", "unet")):
        built = prepare_layer_by_layer(meta[m], _component_prepare(prepare, m, weights), seed=i)
        assert _structure(built) == _structure(whole[m]), m
        assert not any(t.is_meta for t in [*built.parameters(), *built.buffers()])
        assert getattr(built, "_quantdream_linear_backend", None) == getattr(whole[m], "_quantdream_linear_backend",
                                                                            None)
    x = torch.randn(1, embedded.LATENT_CHANNELS, 16, 16)
    cond = torch.randn(1, 8, 768)
    with torch.no_grad():
        assert built(x, 10, cond).sample.shape == x.shape          # the prepared UNet runs


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="--arch 'sd3'"):
        check_spec(BenchSpec(arch="sd3"))
    with pytest.raises(ValueError, match="--weights 'int3'"):
        check_spec(BenchSpec(weights="int3"))
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        check_spec(BenchSpec(steps=0))
    with pytest.raises(ValueError, match="multiple of 8"):
        check_spec(BenchSpec(arch="sd15", resolution=500))
    with pytest.raises(ValueError, match="unknown method 'dreambooht'; did you mean 'dreambooth'"):
        check_spec(BenchSpec(method="dreambooht"))
    # the method's own refusal (train.resolve_weights)
    with pytest.raises(ValueError, match="--weights int8 does not apply to --method dreambooth; choose none"):
        check_spec(BenchSpec(method="dreambooth", weights="int8"))
    with pytest.raises(ValueError, match="--weights int4 does not apply to --method qlora; choose nf4"):
        check_spec(BenchSpec(method="qlora", weights="int4"))
    with pytest.raises(ValueError, match="--weights nf4 does not apply to --method zoodip"):
        check_spec(BenchSpec(method="zoodip", weights="nf4"))
    check_spec(BenchSpec(method="peqa", weights="int4"))
    check_spec(BenchSpec(method="ti", weights="int8"))


def test_cli_errors(tmp_path, capsys):
    assert main(["bench", "memory", "--arch", "sd3", "--out", str(tmp_path / "o")]) == 2
    assert "--arch 'sd3'" in capsys.readouterr().err
    assert main(["bench", "memory", "--methods", " ,", "--out", str(tmp_path / "o")]) == 2
    assert "--methods is empty" in capsys.readouterr().err
    assert main(["bench", "memory", "--methods", "zoodip,peqq", "--out", str(tmp_path / "o")]) == 2
    assert "unknown method 'peqq'; did you mean 'peqa'" in capsys.readouterr().err
    assert main(["bench", "memory", "--methods", "ti,dreambooth", "--weights", "int8", "--out",
                 str(tmp_path / "o")]) == 2
    assert "--weights int8 does not apply to --method dreambooth" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["bench"]) == 2


def test_markdown_and_summary_from_rows():
    rows = [{"method": "zoodip", "arch": "sd15", "weights": "int8", "resolution": 512, "status": "ok",
             "training_peak": {"vmhwm_mib": 2000.0, "rss_anon_mib": 1800.0, "rss_file_mib": 150.0},
             "whole_process_peak_mib": 2500.0, "storage_bytes": 3160, "seconds_per_step": 40.0,
             "unet_forward_passes_per_step": 3.0},
            {"method": "ti", "arch": "sd15", "weights": "none", "resolution": 512, "status": "ok",
             "training_peak": {"vmhwm_mib": 10000.0, "rss_anon_mib": 9800.0, "rss_file_mib": 150.0},
             "whole_process_peak_mib": 10000.0, "storage_bytes": 3160, "seconds_per_step": 60.0,
             "unet_forward_passes_per_step": 1.0},
            {"method": "dreambooth", "arch": "sd15", "weights": "", "resolution": 512, "status": "failed",
             "note": "killed by the OS (out of memory?)"}]
    s = summarize(rows)
    assert s["lowest_whole_process"] == "zoodip (int8)" and s["whole_process_ratio_to_lowest"]["ti (none)"] == 4.0
    assert "dreambooth ()" not in s["whole_process_ratio_to_lowest"]
    md = memory_markdown({"rows": rows, "summary": s})
    assert "| ti | sd15 | none | 512 | ok | 10000 |" in md and "3.16 kB" in md and "ti (none) 4.00x" in md
    assert "failed: killed by the OS (out of memory?)" in md


@pytest.mark.parametrize("needed, hidden", [((), ["peft", "bitsandbytes", "scipy"]),
                                                  (("peft", "bitsandbytes", "scipy"), [])])
def test_unused_integrations_are_hidden_from_diffusers_in_a_fresh_process(needed, hidden):
    """The low-memory mode's part 0: diffusers then runs as on a machine without peft / bitsandbytes."""
    import subprocess
    import sys
    code = ("import sys, json; from quantdream.memory import skip_unused_integrations as s; "
            f"h = s({needed!r}); from diffusers import UNet2DConditionModel; "
            "from diffusers.utils import is_peft_available; "
            "print(json.dumps([h, is_peft_available(), s()]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    got, peft_seen, again = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == hidden and again == []                 # once diffusers is imported nothing more is hidden
    assert peft_seen == (not hidden)


def test_low_memory_bench_hides_the_integrations_before_diffusers_loads():
    """The bench's measuring process must hide what the method does not need before anything imports
    diffusers (models.load does), or the low-memory rows carry peft, bitsandbytes and scipy."""
    import subprocess
    import sys
    code = ("import sys, json; from quantdream.bench.memory import BenchSpec, measure_in_process; "
            "row = measure_in_process(BenchSpec(arch='tiny', method='zoodip', steps=1, threads=1, low_memory=True)); "
            "print(json.dumps([row['status'], [m for m in ('peft', 'bitsandbytes', 'scipy') "
            "if sys.modules.get(m) is not None], type(sys.modules['torch._dynamo']).__name__]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    status, imported, dynamo = json.loads(r.stdout.strip().splitlines()[-1])
    assert status == "ok" and imported == []
    assert dynamo == "DeferredDynamo"          # a whole ZOODiP run never needed torch's compiler


def test_torch_compiler_is_deferred_until_something_needs_it():
    """Part 0 also stands in for torch._dynamo: diffusers and transformers import and a stock pipeline
    loads and runs without it; the first use beyond the stand-in's decorators (here: an optimizer step)
    imports the real module, which then stays."""
    import subprocess
    import sys
    code = """if True:
        import json, sys, torch
        from quantdream.memory import skip_unused_integrations
        skip_unused_integrations()
        from quantdream.models.load import load_pipeline
        pipe = load_pipeline("tiny")
        u = pipe.unet
        x = torch.randn(1, u.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
        ctx = torch.randn(1, 4, u.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out = u(x, 500, encoder_hidden_states=ctx).sample
        stand_in = sys.modules["torch._dynamo"]
        before = [type(stand_in).__name__, "torch._dynamo.convert_frame" in sys.modules]
        p = torch.nn.Parameter(torch.zeros(2)); opt = torch.optim.AdamW([p]); p.grad = torch.ones(2); opt.step()
        after = [type(sys.modules["torch._dynamo"]).__name__, torch._dynamo is sys.modules["torch._dynamo"],
                 torch._dynamo.is_compiling(), hasattr(torch._dynamo, "optimize"),
                 stand_in.eval_frame is torch._dynamo.eval_frame]     # a kept reference answers as the real one
        print(json.dumps([before, after, bool(torch.isfinite(out).all()), float(p[0])]))
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    before, after, finite, p0 = json.loads(r.stdout.strip().splitlines()[-1])
    assert before == ["DeferredDynamo", False] and finite
    assert after == ["module", True, False, True, True] and p0 != 0.0
