"""Pretrain the toy base model on the shapes world, on CPU, and write it in diffusers layout.

    python jobs/pretrain_toy_base.py --out platform/icd/models/toy_base --unet-minutes 65
    python jobs/pretrain_toy_base.py --out platform/icd/models/toy_base --finetune-decoder-steps 3000

(the two commands that made the shipped v2, about 2 hours on 2 cores; architecture in
``icd.models.toy``).

1. VAE (MSE + 1e-6 KL) on freshly rendered images until the held-out PSNR target or the
   step limit.
2. Encode a fixed training set once; the latent scaling factor is 1 / std of the latents
   (SD's 0.18215 was found the same way).
3. UNet teacher and tiny text encoder trained jointly (epsilon prediction, 10 % empty
   captions for classifier-free guidance, EMA), then frozen, as SD freezes CLIP.
4. Save the EMA weights as fp16 safetensors (the fixture must stay small) with SD's DDIM
   scheduler config and the offline CLIP tokenizer.

Progress and a quick caption-accuracy probe go to stdout; the full measurement is
``benchmarks/toy_base_quality.py``.

``--finetune-decoder-steps N`` instead refines the VAE *decoder* of an existing model in
``--out`` (the encoder, hence every latent the UNet was trained on, stays unchanged), and
``--resume`` continues the UNet and text encoder of ``--out`` for another time budget.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from icd.data.shapes import random_sample, sample_specs
from icd.evaluation.shapes import shape_region_color
from icd.models.tokenizer import offline_clip_tokenizer, write_clip_tokenizer_files
from icd.models.toy import sd_scheduler, toy_text_encoder, toy_unet, toy_vae

EVAL_SEED_OFFSET = 1_000_000_000  # held-out images never overlap the training seeds


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def render_batch(seeds) -> tuple[torch.Tensor, list[str]]:
    samples = [random_sample(int(s)) for s in seeds]
    return to_tensor(np.stack([s.image for s in samples])), [s.caption for s in samples]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss((a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def train_vae(args, log) -> torch.nn.Module:
    vae = toy_vae()
    opt = torch.optim.Adam(vae.parameters(), lr=args.vae_lr)
    rng = np.random.default_rng(args.seed)
    eval_x, _ = render_batch(range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + 256))
    start = time.time()
    for step in range(1, args.vae_steps + 1):
        for group in opt.param_groups:  # cosine decay to 10 %
            group["lr"] = args.vae_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.vae_steps)))
        x, _ = render_batch(rng.integers(0, 2**31, size=args.batch_vae))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + args.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == args.vae_steps:
            with torch.no_grad():
                value = psnr(vae.decode(vae.encode(eval_x).latent_dist.mode()).sample, eval_x)
            log(f"vae step {step}/{args.vae_steps} loss {loss.item():.5f} held-out PSNR {value:.2f} dB "
                f"({time.time() - start:.0f}s)")
            if value >= args.vae_target_psnr:
                break
    return vae.eval().requires_grad_(False)


def finetune_decoder(vae, steps: int, lr: float, batch: int, seed: int, log) -> torch.nn.Module:
    """Train only the decoder side (post_quant_conv + decoder) on posterior-mode latents."""
    vae.requires_grad_(False)
    decoder_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in decoder_params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(decoder_params, lr=lr)
    rng = np.random.default_rng(seed + 1)
    eval_x, _ = render_batch(range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + 256))
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        x, _ = render_batch(rng.integers(0, 2**31, size=batch))
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.mode()
        loss = F.mse_loss(vae.decode(latents).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps:
            with torch.no_grad():
                value = psnr(vae.decode(vae.encode(eval_x).latent_dist.mode()).sample, eval_x)
            log(f"decoder step {step}/{steps} loss {loss.item():.5f} held-out PSNR {value:.2f} dB")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_training_set(vae, n: int, batch: int = 256) -> tuple[torch.Tensor, list[str]]:
    latents, captions = [], []
    for lo in range(0, n, batch):
        x, caps = render_batch(range(lo, min(lo + batch, n)))
        latents.append(vae.encode(x).latent_dist.mode())
        captions += caps
    return torch.cat(latents), captions


@torch.no_grad()
def caption_accuracy_probe(unet, text_encoder, vae, tokenizer, scaling, n=64, steps=20, w=7.0, seed=0) -> float:
    """Fraction of DDIM generations (code guidance w) whose shape colour matches the caption."""
    specs = sample_specs(np.random.default_rng(seed), n)
    prompts = [s.caption for s in specs]
    scheduler = sd_scheduler()
    scheduler.set_timesteps(steps)
    ids = tokenizer(prompts + [""] * n, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    context = text_encoder(ids).last_hidden_state
    size = unet.config.sample_size
    x = torch.randn(n, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    for t in scheduler.timesteps:
        eps = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample
        eps_c, eps_u = eps.chunk(2)
        x = scheduler.step(eps_c + w * (eps_c - eps_u), t, x).prev_sample
    images = ((vae.decode(x / scaling).sample.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    hits = [shape_region_color(img, s.background) == s.color for img, s in zip(images, specs)]
    return float(np.mean(hits))


def save(out: Path, vae, unet, text_encoder, scaling: float, log) -> None:
    out.mkdir(parents=True, exist_ok=True)
    vae.register_to_config(scaling_factor=scaling)
    vae.to(torch.float16).save_pretrained(out / "vae", safe_serialization=True)
    unet.to(torch.float16).save_pretrained(out / "unet", safe_serialization=True)
    text_encoder.to(torch.float16).save_pretrained(out / "text_encoder", safe_serialization=True)
    for module in (vae, unet, text_encoder):
        module.to(torch.float32)
    sd_scheduler().save_pretrained(out / "scheduler")
    write_clip_tokenizer_files(out / "tokenizer")
    import diffusers

    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2))
    log(f"saved {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("platform/icd/models/toy_base"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vae-steps", type=int, default=2500)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--vae-target-psnr", type=float, default=38.0)
    parser.add_argument("--batch-vae", type=int, default=32)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--train-images", type=int, default=80_000)
    parser.add_argument("--unet-minutes", type=float, default=60.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--probe-every", type=int, default=500)
    parser.add_argument("--finetune-decoder-steps", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue training the UNet and text encoder in --out")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.0f}s] {msg}", flush=True)

    if args.finetune_decoder_steps:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.out / "vae", torch_dtype=torch.float32, use_safetensors=True)
        scaling = vae.config.scaling_factor
        vae = finetune_decoder(vae, args.finetune_decoder_steps, args.vae_lr / 4, args.batch_vae, args.seed, log)
        vae.to(torch.float16).save_pretrained(args.out / "vae", safe_serialization=True)
        log(f"saved the fine-tuned decoder to {args.out / 'vae'} (scaling factor {scaling:.4f} kept)")
        return

    if args.resume:
        # Continue the UNet and text encoder of the model in --out (its VAE and scaling kept).
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        load = dict(torch_dtype=torch.float32, use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(args.out / "vae", **load).eval().requires_grad_(False)
        latents, captions = encode_training_set(vae, args.train_images)
        scaling = float(vae.config.scaling_factor)
        log(f"resuming from {args.out}; latent scaling factor {scaling:.4f} kept")
    else:
        vae = train_vae(args, log)
        latents, captions = encode_training_set(vae, args.train_images)
        scaling = float(1.0 / latents.std())
        log(f"encoded {len(latents)} training images; latent scaling factor {scaling:.4f}")
    latents = latents * scaling

    tokenizer = offline_clip_tokenizer()
    unique = sorted(set(captions)) + [""]
    token_table = tokenizer(unique, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    caption_index = torch.tensor([unique.index(c) for c in captions])
    empty_index = len(unique) - 1

    if args.resume:
        unet = UNet2DConditionModel.from_pretrained(args.out / "unet", **load)
        text_encoder = CLIPTextModel.from_pretrained(args.out / "text_encoder", **load)
    else:
        unet, text_encoder = toy_unet(), toy_text_encoder()
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema = EMAModel(params, decay=args.ema_decay, use_ema_warmup=True, power=0.75)
    scheduler = sd_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod
    rng = torch.Generator().manual_seed(args.seed)
    budget = args.unet_minutes * 60
    start, step, losses = time.time(), 0, []
    while (elapsed := time.time() - start) < budget:
        step += 1
        frac = elapsed / budget
        for group in opt.param_groups:  # warm-up, then cosine decay to 10 % over the time budget
            group["lr"] = args.lr * min(1.0, step / 200) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(0, len(latents), (args.batch,), generator=rng)
        x0 = latents[idx]
        cap = caption_index[idx].clone()
        cap[torch.rand(args.batch, generator=rng) < args.caption_dropout] = empty_index
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=rng)
        noise = torch.randn(x0.shape, generator=rng)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        eps = unet(xt, t, encoder_hidden_states=text_encoder(token_table[cap]).last_hidden_state).sample
        loss = F.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(params)
        losses.append(loss.item())
        if step % 100 == 0:
            log(f"unet step {step} loss {np.mean(losses[-100:]):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"({step / (time.time() - start):.2f} steps/s)")
        if step % args.probe_every == 0:
            ema.store(params)
            ema.copy_to(params)
            acc = caption_accuracy_probe(unet, text_encoder, vae, tokenizer, scaling)
            save(args.out, vae, unet, text_encoder, scaling, log)
            ema.restore(params)
            log(f"unet step {step}: EMA caption accuracy (64 DDIM-20 samples, w=7) {acc:.2f}")

    ema.copy_to(params)
    acc = caption_accuracy_probe(unet, text_encoder, vae, tokenizer, scaling, n=128)
    log(f"final: {step} steps, EMA caption accuracy (128 DDIM-20 samples, w=7) {acc:.2f}")
    save(args.out, vae, unet, text_encoder, scaling, log)


if __name__ == "__main__":
    main()
