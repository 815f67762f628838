"""Latent-variable adapter generators: a conditional VAE over LoRA parameters (`cvae`, after ICM-LoRA) and
semantic-guided generation with a prior from the nearest library experts (`sg`, after SG-LoRA)."""
