"""Models: base components (UNet, VAE, text encoder, tokenizer), presets, LoRA adapters."""
