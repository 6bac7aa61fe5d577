"""Stable Diffusion's CLIP tokenizer, built offline from ``open_clip_torch``'s BPE vocabulary.

SD 1.x uses OpenAI CLIP's byte-level BPE (49,408 tokens: 256 byte symbols, their
end-of-word forms, 48,894 merges, then <|startoftext|> = 49406 and <|endoftext|> = 49407).
``open_clip_torch`` ships the merges as ``bpe_simple_vocab_16e6.txt.gz``; from it we write
the ``vocab.json`` + ``merges.txt`` pair that ``transformers.CLIPTokenizer`` reads, so no hub
download is needed and the ids equal SD's.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

MODEL_MAX_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2  # the merges OpenAI CLIP uses (the file holds more)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _bpe_file() -> Path:
    import importlib.util

    # Locate the wheel's file without importing open_clip (which imports torch and timm: ~5 s).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed; it ships the CLIP vocabulary")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: reinstall open_clip_torch, which ships the CLIP vocabulary")
    return path


def write_clip_tokenizer_files(directory: str | Path) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer config SD uses into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                          encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "do_lower_case": True,
    }, indent=1))
    (directory / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }, indent=1))
    return directory


@lru_cache(maxsize=1)
def _cached_dir() -> Path:
    import tempfile

    return write_clip_tokenizer_files(Path(tempfile.mkdtemp(prefix="icd-clip-tokenizer-")))


def offline_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """SD's CLIPTokenizer (pad with <|endoftext|> to 77 tokens), built without any download.

    SDXL's second tokenizer is the same BPE padding with "!" (``pad_token="!"``, id 0).
    """
    return CLIPTokenizer.from_pretrained(str(_cached_dir()), pad_token=pad_token)
