"""Build the embedded model's tokenizer: a small vocabulary in CLIP's format cut from CLIP's real BPE.

Why small: CLIP's 49,408 x 768 token table alone is 152 MB in fp32, past the 40 MB budget of the
embedded model. We keep CLIP's 512 byte-level symbols, the ``top_k`` most frequent merges, and every
merge that CLIP applies to the words the world, the TI templates and the DreamBooth prompts use.
Keeping every merge a word's tokenization applies (and dropping only others) reproduces CLIP's
pieces for that word exactly, since BPE always applies the lowest-ranked merge present.

Source: ``open_clip/bpe_simple_vocab_16e6.txt.gz`` from the ``open_clip_torch`` wheel
(``python -m quantdream.models.vocab --bpe FILE --out DIR``).
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
from functools import lru_cache
from pathlib import Path

N_MERGES = 48894  # CLIP uses lines 1..48894 of the BPE file


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable-unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def bpe_word(word: str, ranks: dict[tuple[str, str], int]) -> tuple[list[str], list[tuple[str, str]]]:
    """CLIP's BPE of one pre-tokenized word; returns (pieces, merges applied)."""
    symbols = [bytes_to_unicode()[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    used = []
    while len(symbols) > 1:
        pairs = [(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)]
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        used.append(best)
        out, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                out.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols, used


PRETOKEN = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def corpus_words() -> list[str]:
    from ..data.templates import OBJECT_TEMPLATES, STYLE_TEMPLATES
    from ..world.captions import vocabulary_words
    text = " ".join(OBJECT_TEMPLATES + STYLE_TEMPLATES + vocabulary_words())
    text += " " + EXTRA_TEXT
    return sorted(set(PRETOKEN.findall(text.lower())))


# DreamBooth prompt words and common words a user may type
EXTRA_TEXT = """
in the jungle snow on beach cobblestone street top of pink fabric wooden floor with city background
mountain blue house purple rug forest wheat field tree and autumn leaves eiffel tower floating water
ocean milk green grass sunflowers around it mirror sidewalk crowded dirt road white rug red shiny wet
cube shaped wearing hat santa rainbow scarf black monocle chef outfit firefighter police pink glasses
yellow shirt wizard dog cat backpack stuffed animal bowl can candle clock sneaker toy boot cartoon
teapot vase sks style painting picture image photo drawing sketch art of by at from for is are this
that my your his her their one two three small large big tiny huge left right center centre middle
bottom top corner next beside near under over above below behind front new old light dark bright
gray grey cyan teal gold silver orange brown
"""


def build(bpe_path: str | Path, out_dir: str | Path, top_k: int = 1000, max_length: int = 32) -> int:
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")[1:N_MERGES + 1]
    merges = [tuple(l.split()) for l in lines]
    ranks = {m: i for i, m in enumerate(merges)}
    keep = set(range(top_k))
    for w in corpus_words():
        for m in bpe_word(w, ranks)[1]:
            keep.add(ranks[m])
    kept = [merges[i] for i in sorted(keep)]
    base = list(bytes_to_unicode().values())
    vocab_list = base + [b + "</w>" for b in base] + ["".join(m) for m in kept] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in kept) + "\n", encoding="utf-8")
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=max_length,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(str(out))
    # the cut vocabulary must split every corpus word exactly as CLIP does
    for w in corpus_words():
        want = bpe_word(w, ranks)[0]
        got = tok.convert_ids_to_tokens(tok(w, add_special_tokens=False).input_ids)
        if got != want:
            raise RuntimeError(f"tokenization of {w!r} differs from CLIP: {got} vs {want}")
    return len(vocab)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bpe", required=True, help="open_clip/bpe_simple_vocab_16e6.txt.gz")
    ap.add_argument("--out", required=True, help="tokenizer folder to write")
    ap.add_argument("--top-k", type=int, default=1000, help="most frequent CLIP merges to keep besides the corpus")
    a = ap.parse_args()
    print(f"vocabulary size {build(a.bpe, a.out, a.top_k)}")


if __name__ == "__main__":
    main()
