"""Example pictures for the web page, so a newcomer has something to edit.

``shapes``: held-out images of the toy preset's shapes world (the first seeds of the eval split,
which training never sees), each with its caption and an edit of one word. ``generate``: what
the served model draws for configured prompts (any preset; the target is given with each prompt).
"""

from __future__ import annotations

import base64
import io

import numpy as np

SOURCES = ("shapes", "generate")


def png_base64(picture) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def shapes_examples(count: int) -> list[dict]:
    """``count`` held-out shapes images: {image (base64 PNG), source_prompt, target_prompt}."""
    from PIL import Image

    from icd.data.shapes import EVAL_SEED_OFFSET, edit_spec, random_sample

    rng = np.random.default_rng(0)  # the same suggested edits on every replica
    examples = []
    for i in range(count):
        sample = random_sample(EVAL_SEED_OFFSET + i)
        target, _ = edit_spec(sample.spec, rng)
        examples.append({"image": png_base64(Image.fromarray(sample.image)), "source_prompt": sample.caption,
                         "target_prompt": target.caption})
    return examples


def check_examples_config(config: dict | None) -> dict:
    """``examples`` of the app's args: {source: shapes, count} or {source: generate, prompts: [{prompt, target}]}."""
    config = dict(config or {"source": "shapes", "count": 6})
    source = config.get("source", "shapes")
    if source not in SOURCES:
        raise ValueError(f"examples.source: expected one of {SOURCES}, got {source!r}")
    if source == "generate":
        prompts = config.get("prompts")
        if not prompts or not all(isinstance(p, dict) and p.get("prompt") and p.get("target") for p in prompts):
            raise ValueError("examples.prompts: expected a list of {prompt: ..., target: ...} for source generate")
    count = config.get("count", 6)
    if not isinstance(count, int) or not 0 <= count <= 32:
        raise ValueError(f"examples.count: expected an integer in [0, 32], got {count!r}")
    return {**config, "source": source, "count": count}
