"""megatron_sparkling: grow a megatron-core MoE model between pre-training stages.

Pure tensor operators (growth methods) are kept apart from Megatron I/O (checkpoints, hooks);
`megatron_sparkling.training` is a Megatron-LM-style pre-training loop built on megatron-core,
and `megatron_sparkling.compat` adapts megatron-core to CPU-only machines.
"""
__version__ = "0.1.0"
