"""Where the paper table's reconstruction errors come from, for the models `paper_table.py` trained.

    eval "$(icd stack env)"
    python benchmarks/paper_table.py                  # trains (or reuses) the models
    python benchmarks/reconstruction_breakdown.py     # same arguments; trains nothing

For DDIM-4 and each 4-step model (icd4, icd4_lf, icd4_lf_lr, cycle), on the same held-out
images: pixel PSNR (the table's number: the mean of per-image PSNRs), the PSNR of the set's MSE,
the median per-image PSNR, how many images fall under 12 dB and how many of those come back
with another background colour (read from the corners). For the consistency models also each
half against the teacher: their encoder followed by DDIM-50 decoding, and the consistency
teacher's own ODE up to 999 (the image noised to 19, then 49 DDIM steps 39, ..., 999: the marginal
the decoders train on) followed by their decoder; for DDIM-4's row, that ODE followed by the
teacher's own single jumps between
the decoder's boundaries (where the decoders start). Those PSNRs are per-image means too. And
the standard deviation of the encoder's latents at 999 (the diffusion marginal's is ~1.0), and
the PSNR and background flips when the decoder's first segment (999 -> 779) is replaced by the
teacher's DDIM steps (20 apart) from the encoder's latents. With ``--checkpoints``, also the
latent MSE, PSNR and flips of 4 + Lf and 4 + Lf + Lr at each checkpoint their runs kept (row
key "checkpoints": {step: {"mse": ..., "psnr": ..., "background_flips": ...}}). The table's guided
rows (4 + Lf + Lr's inversion decoded at w = 7, without and with dynamic CFG) get the same PSNRs and
flip counts: on the toy every caption names the background's colour, so guidance can repair a flip.
Last line: {"<row>": {"psnr": ..., "psnr_pooled": ..., "median_psnr": ..., "under_12db": ...,
"background_flips": ..., "encoder_then_ddim50": ..., "inversion_then_decoder": ...,
"encoder_std_999": ..., "teacher_first_segment_psnr": ..., "teacher_first_segment_flips": ...}, ...}
(DDIM-4: "inversion_then_teacher_jumps").
"""

from __future__ import annotations

import argparse
import json

from paper_table import add_training_arguments, variant_configs

BAD_PSNR = 12.0


def teacher_ode_from_19(bundle, x0, context, step: int = 20, seed: int = 0):
    """The consistency teacher's own ODE: x0 noised to t = 19, then its DDIM steps (eps at the current point,
    w = 0, adapters off) 19 -> 39 -> ... -> 999, as the forward consistency loss steps.

    The decoders are trained from this marginal (std ~1 at 999); a DDIM inversion started at the clean
    latent lands at about half that norm on the toy, off the decoders' training distribution.
    """
    import torch

    from icd.diffusion.schedule import add_noise, ddim_jump_timesteps

    top = len(bundle.alphas_cumprod) - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0.dtype)
    x = add_noise(bundle.alphas_cumprod, x0, noise, top % step).to(x0.dtype)
    with bundle.adapter(None):
        for t in range(top % step, top, step):
            x = ddim_jump_timesteps(bundle.alphas_cumprod, x, bundle.eps(x, t, context, 0.0), t, t + step).to(x0.dtype)
    return x


def teacher_then_decoder(bundle, x_top, context, boundaries, step: int = 20):
    """The decoder with its first segment (999 -> 779) replaced by the teacher's DDIM steps of ``step``."""
    import torch

    from icd.diffusion import samplers
    from icd.diffusion.boundaries import Boundaries
    from icd.diffusion.schedule import ddim_jump_timesteps

    top, end = boundaries.reverse_timesteps[0], boundaries.reverse_timesteps[1]
    grid = [*range(top, end, -step), end]
    x = x_top
    with bundle.adapter(None):
        for t, s in zip(grid[:-1], grid[1:]):
            x = ddim_jump_timesteps(bundle.alphas_cumprod, x, bundle.eps(x, t, context, 0.0), torch.tensor(t),
                                    torch.tensor(s)).to(x_top.dtype)
    rest = Boundaries(boundaries.reverse_timesteps[1:], boundaries.forward_timesteps, boundaries.num_train_timesteps)
    return samplers.consistency_decode(bundle, x, context, rest).latents


def kept_checkpoints(paths, settings) -> list[tuple[int, dict]]:
    """(step, trainable weights) of each checkpoint Ray Train kept for a stage, in step order."""
    import pyarrow.fs as pafs
    from safetensors.torch import load

    from icd.storage import filesystem_for

    fs, root = filesystem_for(f"{paths.storage_path}/{paths.trainer_name}", settings)
    found = []
    for info in fs.get_file_info(pafs.FileSelector(root)):
        name = info.path.rsplit("/", 1)[-1]
        if info.type == pafs.FileType.Directory and name.startswith("step-"):
            with fs.open_input_stream(f"{info.path}/trainable.safetensors") as f:
                found.append((int(name.removeprefix("step-")), load(f.read())))
    return sorted(found, key=lambda item: item[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="which of paper_table.py's seeds to break down")
    parser.add_argument("--eval-count", type=int, default=128)
    parser.add_argument("--checkpoints", action="store_true",
                        help="also reconstruct with each kept checkpoint of icd4_lf and icd4_lf_lr")
    parser.add_argument("--tau", type=float, default=0.7, help="dynamic CFG of the guided_dcfg row, as paper_table.py")
    args = parser.parse_args()

    import numpy as np
    import torch

    from icd.data.shapes import parse_caption
    from icd.diffusion import samplers
    from icd.diffusion.boundaries import Boundaries
    from icd.evaluation.reconstruction import latent_mse, load_eval_images, mean_psnr, per_image_psnr, pooled_psnr
    from icd.evaluation.shapes import background_color
    from icd.storage import S3Settings
    from icd.train.stages import StagePaths, load_stage_bundle, read_stage_manifest

    torch.set_num_threads(2)
    configs = variant_configs(args, args.seed)
    settings = S3Settings.from_config(configs["icd4"].storage)
    manifests = {}
    for row, (name, stage) in {"icd4": ("icd4", "icd"), "icd4_lf": ("icd4_lf", "icd"),
                               "icd4_lf_lr": ("icd4_lf_lr", "icd"), "cycle": ("icd4_lf_lr", "cycle")}.items():
        paths = StagePaths.of(configs[name], stage, args.run, settings=settings)
        manifests[row] = read_stage_manifest(paths.manifest, settings)
        if manifests[row] is None:
            raise SystemExit(f"{row}: no trained model at {paths.output}; run benchmarks/paper_table.py first "
                             f"with the same arguments")
    config = configs["icd4"]
    images, captions = load_eval_images(settings.uri(f"datasets/{config.data.eval_dataset}"), args.eval_count,
                                        config.model.resolution, settings)
    backgrounds = [parse_caption(c)[2] for c in captions]
    boundaries = Boundaries.from_config(config.method)

    def summary(decoded: torch.Tensor) -> dict:
        per_image = per_image_psnr(decoded, images)
        pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        bad = [i for i in range(len(images)) if per_image[i] < BAD_PSNR]
        return {"psnr": round(mean_psnr(decoded, images), 2), "psnr_pooled": round(pooled_psnr(decoded, images), 2),
                "median_psnr": round(float(np.median(per_image)), 2),
                "under_12db": len(bad),
                "background_flips": sum(background_color(pixels[i]) != backgrounds[i] for i in bad)}

    table = {}
    with torch.no_grad():
        for row, manifest in manifests.items():
            bundle = load_stage_bundle(manifest, settings=settings)
            if row == "icd4":  # the teacher (and VAE, text encoder) is the same under every model: once
                x0 = bundle.encode_images(images)
                context = bundle.encode_prompts(captions)
                inverted = teacher_ode_from_19(bundle, x0, context)
                ddim = samplers.ddim_reconstruct(bundle, captions, 4, latents=x0, decode=True)
                table["ddim4"] = summary(ddim.images)
                # what the decoders start from: the teacher's own jumps between the same boundaries
                jumps = samplers.consistency_decode(bundle, inverted, context, boundaries, adapter=None).latents
                table["ddim4"]["inversion_then_teacher_jumps"] = round(
                    mean_psnr(bundle.decode_latents(jumps), images), 2)
            encoded = samplers.consistency_encode(bundle, x0, context, boundaries, torch.Generator().manual_seed(0))
            decoded = samplers.consistency_decode(bundle, encoded.latents, context, boundaries)
            table[row] = summary(bundle.decode_latents(decoded.latents))
            teacher_decoded = samplers.ddim_sample(bundle, encoded.latents, context, 50).latents
            own_decoded = samplers.consistency_decode(bundle, inverted, context, boundaries).latents
            table[row]["encoder_then_ddim50"] = round(mean_psnr(bundle.decode_latents(teacher_decoded), images), 2)
            table[row]["inversion_then_decoder"] = round(mean_psnr(bundle.decode_latents(own_decoded), images), 2)
            # how far the encoder's latents are from the diffusion marginal at 999 (standard deviation ~1.0)
            table[row]["encoder_std_999"] = round(float(encoded.latents.std()), 3)
            first = summary(bundle.decode_latents(teacher_then_decoder(bundle, encoded.latents, context, boundaries)))
            table[row]["teacher_first_segment_psnr"] = first["psnr"]
            table[row]["teacher_first_segment_flips"] = first["background_flips"]
            print(f"{row:11s} {table[row]}", flush=True)
            if row == "icd4_lf_lr":  # the table's guided rows: its inversion decoded with the caption's guidance
                for guided_row, tau in (("guided", None), ("guided_dcfg", args.tau)):
                    decoded = samplers.consistency_decode(bundle, encoded.latents, context, boundaries, guidance=7.0,
                                                          tau=tau)
                    table[guided_row] = summary(bundle.decode_latents(decoded.latents))
                    print(f"{guided_row:11s} {table[guided_row]}", flush=True)
        for row in ("icd4_lf", "icd4_lf_lr") if args.checkpoints else ():
            bundle = load_stage_bundle(manifests[row], settings=settings)
            parameters = dict(bundle.unet.named_parameters())
            table[row]["checkpoints"] = {}
            for step, weights in kept_checkpoints(StagePaths.of(configs[row], "icd", args.run, settings=settings),
                                                  settings):
                for name, value in weights.items():
                    parameters[name].copy_(value)
                encoded = samplers.consistency_encode(bundle, x0, context, boundaries, torch.Generator().manual_seed(0))
                decoded = samplers.consistency_decode(bundle, encoded.latents, context, boundaries).latents
                result = summary(bundle.decode_latents(decoded))
                table[row]["checkpoints"][step] = {"mse": round(latent_mse(decoded, x0), 4),
                                                   **{k: result[k] for k in ("psnr", "background_flips")}}
                print(f"{row:11s} step {step}: {table[row]['checkpoints'][step]}", flush=True)
    print(json.dumps(table))


if __name__ == "__main__":
    main()
