"""Offline Megatron checkpoints: read, grow, write; imports nothing from training/ or live/."""
