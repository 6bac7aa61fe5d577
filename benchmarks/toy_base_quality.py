"""Quality of the shipped toy base model on held-out shapes-world images, with a picture to look at.

    python benchmarks/toy_base_quality.py [--images 512] [--generations 256] [--edits 128] [--guidance 7]

Every figure is read from pixels by the judges of ``icd.evaluation.shapes`` (colour by palette
distance, shape masks as the renderer defines them, shapes by fitting the renderer's templates):

- vae_psnr_db: mean per-image PSNR of VAE round trips (encode -> decode) (goal >= 32);
- vae_shape_iou: IoU of the round trip's shape mask with the source's (goal >= 0.9);
- teacher_recon_psnr_db: mean per-image PSNR of DDIM-50 inversion + DDIM-50 decoding, unguided,
  with the source caption (goal >= 30);
- caption_accuracy / shape_accuracy: DDIM-50 generations at code w (classical CFG w + 1, two
  passes per step) whose shape colour / shape is the caption's (goals >= 0.9 / >= 0.8);
- teacher_inplace_success / teacher_shape_iou: DDIM-50 colour edits (invert with the source
  caption, decode with the target at code w and dynamic CFG tau), the better of the ``switch``
  and ``p2p`` modes at their defaults by in-place success (goals >= 0.7 / >= 0.7).

Writes ``<out>/toy_base_quality.png``: 16 held-out rows of source / VAE round trip / teacher
reconstruction / teacher generation of the source caption / teacher edit (best mode), each
upscaled 4x with nearest-neighbour, the target colour written over the edit column.
Last line: {"vae_psnr_db": ..., "vae_shape_iou": ..., "teacher_recon_psnr_db": ..., "caption_accuracy": ...,
"shape_accuracy": ..., "teacher_inplace_success": ..., "teacher_shape_iou": ...}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from icd.data.shapes import random_sample, sample_specs
from icd.diffusion import samplers
from icd.editing.p2p import P2POptions
from icd.editing.teacher import TEACHER_MODES, ddim_edit
from icd.evaluation.editing import EDIT_METRICS, color_edits, edit_scores, to_uint8_hwc
from icd.evaluation.reconstruction import per_image_psnr
from icd.evaluation.report import generation_metrics
from icd.evaluation.shapes import mask_iou, shape_mask
from icd.models.loading import load_bundle

HELD_OUT_SEED = 2_000_000_000  # never used by jobs/pretrain_toy_base.py
GOALS = {"vae_psnr_db": 32.0, "vae_shape_iou": 0.9, "teacher_recon_psnr_db": 30.0, "caption_accuracy": 0.9,
         "shape_accuracy": 0.8, "teacher_inplace_success": 0.7, "teacher_shape_iou": 0.7}
GRID_ROWS, ZOOM = 16, 4


def held_out(n: int):
    samples = [random_sample(HELD_OUT_SEED + i) for i in range(n)]
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return samples, images


def batched(fn, images: torch.Tensor, *lists, batch: int = 128) -> torch.Tensor:
    """fn(images_chunk, *list_chunks) -> images, over chunks of ``batch``."""
    out = []
    for lo in range(0, len(images), batch):
        out.append(fn(images[lo:lo + batch], *[values[lo:lo + batch] for values in lists]))
    return torch.cat(out)


@torch.no_grad()
def vae_quality(bundle, samples, images) -> tuple[dict, torch.Tensor]:
    recon = batched(lambda x: bundle.decode_latents(bundle.encode_images(x)).clamp(-1, 1), images)
    ious = [mask_iou(shape_mask(r, s.spec.background), s.mask) for r, s in zip(to_uint8_hwc(recon), samples)]
    return {"vae_psnr_db": float(per_image_psnr(recon, images).mean()), "vae_shape_iou": float(np.mean(ious))}, recon


@torch.no_grad()
def teacher_reconstruction(bundle, samples, images, steps: int) -> tuple[float, torch.Tensor]:
    recon = batched(lambda x, caps: samplers.ddim_reconstruct(bundle, list(caps), steps, images=x).images.clamp(-1, 1),
                    images, [s.caption for s in samples])
    return float(per_image_psnr(recon, images).mean()), recon


@torch.no_grad()
def teacher_edits(bundle, samples, images, guidance: float, tau: float, steps: int) -> dict[str, dict]:
    """Each teacher mode's mean edit scores over one colour swap per image, and its edited images."""
    edits = color_edits([s.caption for s in samples], seed=0)
    results = {}
    for mode in TEACHER_MODES:
        start = time.time()
        edited = batched(lambda x, src, tgt: ddim_edit(bundle, list(src), list(tgt), mode, images=x, num_steps=steps,
                                                       guidance=guidance, tau=tau, p2p=P2POptions()).images,
                         images, [e.source_prompt for e in edits], [e.target_prompt for e in edits])
        scores = [edit_scores(s.image, out, e) for s, out, e in zip(samples, to_uint8_hwc(edited), edits)]
        results[mode] = {"metrics": {k: float(np.mean([sc[k] for sc in scores])) for k in EDIT_METRICS},
                         "images": edited, "edits": edits, "seconds": time.time() - start}
    return results


def print_shape_confusion(generated: list[tuple[str, np.ndarray]]) -> None:
    """Which shape the judge reads for each captioned shape (rows: caption; columns: read; "-": none)."""
    from icd.data.shapes import SHAPES, parse_caption
    from icd.evaluation.shapes import read_shape

    counts = {s: dict.fromkeys((*SHAPES, None), 0) for s in SHAPES}
    for caption, image in generated:
        _, shape, background = parse_caption(caption)
        counts[shape][read_shape(image, background)] += 1
    print("shape confusion of the generations (caption -> read):", flush=True)
    for shape, row in counts.items():
        print(f"  {shape:9s}" + "".join(f" {(k or '-')}:{v}" for k, v in row.items()), flush=True)


def picture_grid(columns: dict[str, np.ndarray], notes: list[str], path: Path) -> None:
    """Rows of images (N, H, W, 3) uint8 side by side, zoomed with nearest-neighbour, a header and row notes."""
    from PIL import Image, ImageDraw

    names = list(columns)
    n = min(len(images) for images in columns.values())  # counts below GRID_ROWS give fewer rows
    h, w = columns[names[0]].shape[1:3]
    tile_h, tile_w, header, gap = h * ZOOM, w * ZOOM, 14, 4
    canvas = Image.new("RGB", (len(names) * (tile_w + gap) + 90, header + n * (tile_h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(names):
        draw.text((c * (tile_w + gap) + 2, 1), name, fill=(0, 0, 0))
        for r in range(n):
            tile = Image.fromarray(columns[name][r]).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (c * (tile_w + gap), header + r * (tile_h + gap)))
    for r, note in enumerate(notes[:n]):
        draw.text((len(names) * (tile_w + gap) + 2, header + r * (tile_h + gap) + tile_h // 2 - 10), note,
                  fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", help="model.base to measure (default: the shipped toy model)")
    parser.add_argument("--images", type=int, default=512, help="held-out images for the VAE figures")
    parser.add_argument("--recon", type=int, default=128, help="held-out images for the teacher's reconstruction")
    parser.add_argument("--generations", type=int, default=256)
    parser.add_argument("--edits", type=int, default=128)
    parser.add_argument("--guidance", type=float, default=7.0, help="code w (classical CFG w + 1)")
    parser.add_argument("--tau", type=float, default=0.8, help="dynamic CFG of the edits' decoding")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.model)
    samples, images = held_out(max(args.images, args.recon, args.edits, GRID_ROWS))
    start = time.time()
    result, vae_recon = vae_quality(bundle, samples[:args.images], images[:args.images])
    print(f"VAE on {args.images} held-out images: PSNR {result['vae_psnr_db']:.2f} dB, shape IoU "
          f"{result['vae_shape_iou']:.3f} ({time.time() - start:.0f}s)", flush=True)

    start = time.time()
    result["teacher_recon_psnr_db"], teacher_recon = teacher_reconstruction(
        bundle, samples[:args.recon], images[:args.recon], args.steps)
    print(f"teacher DDIM-{args.steps} reconstruction of {args.recon} images (unguided): "
          f"{result['teacher_recon_psnr_db']:.2f} dB ({time.time() - start:.0f}s)", flush=True)

    start = time.time()
    prompts = {}
    generator = torch.Generator().manual_seed(0)

    generated: list[tuple[str, np.ndarray]] = []

    def generate(captions):
        out = samplers.ddim_generate(bundle, captions, args.steps, args.guidance, generator=generator).images
        prompts.setdefault("grid", out[:GRID_ROWS])
        generated.extend(zip(captions, to_uint8_hwc(out)))
        return out

    # The grid's generations are of the held-out captions; the accuracy is over fresh random captions.
    generate([s.caption for s in samples[:GRID_ROWS]])
    captions = [s.caption for s in sample_specs(np.random.default_rng(0), args.generations)]
    result.update(generation_metrics(generate, captions))
    print(f"{args.generations} DDIM-{args.steps} generations at w={args.guidance:g}: caption (colour) accuracy "
          f"{result['caption_accuracy']:.3f}, shape accuracy {result['shape_accuracy']:.3f} "
          f"({time.time() - start:.0f}s)", flush=True)
    print_shape_confusion(generated[GRID_ROWS:])

    edits = teacher_edits(bundle, samples[:args.edits], images[:args.edits], args.guidance, args.tau, args.steps)
    for mode, r in edits.items():
        m = r["metrics"]
        print(f"teacher DDIM-{args.steps} {mode} colour edits of {args.edits} images (w={args.guidance:g}, "
              f"tau={args.tau:g}): in place {m['inplace_success']:.3f}, shape IoU {m['shape_iou']:.3f}, "
              f"background {m['background_psnr']:.2f} dB, edit success {m['edit_success']:.3f} "
              f"({r['seconds']:.0f}s)", flush=True)
    best = max(edits, key=lambda mode: edits[mode]["metrics"]["inplace_success"])
    result["teacher_inplace_success"] = edits[best]["metrics"]["inplace_success"]
    result["teacher_shape_iou"] = edits[best]["metrics"]["shape_iou"]
    print(f"best teacher edit mode: {best}", flush=True)

    path = args.out / "toy_base_quality.png"
    picture_grid({"source": to_uint8_hwc(images[:GRID_ROWS]), "VAE": to_uint8_hwc(vae_recon[:GRID_ROWS]),
                  "DDIM recon": to_uint8_hwc(teacher_recon[:GRID_ROWS]), "generation": to_uint8_hwc(prompts["grid"]),
                  f"edit ({best})": to_uint8_hwc(edits[best]["images"][:GRID_ROWS])},
                 [f"-> {e.target_color}" for e in edits[best]["edits"][:GRID_ROWS]], path)
    print(f"picture grid: {path}", flush=True)
    for key, goal in GOALS.items():
        print(f"  {key:24s} {result[key]:7.3f}  goal >= {goal:g}  {'met' if result[key] >= goal else 'NOT met'}")
    print(json.dumps({k: round(result[k], 3) for k in GOALS}))


if __name__ == "__main__":
    main()
