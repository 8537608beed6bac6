"""megatron-core objects from Megatron-LM-style args: the GPT/MoE model, its optimizer and scheduler.
"""
