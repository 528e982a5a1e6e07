"""A CLIP tokenizer folder built offline from the BPE merges that open_clip ships.

open_clip carries OpenAI CLIP's byte-level BPE table (`bpe_simple_vocab_16e6.txt.gz`). The vocabulary of
SD 1.x's tokenizer is fully determined by that table, so a transformers `CLIPTokenizer` built from it gives
the same ids as the hub's `openai/clip-vit-large-patch14` tokenizer without any download.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

# CLIP's vocabulary: 256 byte symbols, the same with an end-of-word mark, the merges, 2 special tokens.
VOCAB_SIZE = 49408
_N_MERGES = VOCAB_SIZE - 256 * 2 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte 0..255 to a printable unicode character (GPT-2/CLIP byte-level BPE convention).

    Printable Latin-1 bytes map to themselves; the others are shifted above 255 so no symbol is a
    whitespace or control character.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def _bpe_table_path() -> Path:
    import open_clip  # imported lazily: only the build needs it

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's BPE table is missing: {path}")
    return path


def clip_vocab_and_merges(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """Return CLIP's token->id vocabulary and its merge lines ("a b") from open_clip's BPE table."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    # line 0 is a version header; CLIP uses exactly the first _N_MERGES merges after it
    merges = lines[1 : 1 + _N_MERGES]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(tokens) != VOCAB_SIZE:
        raise ValueError(f"unexpected CLIP vocabulary size {len(tokens)} (expected {VOCAB_SIZE})")
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_clip_tokenizer(dir: Path) -> Path:
    """Write a transformers `CLIPTokenizer` folder to `dir` (created) and return `dir`.

    The folder is loadable with `CLIPTokenizer.from_pretrained(dir)` and usable as the `tokenizer`
    sub-folder of a diffusers Stable Diffusion pipeline. Deterministic: same bytes on every call.
    """
    from transformers import CLIPTokenizer

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(_bpe_table_path())
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(m.split()) for m in merges],
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        # without a finite maximum, padding to max_length fails ("int too big to convert")
        model_max_length=MODEL_MAX_LENGTH,
    )
    tokenizer.save_pretrained(str(dir))
    # transformers 4.x's slow CLIPTokenizer (kohya's pinned version) reads these two files instead
    (dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return dir
