"""What an adapter is and how it is made: LoRA tensors, the PEFT format, base-model specs, the task
encoder, the hypernetworks, and applying adapters to a base model."""
