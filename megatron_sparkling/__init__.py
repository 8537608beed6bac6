"""megatron_sparkling: grow a megatron-core MoE model between pre-training stages.

Pure tensor operators (growth methods) are kept apart from Megatron I/O (checkpoints, hooks);
`megatron_sparkling.training` is a Megatron-LM-style pre-training loop built on megatron-core,
and `megatron_sparkling.compat` adapts megatron-core to CPU-only machines.

For Megatron-LM (see patches/):

    import megatron_sparkling
    megatron_sparkling.install()     # a narrower --load checkpoint grows on load
    pretrain(..., extra_args_provider=megatron_sparkling.extra_args_provider(other_provider))

Nothing heavy is imported here: megatron-core is imported when these are called.
"""
__version__ = "0.1.0"


def install() -> str:
    """Growth on load in the loader in use: Megatron-LM's if importable, else this package's
    own (training/checkpointing.py); returns which one was wrapped. Idempotent. See
    live/load_hook.py."""
    from megatron_sparkling import wandb_log
    from megatron_sparkling.live import load_hook

    load_hook.on_growth(wandb_log.log_hook_growth)
    wrapped = load_hook.install_megatron_lm()
    if wrapped is not None:
        return wrapped
    from megatron_sparkling.training import checkpointing

    checkpointing.load_checkpoint = load_hook.growing(checkpointing.load_checkpoint)
    return "megatron_sparkling.training.checkpointing.load_checkpoint"


def extra_args_provider(chained=None):
    """An extra_args_provider adding the --sparkling-* flags, then `chained`'s (if any)."""
    def provider(parser):
        from megatron_sparkling.live.load_hook import add_args

        parser = add_args(parser) or parser
        if chained is not None:
            parser = chained(parser) or parser
        return parser
    return provider
