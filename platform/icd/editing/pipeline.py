"""The edit pipeline on pictures: any size in, the same size out; what the registry model and Serve call.

Images are resized (not cropped) to the model's square resolution, edited in latent space,
and resized back to their own size, so nothing of the picture is cut away.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from icd.config import EditingConfig, ServingConfig
from icd.diffusion import samplers
from icd.diffusion.boundaries import Boundaries
from icd.editing.guided import GuidedOptions
from icd.editing.modes import MODES, edit
from icd.editing.p2p import P2POptions
from icd.models.bundle import ModelBundle
from icd.models.fused import FusedBundle, bundle_memory, fuse_directions


@dataclass
class PipelineResult:
    images: list[Image.Image]
    nfe: int


def to_model_input(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """PIL images (any mode and size) -> (N, 3, R, R) in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB").resize((resolution, resolution), Image.BICUBIC), dtype=np.float32)
              for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_pictures(images: torch.Tensor, sizes: list[tuple[int, int]]) -> list[Image.Image]:
    """(N, 3, R, R) in [-1, 1] -> PIL images resized back to ``sizes`` ((width, height) each)."""
    arrays = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a).resize(size, Image.BICUBIC) if a.shape[1::-1] != size else Image.fromarray(a)
            for a, size in zip(arrays, sizes)]


def inference_placement(mixed_precision: str) -> tuple[str, torch.dtype]:
    """Where a served model runs: on the GPU in the config's half precision when one is visible, else CPU fp32."""
    if not torch.cuda.is_available():
        return "cpu", torch.float32
    return "cuda", {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


class EditPipeline:
    def __init__(self, bundle: ModelBundle, boundaries: Boundaries, editing: EditingConfig, resolution: int):
        self.bundle, self.boundaries, self.editing, self.resolution = bundle, boundaries, editing, resolution

    @classmethod
    def from_manifest(cls, manifest: dict, editing: EditingConfig, resolution: int, device: str = "cpu",
                      settings=None, dtype: torch.dtype = torch.float32,
                      serving: ServingConfig | None = None) -> "EditPipeline":
        """A stage output's pipeline: the training form, or with ``serving`` the served form (`for_serving`)."""
        from icd.train.stages import load_stage_bundle

        bundle = load_stage_bundle(manifest, device=device, dtype=dtype, settings=settings)
        boundaries = Boundaries(tuple(manifest["boundaries"]["reverse"]), tuple(manifest["boundaries"]["forward"]))
        pipeline = cls(bundle, boundaries, editing, resolution)
        return pipeline.for_serving(serving) if serving is not None else pipeline

    def for_serving(self, serving: ServingConfig) -> "EditPipeline":
        """This pipeline as a replica runs it: adapters fused per direction, a prompt cache, optionally compiled.

        Compiled UNets are warmed up here (batch 1 and a full batch), so no request pays for compilation.
        """
        bundle = fuse_directions(self.bundle) if serving.fuse_adapters else self.bundle
        bundle.prompt_cache_size = serving.prompt_cache_size
        pipeline = EditPipeline(bundle, self.boundaries, self.editing, self.resolution)
        if serving.compile != "off":
            unets = bundle.directions.values() if isinstance(bundle, FusedBundle) else [bundle.unet]
            for unet in unets:
                unet.compile(mode=serving.compile)
            pipeline.warm_up()
        return pipeline

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Edit blank images once per batch size (compilation, allocator and kernel caches happen here)."""
        for n in batch_sizes:
            blank = [Image.new("RGB", (self.resolution, self.resolution))] * n
            inverted = invert_batch(self, blank, [""] * n, list(range(n)))
            decode_batch(self, inverted.latents, [""] * n, [self.editing.guidance] * n, [self.editing.tau] * n)

    def memory(self) -> dict[str, int]:
        """Bytes of weights this pipeline holds, by component (two UNets when fused); counted once."""
        if "_memory" not in self.__dict__:
            self._memory = bundle_memory(self.bundle)
        return self._memory

    def edit(self, images: list[Image.Image], source_prompts: list[str], target_prompts: list[str],
             guidance=None, tau: float | None = None, mode: str | None = None, seed: int = 0) -> PipelineResult:
        """Invert with the source prompts, decode with the targets (defaults: the config's editing section)."""
        mode = mode or self.editing.mode
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        if not len(images) == len(source_prompts) == len(target_prompts):
            raise ValueError(f"{len(images)} images, {len(source_prompts)} source and {len(target_prompts)} "
                             "target prompts: expected one of each per image")
        sizes = [im.size for im in images]
        pixels = to_model_input(images, self.resolution)
        # Guided editing differentiates energies through the UNet; the other modes need no autograd at all.
        with contextlib.nullcontext() if mode == "guided" else torch.inference_mode():
            out = edit(self.bundle, list(source_prompts), list(target_prompts), self.boundaries, mode=mode,
                       images=pixels, guidance=self.editing.guidance if guidance is None else guidance,
                       tau=self.editing.tau if tau is None else tau, generator=torch.Generator().manual_seed(seed),
                       p2p=P2POptions.from_config(self.editing), guided=GuidedOptions.from_config(self.editing))
        return PipelineResult(to_pictures(out.images, sizes), out.nfe)

    @torch.inference_mode()
    def reconstruct(self, images: list[Image.Image], prompts: list[str], seed: int = 0) -> PipelineResult:
        sizes = [im.size for im in images]
        out = samplers.reconstruct(self.bundle, list(prompts), self.boundaries,
                                   images=to_model_input(images, self.resolution),
                                   generator=torch.Generator().manual_seed(seed))
        return PipelineResult(to_pictures(out.images, sizes), out.nfe)



# --- batched calls for serving: one UNet pass per step for the whole batch -----------------------

def per_sample_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """Noise whose i-th sample depends only on seeds[i]: a request's result does not depend on its batch."""
    return torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.inference_mode()
def invert_batch(pipeline: EditPipeline, images: list[Image.Image], prompts: list[str],
                 seeds: list[int]) -> samplers.SampleOutput:
    """Images -> noise latents at T - 1 with the forward model (unguided)."""
    bundle = pipeline.bundle
    x0 = bundle.encode_images(to_model_input(images, pipeline.resolution).to(bundle.device))
    noise = per_sample_noise(tuple(x0.shape), seeds).to(x0)
    return samplers.consistency_encode(bundle, x0, bundle.encode_prompts(prompts), pipeline.boundaries, noise=noise)


@torch.inference_mode()
def decode_batch(pipeline: EditPipeline, latents: torch.Tensor, prompts: list[str], guidances: list[float],
                 taus: list[float | None]) -> samplers.SampleOutput:
    """Noise latents -> images with the reverse model; each sample with its own w and tau."""
    from icd.diffusion.guidance import batched_guidance

    bundle, boundaries = pipeline.bundle, pipeline.boundaries
    ws = batched_guidance(boundaries.reverse_timesteps, guidances, taus, boundaries.num_train_timesteps)
    out = samplers.consistency_decode(bundle, latents.to(bundle.device, bundle.dtype), bundle.encode_prompts(prompts),
                                      boundaries, ws)
    out.images = bundle.decode_latents(out.latents)
    return out
