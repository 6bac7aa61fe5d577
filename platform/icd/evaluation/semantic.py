"""Production editing metrics on real photos (COCO / PIE-Bench style pairs), through transformers:

- ``clip_t``: cosine similarity between the CLIP embeddings of the edited image and of the
  target prompt (does the edit say what was asked?);
- ``dino``: cosine similarity between the DINOv2 [CLS] embeddings of the source and the
  edited image (is the picture's structure kept?).

The pairs come from a CSV with columns ``image`` (a local path or s3:// URI, relative paths
resolved against the CSV's folder), ``source_prompt`` and ``target_prompt``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MODEL = "openai/clip-vit-large-patch14"
DINO_MODEL = "facebook/dinov2-base"


@dataclass(frozen=True)
class EditPair:
    image: str
    source_prompt: str
    target_prompt: str


def read_pairs(path: str | Path) -> list[EditPair]:
    """Rows of an edit-pairs CSV; a missing column or an empty prompt is an error naming the row."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"image", "source_prompt", "target_prompt"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected image, source_prompt, target_prompt")
        pairs = []
        for line, row in enumerate(reader, start=2):
            if not row["source_prompt"].strip() or not row["target_prompt"].strip():
                raise ValueError(f"{path} line {line}: empty source_prompt or target_prompt")
            image = row["image"].strip()
            if not image.startswith("s3://") and not Path(image).is_absolute():
                image = str(path.parent / image)
            pairs.append(EditPair(image, row["source_prompt"].strip(), row["target_prompt"].strip()))
    return pairs


def load_picture(uri: str, settings=None) -> Image.Image:
    from icd.storage import filesystem_for

    fs, path = filesystem_for(uri, settings)
    with fs.open_input_stream(path) as f:
        return Image.open(io.BytesIO(f.read())).convert("RGB")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


class ClipTextSimilarity:
    """CLIP-T: cos(CLIP image embedding, CLIP text embedding)."""

    def __init__(self, model=None, image_processor=None, tokenizer=None, model_id: str = CLIP_MODEL):
        if model is None:
            from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

            model = CLIPModel.from_pretrained(model_id, use_safetensors=True)
            image_processor = CLIPImageProcessor.from_pretrained(model_id)
            tokenizer = CLIPTokenizer.from_pretrained(model_id)
        self.model, self.image_processor, self.tokenizer = model.eval(), image_processor, tokenizer

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], texts: list[str]) -> np.ndarray:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        ids = self.tokenizer(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
        out = self.model(input_ids=ids, pixel_values=pixels)
        return _cosine(out.image_embeds, out.text_embeds).numpy()


class DinoSimilarity:
    """DINOv2 structure similarity: cos of the [CLS] (pooled) embeddings of two images."""

    def __init__(self, model=None, image_processor=None, model_id: str = DINO_MODEL):
        if model is None:
            from transformers import AutoImageProcessor, AutoModel

            model = AutoModel.from_pretrained(model_id, use_safetensors=True)
            image_processor = AutoImageProcessor.from_pretrained(model_id)
        self.model, self.image_processor = model.eval(), image_processor

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return self.model(pixel_values=pixels).pooler_output

    def __call__(self, images: list[Image.Image], references: list[Image.Image]) -> np.ndarray:
        return _cosine(self.embed(images), self.embed(references)).numpy()


def semantic_metrics(edit, pairs: list[EditPair], clip: ClipTextSimilarity, dino: DinoSimilarity,
                     batch_size: int = 8, settings=None) -> dict[str, float]:
    """Mean CLIP-T and DINO over the pairs; ``edit(images, sources, targets) -> images`` (PIL, any size)."""
    clip_t, structure = [], []
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo:lo + batch_size]
        sources = [load_picture(p.image, settings) for p in chunk]
        edited = edit(sources, [p.source_prompt for p in chunk], [p.target_prompt for p in chunk])
        clip_t.extend(clip(edited, [p.target_prompt for p in chunk]))
        structure.extend(dino(edited, sources))
    return {"clip_t": float(np.mean(clip_t)), "dino": float(np.mean(structure)), "pairs": len(pairs)}
