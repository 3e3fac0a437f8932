"""Write docs/results.md, the current results, from the committed JSONs in benchmarks/results/.

    python benchmarks/results_page.py            # rewrite docs/results.md
    python benchmarks/results_page.py --check    # exit 1 if docs/results.md differs from what the JSONs give

Every figure on the page is read from a JSON here; the page is never edited by hand (tests/test_results_page.py
regenerates it and compares). Which JSON is current for each table, and which earlier runs it replaced, is
written down below (CURRENT, HISTORY); a new run becomes current by naming its file there.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "results.md"

CURRENT = {
    "personalization": "2026-12-03/personalization-10subjects-n8.json",
    "comparison": "2026-11-25/comparison-10subjects-refresh-memory-scales-int8.json",
    "memory": "2026-11-24/personalization_memory-lowmem-3.json",
    "quantization_quality": "2026-11-24/quantization_quality.json",
    "quantization_memory": "quantization-lowmem-2026-11-23-2.json",
    "quantization_storage": "quantization-2026-11-23.json",
    "stock_pipeline": "2026-12-03/stock_pipeline-zoodip-n8.json",
    "subject_fidelity": "2026-12-04/subject_fidelity-tiny-v1.json",
    "sdxl_memory_int8": "2026-12-04/memory-sdxl-zoodip-int8-lowmem.json",
    "sdxl_memory_int4": "2026-12-04/memory-sdxl-zoodip-int4-lowmem.json",
    "gpu_check": "2026-12-04/gpu_check-h200.json",
    "zo_noise_embedded": "2026-12-04/zo_noise_embedded.json",
    "zo_noise_sd15": "2026-12-04/zo_noise_sd15.json",
    "zo_noise_sd15_cuda": "2026-12-04/zo_noise_sd15_cuda512.json",
    "distributed": "2026-12-04/distributed-median.json",
    "batch": "2026-12-04/batch-reuse.json",
}

# (superseded JSON, what it measured, how to read its headline figure, why it was replaced)
HISTORY = [
    ("2026-12-04/distributed-idle.json", "ZOODiP n = 8 on 2 ranks, one pair of 50-step runs on idle cores",
     ("distributed", None), "the median of 3 pairs of 100-step runs (distributed-median.json)"),
    ("2026-12-04/batch-idle.json", "8 Ray jobs of 40 steps on 2 workers vs one after the other, a fresh worker per job",
     ("batch", None), "workers kept between jobs, 200-step jobs, the kill in a batch of its own (batch-reuse.json)"),
    ("2026-12-04/batch.json", "8 Ray jobs on 2 workers vs one after the other, while other work shared the cores",
     ("batch", None), "measured again on idle cores (batch-idle.json)"),
    ("2026-12-04/distributed.json", "ZOODiP n = 8 on 2 ranks, measured while other work shared the 2 cores",
     ("distributed", None), "measured again on idle cores (distributed-idle.json)"),
    ("2026-11-24/personalization-10subjects.json", "ZOODiP, 10 subjects, the paper's PUTS [500, 900), n = 2",
     ("personalization", "zoodip"), "PUTS [800, 1000) learned the subject better on this model"),
    ("2026-11-24/personalization-10subjects-puts800.json", "ZOODiP, 10 subjects, PUTS [800, 1000), n = 2",
     ("personalization", "zoodip"), "n = 8 directions a step (the oracle study: direction noise was the gap)"),
    ("2026-11-24/comparison-10subjects.json", "comparison: ZOODiP row, paper interval",
     ("comparison", "zoodip"), "ZOODiP and zoodip-fast trained again at their embedded PUTS interval"),
    ("2026-11-25/comparison-10subjects-tuneqdm-n2.json", "comparison: TuneQDM with N = 2 timestep experts",
     ("comparison", "tuneqdm"), "N = 2 lost prompt accuracy; N = 4 (TuneQDM's script value) kept"),
    ("2026-11-25/comparison-10subjects-refresh-memory-scales.json", "comparison: TuneQDM storage, float16 scale file",
     ("storage", "tuneqdm"), "scale files as int8 changes (same scores within 3e-4)"),
    ("2026-11-24/comparison-10subjects.json", "comparison: TuneQDM storage, float32 scales, N = 4",
     ("storage", "tuneqdm"), "float16, then int8 changes"),
    ("personalization_memory-2026-11-23.json", "ZOODiP int8 on SD-1.5, whole-process peak",
     ("memory", None), "embedding tables as memory maps, unused integrations (peft, bitsandbytes) not imported"),
    ("personalization_memory-2026-11-23-2.json", "the same", ("memory", None),
     "the bench itself had imported those integrations; scipy hidden too"),
    ("2026-11-24/personalization_memory-lowmem.json", "the same", ("memory", None),
     "concatenation-free up blocks and other low-memory changes"),
    ("2026-11-24/personalization_memory-lowmem-2.json", "the same", ("memory", None),
     "torch's compiler front end no longer imported by runs that never compile"),
    ("quantization-lowmem-2026-11-23.json", "int8 UNet + text encoder + VAE encoder, one 512 px forward",
     ("quantization_memory", "int8"), "lower resident peak after the low-memory work"),
]

COLUMNS = [("world_clip_i", "world CLIP-I"), ("effnet", "EffNet-Lite0"), ("world_clip_t", "world CLIP-T"),
           ("prompt_accuracy", "prompt acc.")]
PERSONALIZATION_ROWS = [("floor (int8)", "floor: the init word, no learning (int8)"),
                        ("ti", "textual inversion (fp32, backprop)"),
                        ("zoodip", "**ZOODiP** (int8, forward passes only; n = 8)"),
                        ("budget-vocab16", "zoodip-fast (int8; 16 vocabulary directions, n = 2)")]
METHOD_NAMES = {"zoodip": "ZOODiP", "zoodip-fast": "zoodip-fast", "ti": "TI", "gf-ti": "GF-TI",
                "dreambooth": "DreamBooth", "lora": "LoRA", "qlora": "QLoRA", "peqa": "PEQA", "tuneqdm": "TuneQDM",
                "tuneqdm-s1": "TuneQDM-S1", "tuneqdm-s2": "TuneQDM-S2"}


def load(rel: str) -> dict:
    return json.loads((RESULTS / rel).read_text())


def f3(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def size(n) -> str:
    """Bytes in decimal units, as the papers print them."""
    if n is None:
        return "-"
    for unit, scale, least in (("GB", 1e9, 1e9), ("MB", 1e6, 1e5), ("KB", 1e3, 1e3)):
        if n >= least:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def link(rel: str) -> str:
    return f"[{rel}](../benchmarks/results/{rel})"


def headline(rel: str, kind: tuple[str, str | None]) -> str:
    d, (what, key) = load(rel), kind
    if what == "personalization":
        v, ti = d["variants"][key]["world_clip_i"], d["variants"]["ti"]["world_clip_i"]
        return f"world CLIP-I {f3(v)} ({v / ti:.2f} x TI)"
    if what == "comparison":
        return f"world CLIP-I {f3(d['means'][key]['world_clip_i'])}, prompt acc. {f3(d['means'][key]['prompt_accuracy'])}"
    if what == "storage":
        return f"SD-1.5 file {size(d['means'][key]['memory_storage_bytes'])}"
    if what == "memory":
        b = d["bars"]
        return f"{b['zoodip_whole_process_mib']:.0f} MiB, TI / ZOODiP {b['ti_over_zoodip_whole_process']:.2f}x"
    if what == "batch":
        return f"{d['speedup']:.2f}x faster on 2 workers"
    if what == "distributed":
        return f"speedup with 2 ranks {d['speedup_2ranks']:.2f}x"
    if what == "quantization_memory":
        return f"{d[key]['vmhwm_mib'] / 1024:.3f} GiB"
    raise ValueError(f"unknown headline kind {what!r}")


def personalization_section() -> list[str]:
    rel = CURRENT["personalization"]
    d = load(rel)
    v, ti = d["variants"], d["variants"]["ti"]["world_clip_i"]
    out = ["## Personalization on the embedded model", "",
           f"All {len(d['subjects'])} example subjects, every prompt x {d['images_per_prompt']} images, seed {d['seed']}, "
           f"{d['threads']} thread ({link(rel)}; `benchmarks/personalization.py`). Higher is better in every column.", "",
           "| run | " + " | ".join(c for _, c in COLUMNS) + " | x TI (CLIP-I) | UNet passes | s (1 thread) |",
           "|---|" + "---|" * (len(COLUMNS) + 3)]
    for key, name in PERSONALIZATION_ROWS:
        r = v[key]
        passes = "-" if r.get("unet_forward_passes") is None else f"{r['unet_forward_passes']:.0f}"
        secs = "-" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        out.append(f"| {name} | " + " | ".join(f3(r[k]) for k, _ in COLUMNS)
                   + f" | {r['world_clip_i'] / ti:.2f} | {passes} | {secs} |")
    return out + [""]


def comparison_section() -> list[str]:
    rel = CURRENT["comparison"]
    d = load(rel)
    mem = d["memory"]
    out = ["## Method comparison (ZOODiP's Table 1)", "",
           f"Quality columns: the embedded model, {len(d['subjects'])} subjects, every prompt x 4 images. Memory, storage "
           f"and passes: the {mem['arch'].upper().replace('SD15', 'SD-1.5')} architecture with random weights at 512 px, "
           f"{'low-memory mode, ' if mem['low_memory'] else ''}whole-process peak of a fresh process "
           f"({link(rel)}; `benchmarks/comparison.py`; the report with Figure 1: "
           f"[comparison/report.md](../benchmarks/results/2026-11-24/comparison/report.md)). "
           "This run's ZOODiP row is at the paper's n = 2 and GF-TI's at the same 4,500 UNet passes; ZOODiP at its "
           "embedded default n = 8 is in the table above.", "",
           "| method | weights | backprop | " + " | ".join(c for _, c in COLUMNS)
           + " | SD-1.5 training memory (MiB) | storage (SD-1.5) | UNet passes / step |",
           "|---|---|---|" + "---|" * (len(COLUMNS) + 3)]
    for m in d["methods"]:
        r, mr = d["means"][m], mem["rows"].get(m, {})
        out.append(f"| {METHOD_NAMES.get(m, m)} | {r['weights']} | {'no' if r['gradient_free'] else 'yes'} | "
                   + " | ".join(f3(r[k]) for k, _ in COLUMNS)
                   + f" | {r['memory_mib']:.0f} | {size(r['memory_storage_bytes'])} | "
                   f"{mr.get('unet_forward_passes_per_step', 0):.0f} |")
    b = d["bars"]["zoodip_vs_dreambooth"]
    out += ["", f"DreamBooth / ZOODiP training memory: {b['ratio']:.2f}x (the paper: {b['bar']}x). Memory order, high to "
            f"low: {', '.join(METHOD_NAMES.get(m, m) for m in d['bars']['memory_ordering']['order_high_to_low'])}.", ""]
    return out


def memory_section() -> list[str]:
    d, q = load(CURRENT["memory"]), load(CURRENT["quantization_memory"])
    st = load(CURRENT["quantization_storage"])["bars"]
    b = d["bars"]
    return ["## Memory and storage on SD-1.5 (random weights)", "",
            f"- ZOODiP int8, 512 px, `personalize --low-memory --set sample_images=0` on a quantized folder: "
            f"**{b['zoodip_whole_process_mib']:.0f} MiB** whole-process peak, {b['ti_over_zoodip_whole_process']:.2f}x "
            f"below fp32 textual inversion in the same run ({link(CURRENT['memory'])}; "
            "`benchmarks/personalization_memory.py --low-memory`).",
            f"- A fresh process holding an int8 UNet + text encoder + VAE encoder and running one 512 px forward: "
            f"{q['int8']['vmhwm_mib'] / 1024:.3f} GiB (int4: {q['int4']['vmhwm_mib'] / 1024:.3f} GiB; "
            f"{link(CURRENT['quantization_memory'])}; `benchmarks/quantization.py`).",
            f"- Quantized files: UNet int8 {st['unet_int8_gib']['value']:.3f} GiB, int4 {st['unet_int4_gib']['value']:.3f} "
            f"GiB; the whole int8 pipeline {st['pipeline_int8_gib']['value']:.3f} GiB "
            f"({link(CURRENT['quantization_storage'])}).", ""]


def quantization_section() -> list[str]:
    rel = CURRENT["quantization_quality"]
    q = load(rel)["quality"]
    s = q["settings"]
    attrs = ["class", "colour", "background", "position", "size"]
    out = ["## Quantization quality on the embedded model", "",
           f"{q['setup']} ({link(rel)}; `benchmarks/quantization.py --quality`). Prompt accuracy is the share of "
           "named attributes the world evaluator reads back; the drop is in points against fp32.", "",
           "| weights | prompt acc. | drop (points) | " + " | ".join(attrs) + " |", "|---|---|---|" + "---|" * len(attrs)]
    for name, r in s.items():
        drop = "-" if name == "fp32" else f"{q['drop_points'][name]:.2f}"
        out.append(f"| {name} | {f3(r['prompt_accuracy'])} | {drop} | " + " | ".join(f3(r[a]) for a in attrs) + " |")
    return out + [""]


def stock_section() -> list[str]:
    rel = CURRENT["stock_pipeline"]
    d = load(rel)
    m = d["mean"]
    n_ok = sum(bool(s["renders_subject"]) for s in d["subjects"].values())
    return ["## A ZOODiP token in a stock diffusers pipeline", "",
            f"`{d['pipeline']}` with no quantdream code, {d['prompts']} prompts x {d['images_per_prompt']} images, "
            f"{d['steps']} steps, guidance {d['guidance']} ({link(rel)}; `benchmarks/stock_pipeline.py`): world CLIP-I "
            f"{f3(m['token']['world_clip_i'])} with the learned token against {f3(m['init_word']['world_clip_i'])} with "
            f"the init word; the token renders its subject better than the init word on {n_ok} of "
            f"{len(d['subjects'])} subjects.", ""]


def subject_fidelity_section() -> list[str]:
    rel = CURRENT["subject_fidelity"]
    d = load(rel)
    fl, ce, c = d["floor"], d["ceiling"], d["cases"]
    return ["## Subject fidelity: floor and ceiling", "",
            f"Subject attribute accuracy (body colour, print, print colour, shape against the subject's own item; "
            f"`benchmarks/subject_fidelity.py`, {link(rel)}), on the {len(d['subjects'])} example subjects, every prompt x "
            f"{d['images_per_prompt']} images, model `{d['model']}`:", "",
            "| | world CLIP-I | subject attribute accuracy |", "|---|---|---|",
            f"| floor: the class word alone | {f3(fl['world_clip_i'])} | {f3(fl['subject_attr_acc'])} |",
            f"| ceiling: the subject's photos among themselves | {f3(ce['world_clip_i'])} | "
            f"{f3(ce['subject_attr_acc'])} |", "",
            "Hand-made renders, subject attribute accuracy: the photos " + f3(c["photos"]) + ", another item of the class "
            + f3(c["other_item"]) + ", the wrong print " + f3(c["wrong_print"]) + ", the wrong colour "
            + f3(c["wrong_colour"]) + ", the class word " + f3(c["class_word"]) + ".", ""]


def sdxl_section() -> list[str]:
    out = ["## SDXL memory (1024 px, random weights, CPU, low-memory mode)", "",
           "| method | UNet | whole-process peak | training peak | run |", "|---|---|---|---|---|"]
    for rel in (CURRENT["sdxl_memory_int8"], CURRENT["sdxl_memory_int4"]):
        for r in load(rel)["rows"]:
            out.append(f"| {METHOD_NAMES[r['method']]} | {r['weights']} | {r['whole_process_peak_mib']:.0f} MiB | "
                       f"{r['training_peak']['vmhwm_mib']:.0f} MiB | {link(rel)} |")
    return out + [""]


def gpu_section() -> list[str]:
    rel = CURRENT["gpu_check"]
    d = load(rel)
    gpu = d["host"]["nvidia_smi"][0].split(",")[0]
    out = [f"## On a GPU ({gpu})", "",
           f"`scripts/gpu_check.sh`, {d['settings']['steps']} steps a run, dtype auto (float16), {link(rel)}; rows that "
           f"ran:", "", "| model | method | CUDA max allocated | process total | s/step |", "|---|---|---|---|---|"]
    for r in d["runs"]:
        if r["status"] == "ok":
            out.append(f"| {r['model']} | {METHOD_NAMES[r['method']]} ({r['weights']}) | "
                       f"{r['cuda_max_allocated_mib']:.0f} MiB | {r['process_total_mib']:.0f} MiB | "
                       f"{r['seconds_per_step']:.3f} |")
    s = d["summary"]
    return out + ["", f"{s['ok']} ok, {s['failed']} failed, {s['skipped']} skipped, {s['not run (budget)']} not run "
                      f"(budget).", ""]


def pairs_note(dist: dict) -> str:
    """'; the median of K pairs, from A to B' when the run repeated its speed pairs."""
    pairs = [p["speedup"] for p in dist.get("speedup_pairs", [])]
    return f"; the median of {len(pairs)} pairs, {min(pairs):.2f} to {max(pairs):.2f}" if len(pairs) > 1 else ""


def scaling_section() -> list[str]:
    dist, batch = load(CURRENT["distributed"]), load(CURRENT["batch"])
    same = ", ".join(m for m, ok in dist["bit_identical"].items() if ok)
    out = ["## Time to a token", "",
           f"- ZOODiP across processes ({link(CURRENT['distributed'])}; `benchmarks/distributed.py`): bit-identical "
           f"tokens with 2 ranks for {same}; speedup with 2 ranks {dist['speedup_2ranks']:.2f}x (n = 8, embedded, 1 thread "
           f"a rank{pairs_note(dist)}); {dist['bytes_per_step']:.0f} bytes a step; the time plan's ETA off by "
           f"{100 * dist['eta_error']:+.1f}% on a 200-step run.",
           f"- Many jobs on Ray ({link(CURRENT['batch'])}; `benchmarks/batch.py`): {batch['jobs']} jobs of {batch['steps']} steps on 2 workers "
           f"{batch['speedup']:.2f}x faster than one after the other; a killed job resumed from step "
           f"{batch['kill_retry']['resumed_from'][-1]}, and every job finished: {'yes' if batch['all_ok'] else 'no'}.", "",
           "Correlation of ZOODiP's finite differences with float64 ones (`quantdream bench zo-noise`):", "",
           "| model | dtype | mu = 1e-3 | 1e-2 | 1e-1 |", "|---|---|---|---|---|"]
    for rel in (CURRENT["zo_noise_embedded"], CURRENT["zo_noise_sd15"], CURRENT["zo_noise_sd15_cuda"]):
        d = load(rel)
        by = {}
        for r in d["rows"]:
            by.setdefault(r["dtype"], {})[r["mu"]] = r["correlation"]
        where = f", {d['gpu']}" if d.get("gpu") else ""
        for dtype, row in by.items():
            out.append(f"| {d['model']} ({d['resolution']} px{where}) | {dtype} | "
                       + " | ".join(f3(row.get(mu)) for mu in (1e-3, 1e-2, 1e-1)) + " |")
    return out + [""]


def history_section() -> list[str]:
    out = ["## Superseded figures", "",
           "Earlier runs kept in benchmarks/results/ whose figures the tables above replace.", "",
           "| run | what | figure then | replaced because |", "|---|---|---|---|"]
    for rel, what, kind, why in HISTORY:
        out.append(f"| {link(rel)} | {what} | {headline(rel, kind)} | {why} |")
    return out + [""]


def render() -> str:
    lines = ["# Results", "",
             "<!-- generated by benchmarks/results_page.py from the JSONs in benchmarks/results/; do not edit -->", "",
             "Quality figures come from the embedded model and its world evaluator (world CLIP, EfficientNet-Lite0 as the "
             "DINO stand-in, the attribute reader's prompt accuracy); memory and speed figures for SD-1.5 come from that "
             "architecture built with random weights. Quality on real Stable Diffusion checkpoints was not measured (no "
             "weights where this was built). How to run each benchmark: "
             "[benchmarks/results/README.md](../benchmarks/results/README.md).", ""]
    for section in (personalization_section, subject_fidelity_section, comparison_section, memory_section,
                    sdxl_section, quantization_section, stock_section, gpu_section, scaling_section, history_section):
        lines += section()
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/results.md is not what the JSONs give")
    a = ap.parse_args(argv)
    text = render()
    if a.check:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run python benchmarks/results_page.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
