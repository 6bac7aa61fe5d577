"""One evaluation of a model: reconstruction, editing and generation on held-out shapes images.

Rows of the table: ``ddim50`` (the guidance-distilled teacher: DDIM-50 inversion and
sampling), and each trained consistency model (``icd``, ``cycle``). Columns: latent MSE,
PSNR (the mean of per-image PSNRs, as the papers report; ``psnr_pooled``: of the set's MSE),
LPIPS (``lpips_randvgg`` offline), the colour-edit scores of ``icd.evaluation.editing``
(in-place success, shape IoU, background PSNR, edit success), the caption colour and shape
accuracy of generations, and the UNet passes per reconstruction / edit.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from icd.diffusion import samplers
from icd.diffusion.boundaries import Boundaries
from icd.evaluation.editing import EDIT_METRICS, editing_metrics, to_uint8_hwc
from icd.evaluation.reconstruction import consistency_reconstructor, ddim_reconstructor, reconstruction_metrics
from icd.evaluation.shapes import read_shape, shape_region_color
from icd.models.bundle import ModelBundle

GENERATION_METRICS = ("caption_accuracy", "shape_accuracy")
COLUMNS = ("mse", "psnr", "psnr_pooled", "lpips", *EDIT_METRICS, *GENERATION_METRICS, "reconstruction_nfe", "edit_nfe")
# Reconstruction works on any held-out images; the edit and caption columns need shapes-world
# captions (the target colour is read back from the pixels). Real photos get their editing
# scores from a CSV of edit pairs instead (CLIP-T, DINOv2: icd.evaluation.semantic).
SHAPES_WORLD_COLUMNS = (*EDIT_METRICS, *GENERATION_METRICS, "edit_nfe")


def is_shapes_world(captions: list[str]) -> bool:
    """True when every caption is a shapes-world caption ("a red circle on a blue background")."""
    from icd.data.shapes import parse_caption

    return bool(captions) and all(parse_caption(c) is not None for c in captions)


@torch.no_grad()
def lpips_distance(lpips, bundle: ModelBundle, images: torch.Tensor, reconstructor, captions, batch: int = 64) -> float:
    values = []
    for lo in range(0, len(images), batch):
        chunk = images[lo:lo + batch]
        out = reconstructor(bundle, bundle.encode_images(chunk), list(captions[lo:lo + batch]))
        values.append(lpips(bundle.decode_latents(out.latents).clamp(-1, 1), chunk))
    return float(torch.cat(values).mean())


@torch.no_grad()
def generation_metrics(generate, captions: list[str], batch: int = 64) -> dict[str, float]:
    """Fractions of generations (``generate(prompts) -> images``) whose shape colour (``caption_accuracy``)
    and shape (``shape_accuracy``, by the renderer-template judge) are the caption's."""
    colors, shapes = generation_outcomes(generate, captions, batch)
    if not colors:
        return {"caption_accuracy": float("nan"), "shape_accuracy": float("nan")}
    return {"caption_accuracy": float(np.mean(colors)), "shape_accuracy": float(np.mean(shapes))}


def caption_hits(generate, captions: list[str], batch: int = 64) -> list[bool]:
    """Per shapes-world caption (in order), whether the generation's shape has the caption's colour."""
    return generation_outcomes(generate, captions, batch)[0]


def generation_outcomes(generate, captions: list[str], batch: int = 64) -> tuple[list[bool], list[bool]]:
    """Per parsable caption: (colour right, shape right) of its generation."""
    from icd.data.shapes import parse_caption

    parsed = [(c, parse_caption(c)) for c in captions]
    parsed = [(c, p) for c, p in parsed if p is not None]
    colors, shapes = [], []
    for lo in range(0, len(parsed), batch):
        chunk = parsed[lo:lo + batch]
        images = to_uint8_hwc(generate([c for c, _ in chunk]))
        for image, (_, (color, shape, background)) in zip(images, chunk):
            colors.append(shape_region_color(image, background) == color)
            shapes.append(read_shape(image, background) == shape)
    return [bool(c) for c in colors], [bool(s) for s in shapes]


def caption_accuracy(generate, captions: list[str], batch: int = 64) -> float:
    """Fraction of generations whose shape colour is the caption's."""
    return generation_metrics(generate, captions, batch)["caption_accuracy"]


def evaluate(bundle: ModelBundle, kind: str, images: torch.Tensor, captions: list[str], editing, lpips,
             boundaries: Boundaries | None = None, ddim_steps: int = 50, seed: int = 0) -> dict[str, float]:
    """All columns for one row: ``kind`` is "ddim" (the teacher, adapters off) or "consistency"."""
    w, tau = editing.guidance, editing.tau
    if kind == "ddim":
        reconstructor = ddim_reconstructor(ddim_steps)

        def edit_images(batch, sources, targets):
            context = bundle.encode_prompts(list(sources) + list(targets))
            n = len(batch)
            inverted = samplers.ddim_invert_latents(bundle, bundle.encode_images(batch), context[:n], ddim_steps)
            out = samplers.ddim_sample(bundle, inverted.latents, context[n:], ddim_steps, w, tau,
                                       bundle.encode_prompts([""] * n))
            nfe["edit"] = inverted.nfe + out.nfe
            return bundle.decode_latents(out.latents)

        def generate(prompts):
            return samplers.ddim_generate(bundle, prompts, ddim_steps, w, generator=torch.Generator().manual_seed(seed)).images
    elif kind == "consistency":
        reconstructor = consistency_reconstructor(boundaries, seed=seed)

        def edit_images(batch, sources, targets):
            out = samplers.edit(bundle, sources, targets, boundaries, images=batch, guidance=w, tau=tau,
                                generator=torch.Generator().manual_seed(seed))
            nfe["edit"] = out.nfe
            return out.images

        def generate(prompts):
            return samplers.generate(bundle, prompts, boundaries, w, tau,
                                     generator=torch.Generator().manual_seed(seed)).images
    else:
        raise ValueError(f"kind must be 'ddim' or 'consistency', got {kind!r}")
    nfe: dict[str, int] = {}
    recon = reconstruction_metrics(bundle, images, captions, reconstructor)
    row = {"mse": recon["mse"], "psnr": recon["psnr"], "psnr_pooled": recon["psnr_pooled"],
           "lpips": lpips_distance(lpips, bundle, images, reconstructor, captions),
           "reconstruction_nfe": recon["nfe"]}
    if not is_shapes_world(captions):
        return row
    with torch.no_grad():
        edits = editing_metrics(edit_images, images, captions)
    return {**row, **{k: edits[k] for k in EDIT_METRICS}, **generation_metrics(generate, captions),
            "edit_nfe": nfe["edit"]}


def table_columns(rows: dict[str, dict[str, float]]) -> list[str]:
    """The COLUMNS some row has, in table order."""
    return [c for c in COLUMNS if any(c in metrics for metrics in rows.values())]


def table_csv(rows: dict[str, dict[str, float]], lpips_name: str) -> str:
    columns = table_columns(rows)
    header = ["model", *[lpips_name if c == "lpips" else c for c in columns]]
    lines = [",".join(header)]
    for name, metrics in rows.items():
        lines.append(",".join([name, *[f"{metrics[c]:.6g}" if c in metrics else "" for c in columns]]))
    return "\n".join(lines) + "\n"


def table_png(rows: dict[str, dict[str, float]], lpips_name: str) -> bytes:
    """The table rendered as an image (for the MLflow UI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = table_columns(rows)
    columns = [lpips_name if c == "lpips" else c for c in names]
    cells = [[f"{metrics[c]:.4g}" if c in metrics else "-" for c in names] for metrics in rows.values()]
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 1.5, 0.45 * len(rows) + 0.8))
    ax.axis("off")
    table = ax.table(cellText=cells, rowLabels=list(rows), colLabels=columns, loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
