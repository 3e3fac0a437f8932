"""Where learned tokens moved from their init word, against textual inversion's move. Prints one JSON object.

    python benchmarks/studies/token_geometry.py --ti 'RUNS/{subject}/ti' \\
        --variant 'zoodip=RUNS/{subject}/zoodip' --variant 'zoodip-fast=RUNS/{subject}/zoodip-fast'

For each subject (examples/subjects, default all) and run folder (``{subject}`` is replaced by the subject's
name): the change of the learned row from the class word's embedding (the init word of every example subject),
its length, and the cosine between it and textual inversion's change on the same subject (TI follows the exact
gradient; a random direction in 768-d has cosine ~0.04). Output: per variant the mean over subjects, and every
subject's numbers. No model is run: only the embedded model's vocabulary is read.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def learned_row(run: Path):
    from safetensors.torch import load_file
    f = run / "learned_embeds.safetensors"
    if not f.is_file():
        raise SystemExit(f"no {f}")
    rows = list(load_file(str(f)).values())
    return rows[0].float().reshape(-1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ti", required=True, help="TI run folders, with {subject}")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=PATTERN",
                    help="run folders, with {subject}")
    ap.add_argument("--subjects", default="", help="comma-separated names under examples/subjects (default all)")
    ap.add_argument("--model", default="tiny")
    a = ap.parse_args(argv)
    import torch
    from quantdream.models.load import load_pipeline
    from quantdream.world.subjects import load_subject
    variants = dict(v.split("=", 1) for v in a.variant if "=" in v)
    if len(variants) != len(a.variant):
        raise SystemExit("--variant takes NAME=PATTERN")
    root = ROOT / "examples" / "subjects"
    names = [s for s in a.subjects.split(",") if s] or sorted(d.name for d in root.iterdir()
                                                                 if (d / "subject.json").is_file())
    pipe = load_pipeline(a.model)
    vocab = pipe.text_encoder.get_input_embeddings().weight.detach().float()
    init = {s: vocab[pipe.tokenizer(load_subject(root / s)["class_word"], add_special_tokens=False).input_ids[0]]
            for s in names}
    rows = []
    for s in names:
        d_ti = learned_row(Path(a.ti.format(subject=s))) - init[s]
        for name, pattern in {"ti": a.ti, **variants}.items():
            d = learned_row(Path(pattern.format(subject=s))) - init[s]
            rows.append({"variant": name, "subject": s, "change_norm": d.norm().item(),
                         "token_norm": (init[s] + d).norm().item(),
                         "cosine_with_ti_change": torch.nn.functional.cosine_similarity(d, d_ti, dim=0).item()})
    keys = ("change_norm", "token_norm", "cosine_with_ti_change")
    means = {v: {k: sum(r[k] for r in rows if r["variant"] == v) / len(names) for k in keys} for v in ["ti", *variants]}
    print(json.dumps({"subjects": names, "init_word_norm": sum(e.norm().item() for e in init.values()) / len(names),
                      "variants": means, "per_subject": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
