"""When to grow: stage timing from loss curves, and the loss logs it reads.
"""
