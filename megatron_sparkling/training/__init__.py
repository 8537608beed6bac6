"""This project's Megatron-LM-style pre-training loop; grows only through live/state.py."""
