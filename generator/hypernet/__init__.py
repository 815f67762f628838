"""Text-to-LoRA hypernetworks (L, M, S), their config and checkpoints."""
