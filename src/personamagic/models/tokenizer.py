"""The Stable Diffusion CLIP tokenizer built offline from the BPE vocabulary shipped with the package
(`personamagic/data/clip-bpe/`, from open_clip, MIT): the tokenizer of the `tiny` models and of tests."""

from __future__ import annotations

import functools
import gzip
import json
import tempfile
from importlib import resources
from pathlib import Path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table (same order as CLIP's tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@functools.lru_cache(maxsize=1)
def _clip_bpe_folder() -> str:
    """Write a tokenizer folder (vocab.json, merges.txt) derived from the BPE file, once per process."""
    source = resources.files("personamagic") / "data" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(source.read_bytes()).decode("utf-8").split("\n")
    # CLIP keeps 49152 - 256 - 2 merges: line 0 is a header.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(merge) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="personamagic-clip-bpe-"))
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    config = {"model_max_length": 77, "pad_token": "<|endoftext|>", "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(folder)


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The Stable Diffusion CLIP tokenizer (49,408 tokens, max length 77), built offline. SD-1.x and SDXL's
    first tokenizer pad with the end-of-text token; SDXL's second pads with "!" (OpenCLIP's id 0)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(_clip_bpe_folder(), pad_token=pad_token)

