"""Quantization benchmark: storage, resident memory, speed, kernels, quality.

    python benchmarks/quantization.py                 # everything; prints ONE JSON object on stdout
    python benchmarks/quantization.py --skip-sd       # embedded model only (fast)
    python benchmarks/quantization.py --quality       # + prompt-accuracy drop of W8A16/W4A16/W4A8 vs fp32
    python benchmarks/quantization.py --skip-sd --quality --captions 50   # quality only, quicker

Storage and memory use SD-1.5-architecture components with random weights (models/arch.py): the
sizes and the process peak do not depend on the weight values. Memory is measured in a fresh
subprocess per setting that loads the saved UNet + text encoder + VAE encoder and runs one UNet
forward (VmHWM of the whole process, which includes ~0.4 GiB of torch/diffusers/transformers code).
Speed: one UNet forward per setting, same process, same inputs, ``--threads`` threads.
Sizes are in MiB / GiB (2^20 / 2^30 bytes). Logs go to stderr.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("bench")
GIB, MIB = 2 ** 30, 2 ** 20
BARS = {"unet_int8_gib": 0.85, "unet_int4_gib": 0.48, "pipeline_int8_gib": 1.05,
        "mem_int8_gib": 1.5, "mem_int4_gib": 1.1}


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())


def timeit(fn, repeats: int) -> float:
    with torch.no_grad():
        fn()  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return best


# -- storage ------------------------------------------------------------------------------------------
def save_sd15(work: Path, weights: str) -> Path:
    from quantdream.models.arch import build
    from quantdream.quant import quantize_model
    from quantdream.quant.io import save_quantized
    out = work / f"sd15-{weights}"
    if (out / "quantdream.json").exists():
        return out
    comps = {}
    for name in ("unet", "text_encoder", "vae"):
        log.info("building + quantizing SD-1.5 %s (%s)", name, weights)
        comps[name] = quantize_model(build("sd15", name), weights)
        gc.collect()
    save_quantized(comps, out, {"arch": "sd15", "weights": weights, "random_weights": True},
                   float_dtype="fp16", overwrite=True)
    return out


def storage(work: Path) -> dict:
    res = {}
    for weights in ("int8", "int4"):
        d = save_sd15(work, weights)
        parts = {n: folder_bytes(d / n) for n in ("unet", "text_encoder", "vae")}
        res[weights] = {f"{n}_mib": round(b / MIB, 1) for n, b in parts.items()}
        res[weights]["unet_gib"] = round(parts["unet"] / GIB, 4)
        res[weights]["pipeline_gib"] = round(folder_bytes(d) / GIB, 4)
    res["note"] = ("non-quantized tensors (embeddings, norms, biases) stored fp16, scales fp32; pipeline = UNet + "
                   "text encoder + VAE + index (a tokenizer and scheduler add ~1.5 MiB)")
    return res


# -- resident memory (child process) ---------------------------------------------------------------------
def memory_child(folder: str, res: int, dtype: str, opts: str = "") -> None:
    torch.set_num_threads(1)
    from quantdream.memory import low_memory_allocator, low_memory_unet, peak, proc_status, skip_unused_integrations
    from quantdream.quant.io import load_quantized
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if "lowmem" in opts:   # personalize --low-memory: allocator, unused integrations, mapped tables, low_memory_unet
        low_memory_allocator()
        skip_unused_integrations()
    t0 = time.perf_counter()
    m = load_quantized(folder, ["unet", "text_encoder", "vae"], dtype=dt, drop={"vae": ["decoder", "post_quant_conv"]},
                       narrow_embeddings="lowmem" in opts)   # token table mapped from the file, rows read on demand
    if "lowmem" in opts:
        low_memory_unet(m["unet"])
    after_load = proc_status()
    load_s = time.perf_counter() - t0
    unet, te = m["unet"], m["text_encoder"]
    with torch.no_grad():
        cond = te(torch.randint(0, 49408, (1, 77)))[0].to(dt)
        x = torch.randn(1, 4, res // 8, res // 8, dtype=dt)
        t0 = time.perf_counter()
        unet(x, 500, encoder_hidden_states=cond)
        fwd_s = time.perf_counter() - t0
    p = peak()
    print(json.dumps({"vmhwm_mib": round(p["vmhwm_mib"], 1), "after_load": {k: round(v, 1) for k, v in after_load.items()},
                      "after_forward": {k: round(p[k], 1) for k in ("vmrss_mib", "rss_anon_mib", "rss_file_mib")},
                      "load_s": round(load_s, 2), "forward_s": round(fwd_s, 2), "compute_dtype": dtype, "opts": opts}))


def memory(work: Path, res: int) -> dict:
    out = {}
    for weights in ("int8", "int4"):
        for dtype in ("fp32", "bf16"):
            folder = save_sd15(work, weights)
            cmd = [sys.executable, __file__, "--_memory-child", str(folder), "--res", str(res), "--_dtype", dtype]
            log.info("memory: fresh process, %s weights, %s compute", weights, dtype)
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"memory child failed:\n{r.stderr[-3000:]}")
            row = json.loads(r.stdout.strip().splitlines()[-1])
            row["vmhwm_gib"] = round(row["vmhwm_mib"] * MIB / GIB, 3)
            out[f"{weights}_{dtype}"] = row
        # lowest-memory configuration: bf16 floats, personalize --low-memory's allocator and chunking
        cmd = [sys.executable, __file__, "--_memory-child", str(folder), "--res", str(res), "--_dtype", "bf16",
               "--_opts", "lowmem"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            row = json.loads(r.stdout.strip().splitlines()[-1])
            row["vmhwm_gib"] = round(row["vmhwm_mib"] * MIB / GIB, 3)
            out[f"{weights}_bf16_lowmem"] = row
    base = subprocess.run([sys.executable, "-c", "import torch, diffusers, transformers, json; "
                           "from diffusers import UNet2DConditionModel, AutoencoderKL; "
                           "from transformers import CLIPTextModel; from quantdream.memory import peak; "
                           "print(json.dumps(peak()))"], capture_output=True, text=True)
    out["imports_only_vmhwm_mib"] = round(json.loads(base.stdout.strip().splitlines()[-1])["vmhwm_mib"], 1)
    return out


# -- speed ------------------------------------------------------------------------------------------------
def _calibrate_random(unet, inputs):
    from quantdream.quant.activations import calibrate_activations
    calibrate_activations(unet, inputs, bits=8)


def speed_settings(build_unet, inputs, repeats: int, with_acts: bool, calib_inputs) -> dict:
    """Forward seconds of each setting; ratios to fp32 and bf16 float."""
    from quantdream.quant import quantize_model
    run = lambda m, dt: m(**{k: (v.to(dt) if torch.is_tensor(v) and v.is_floating_point() else v)  # noqa: E731
                             for k, v in inputs.items()})
    times = {}
    base = build_unet()
    times["fp32"] = timeit(lambda: run(base, torch.float32), repeats)
    b16 = copy.deepcopy(base).to(torch.bfloat16)
    times["bf16"] = timeit(lambda: run(b16, torch.bfloat16), repeats)
    del b16
    for weights in ("int8", "int4"):
        q = quantize_model(copy.deepcopy(base), weights)
        gc.collect()
        w = "W8" if weights == "int8" else "W4"
        times[f"{w}A16_fp32"] = timeit(lambda: run(q, torch.float32), repeats)
        q.to(torch.bfloat16)
        times[f"{w}A16_bf16"] = timeit(lambda: run(q, torch.bfloat16), repeats)
        q.to(torch.float32)
        if with_acts:
            _calibrate_random(q, calib_inputs)
            times[f"{w}A8_fp32"] = timeit(lambda: run(q, torch.float32), repeats)
        del q
        gc.collect()
    return {"seconds": {k: round(v, 3) for k, v in times.items()},
            "ratio_to_fp32": {k: round(v / times["fp32"], 3) for k, v in times.items()},
            "ratio_to_bf16": {k: round(v / times["bf16"], 3) for k, v in times.items()}}


def speed_embedded(repeats: int) -> dict:
    from quantdream.models.embedded import LATENT_CHANNELS, build_components
    g = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(2, LATENT_CHANNELS, 16, 16, generator=g), "timestep": torch.tensor(500),
              "encoder_hidden_states": torch.randn(2, 32, 768, generator=g)}
    calib = [{"sample": torch.randn(2, LATENT_CHANNELS, 16, 16, generator=g), "timestep": torch.tensor(t),
              "encoder_hidden_states": torch.randn(2, 32, 768, generator=g)} for t in (100, 400, 700, 950)]
    r = speed_settings(lambda: build_components()["unet"].eval(), inputs, repeats, True, calib)
    r["setup"] = "embedded UNet (random weights), batch 2 (CFG), 16x16 latents; A8 calibrated on 4 random inputs"
    return r


def speed_sd15(res: int, repeats: int) -> dict:
    from quantdream.models.arch import build
    g = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(1, 4, res // 8, res // 8, generator=g), "timestep": torch.tensor(500),
              "encoder_hidden_states": torch.randn(1, 77, 768, generator=g)}
    r = speed_settings(lambda: build("sd15", "unet"), inputs, repeats, False, None)
    r["setup"] = f"SD-1.5 UNet (random weights), batch 1, {res} px ({res // 8}x{res // 8} latents), best of {repeats}"
    return r


# -- kernels -----------------------------------------------------------------------------------------------
def kernels() -> dict:
    """One Linear layer, dequantize+GEMM vs torch's CPU weight-only integer kernels (ms)."""
    from torch import nn

    from quantdream.quant import QLinear
    out = {}
    for (M, K, N) in [(4096, 320, 320), (4096, 320, 2560), (64, 1280, 1280), (256, 1280, 5120)]:
        lin = nn.Linear(K, N)
        x = torch.randn(M, K)
        q8, q4 = QLinear.from_module(lin, 8), QLinear.from_module(lin, 4, 128)
        w8 = q8.qweight
        s8 = q8.scale[:, 0]
        row = {"fp32_float": timeit(lambda: lin(x), 3), "bf16_float": timeit(lambda: torch.nn.functional.linear(
            x.bfloat16(), lin.weight.bfloat16()), 3),
            "int8_dequant_fp32": timeit(lambda: q8(x), 3), "int8_dequant_bf16": timeit(lambda: q8(x.bfloat16()), 3),
            "int4_dequant_fp32": timeit(lambda: q4(x), 3), "int4_dequant_bf16": timeit(lambda: q4(x.bfloat16()), 3),
            "int8pack_mm_bf16": timeit(lambda: torch._weight_int8pack_mm(x.bfloat16(), w8, s8.bfloat16()), 3)}
        try:
            codes = torch.randint(0, 16, (N, K), dtype=torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            sz = torch.rand(K // 128, N, 2).bfloat16()
            row["int4pack_mm_bf16"] = timeit(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.bfloat16(), packed, 128, sz), 3)
        except Exception as e:  # op missing in this torch build
            row["int4pack_mm_bf16"] = f"unavailable: {type(e).__name__}"
        out[f"M{M}_K{K}_N{N}"] = {k: (round(v * 1e3, 2) if isinstance(v, float) else v) for k, v in row.items()}
    out["note"] = "ms per call; no integer Conv2d exists in torch, so convs always dequantize"
    return out


# -- quality -------------------------------------------------------------------------------------------------
QUALITY_SETTINGS = [("fp32", None, None), ("W8A16", "int8", None), ("W4A16", "int4", None), ("W4A8", "int4", 8)]
QUALITY_BARS = {"W8A16": 2.0, "W4A16": 5.0, "W4A8": 8.0}  # allowed drop in prompt-accuracy points vs fp32


def quality(model: str | None, n_captions: int, n_images: int, evaluator: str | None = None) -> dict:
    """Prompt accuracy (the embedded-model protocol: held-out captions x images, read by the world
    reader) of each UNet setting against fp32 in the same run. Weights: the package's quantizer
    (int8 per-channel, int4 group 128); A8: Q-Diffusion-style activation quantizers calibrated on the
    float model's inputs over the sampling timesteps (the `quantize --acts 8` recipe)."""
    from diffusers import StableDiffusionPipeline

    from quantdream.cli.quantize import DEFAULT_CALIB_PROMPTS
    from quantdream.eval import load_evaluator
    from quantdream.eval.world_protocol import held_out_captions, measure_prompt_accuracy
    from quantdream.models.embedded import PACKAGE_MODEL_DIR
    from quantdream.models.load import SAMPLING_DEFAULTS
    from quantdream.models.sample import use_fast_sampler
    from quantdream.quant import quantize_model
    from quantdream.quant.activations import calibrate_activations, collect_unet_inputs
    model = model or str(PACKAGE_MODEL_DIR)
    if not (Path(model) / "unet").is_dir():
        return {"status": f"skipped: no trained UNet at {model} yet"}
    steps, guidance = SAMPLING_DEFAULTS["tiny"]
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    use_fast_sampler(pipe)
    ev = load_evaluator(evaluator) if evaluator else load_evaluator()
    caps = held_out_captions(n_captions)
    float_unet = pipe.unet
    out: dict = {"setup": f"{n_captions} held-out captions x {n_images} images, DDIM {steps} steps, guidance "
                          f"{guidance}; UNet quantized, text encoder and VAE float", "settings": {}}
    for name, weights, acts in QUALITY_SETTINGS:
        log.info("quality: %s", name)
        unet = float_unet if weights is None else quantize_model(copy.deepcopy(float_unet), weights)
        if acts:
            inputs = collect_unet_inputs(float_unet, pipe.text_encoder, pipe.tokenizer, copy.deepcopy(pipe.scheduler),
                                         DEFAULT_CALIB_PROMPTS, num_inference_steps=steps, guidance_scale=guidance)
            calibrate_activations(unet, inputs, bits=acts)
        pipe.unet = unet
        acc = measure_prompt_accuracy(pipe, ev, caps, n_images, 0, steps, guidance)
        out["settings"][name] = {"prompt_accuracy": round(acc["overall"], 4),
                                 **{k: round(v, 4) for k, v in acc.items() if k not in ("overall", "counts")}}
    pipe.unet = float_unet
    base = out["settings"]["fp32"]["prompt_accuracy"]
    out["drop_points"] = {n: round(100 * (base - out["settings"][n]["prompt_accuracy"]), 2) for n in QUALITY_BARS}
    return out


def check_bars(r: dict) -> dict:
    bars = {}
    if "storage" in r:
        s = r["storage"]
        for key, val in (("unet_int8_gib", s["int8"]["unet_gib"]), ("unet_int4_gib", s["int4"]["unet_gib"]),
                         ("pipeline_int8_gib", s["int8"]["pipeline_gib"])):
            bars[key] = {"value": val, "bar": BARS[key], "met": val <= BARS[key]}
    if "memory" in r:
        for w in ("int8", "int4"):
            best = min(r["memory"][k]["vmhwm_gib"] for k in r["memory"] if k.startswith(w + "_"))
            fp32 = r["memory"][f"{w}_fp32"]["vmhwm_gib"]
            bars[f"mem_{w}_gib"] = {"value_fp32_compute": fp32, "value_bf16_compute": r["memory"][f"{w}_bf16"]["vmhwm_gib"],
                                    "bar": BARS[f"mem_{w}_gib"], "met_fp32": fp32 <= BARS[f"mem_{w}_gib"],
                                    "met_best": best <= BARS[f"mem_{w}_gib"]}
    if "drop_points" in r.get("quality", {}):
        for n, limit in QUALITY_BARS.items():
            d = r["quality"]["drop_points"][n]
            bars[f"quality_{n}_drop_points"] = {"value": d, "bar": limit, "met": d <= limit}
    return bars


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-sd", action="store_true", help="embedded model only (no SD-1.5 storage/memory/speed)")
    ap.add_argument("--skip-speed-sd", action="store_true", help="skip the SD-1.5 speed runs (slowest part)")
    ap.add_argument("--quality", action="store_true", help="prompt-accuracy drop of each setting on the embedded model")
    ap.add_argument("--model", default=None, help="embedded-model folder for --quality (default: the packaged one)")
    ap.add_argument("--captions", type=int, default=200, help="--quality: held-out captions (default 200)")
    ap.add_argument("--images", type=int, default=4, help="--quality: images per caption (default 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for speed runs (default 1)")
    ap.add_argument("--repeats", type=int, default=1, help="timed forwards per SD-1.5 setting (best of; default 1)")
    ap.add_argument("--res", type=int, default=512, help="SD-1.5 image size (default 512)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "quantdream-bench"),
                    help="where the SD-1.5 quantized folders go (default: quantdream-bench in the temp folder)")
    ap.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    ap.add_argument("--_dtype", dest="dtype", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--_opts", dest="opts", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.captions < 1 or a.images < 1:
        ap.error(f"--captions and --images must be at least 1 (got {a.captions}, {a.images})")
    if a.memory_child:
        memory_child(a.memory_child, a.res, a.dtype, a.opts)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip()
    r = {"git": rev, "torch": torch.__version__, "threads": a.threads, "cpu_count": os.cpu_count(),
         "device": "cpu", "note": "another training job shared the 2 CPU cores during these runs" if
         os.environ.get("QD_BENCH_SHARED") else None}
    log.info("kernels"); r["kernels"] = kernels()
    log.info("speed: embedded"); r["speed_embedded"] = speed_embedded(repeats=20)
    if not a.skip_sd:
        log.info("storage"); r["storage"] = storage(work)
        r["memory"] = memory(work, a.res)
        if not a.skip_speed_sd:
            log.info("speed: SD-1.5"); r["speed_sd15"] = speed_sd15(a.res, a.repeats)
    if a.quality:
        r["quality"] = quality(a.model, a.captions, a.images)
    r["bars"] = check_bars(r)
    print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
