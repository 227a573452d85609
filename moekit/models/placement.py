"""Which layers of a stack hold an MoE: one rule for the LM, the encoder and the seq2seq stacks."""

from collections.abc import Collection


def is_moe_layer(layer_idx: int, num_layers: int, *, every: int = 1, first_k_dense: int = 0,
                 last_sparse: bool = False, moe_layers: Collection[int] | None = None) -> bool:  # fmt: skip
    """Whether layer ``layer_idx`` of ``num_layers`` is sparse: listed in ``moe_layers`` when given, else past the
    first ``first_k_dense`` and every ``every``-th counted from the first layer (DeepSeek's first_k_dense_replace /
    moe_layer_freq) or, with ``last_sparse``, from the last one (V-MoE)."""
    if moe_layers is not None:
        return layer_idx in moe_layers
    position = num_layers - 1 - layer_idx if last_sparse else layer_idx
    return layer_idx >= first_k_dense and position % every == 0
