"""Pure growth logic: tensor layouts, model shapes and growable sizes, growth plans, the growth record.

No Megatron I/O and no torch.distributed here.
"""
