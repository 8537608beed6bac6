"""Training FLOPs of a GPT / MoE model, counted from its shapes.

Every matrix multiply of the forward pass counts 2 FLOPs per multiply-add; training costs three
forward passes (forward, and a backward of twice its cost). Counted per token:
- attention: QKV projection h -> (heads + 2 groups) x head_dim, scores QK^T and the weighted sum of
  V over the full sequence (the local implementation computes the whole s x s score matrix),
  output projection heads x head_dim -> h;
- MoE layer: router h -> E, top-k experts of fc1 h -> f (2f with a GLU) and fc2 f -> h, plus the
  shared expert when present; dense layer: the same MLP at ffn_hidden_size;
- output layer h -> padded vocabulary.
Norms, softmax, activations and the embedding lookup are left out (a few per cent at most).
"""
from __future__ import annotations


def _mlp(h: int, f: int, glu: bool) -> int:
    return 2 * h * f * (2 if glu else 1) + 2 * f * h


def _is_moe_layer(args, index: int) -> bool:
    if not args.num_experts:
        return False
    freq = args.moe_layer_freq
    if isinstance(freq, int):
        return index % freq == 0
    return bool(freq[index])


def forward_flops_per_token(args, num_layers: int = None) -> int:
    """Forward FLOPs for one token of a sequence of args.seq_length tokens."""
    h, s = args.hidden_size, args.seq_length
    heads, head_dim = args.num_attention_heads, args.kv_channels
    groups = args.num_query_groups if args.group_query_attention else heads
    glu = bool(args.swiglu)
    layers = args.num_layers if num_layers is None else num_layers
    total = 0
    for i in range(layers):
        total += 2 * h * (heads + 2 * groups) * head_dim      # QKV
        total += 2 * 2 * heads * head_dim * s                # QK^T and attention x V
        total += 2 * heads * head_dim * h                    # output projection
        if _is_moe_layer(args, i):
            total += 2 * h * args.num_experts                 # router
            total += args.moe_router_topk * _mlp(h, args.moe_ffn_hidden_size, glu)
            if args.moe_shared_expert_intermediate_size:
                total += _mlp(h, args.moe_shared_expert_intermediate_size, glu)
        else:
            total += _mlp(h, args.ffn_hidden_size, glu)
    total += 2 * h * args.padded_vocab_size                  # output layer
    return total


def training_flops_per_iteration(args, num_layers: int = None) -> int:
    """FLOPs of one training iteration (global batch, forward + backward)."""
    tokens = args.global_batch_size * args.seq_length
    return 3 * tokens * forward_flops_per_token(args, num_layers)
