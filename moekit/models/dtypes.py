"""Weight dtypes by name (``--dtype``, ``dtype=``) and the one rule for casting a model's loaded tensors."""

from __future__ import annotations

import torch

from moekit.errors import ConfigError
from moekit.nn.quantized import is_quantized_tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_HELP = "cast the float weights to float32 | bfloat16 | float16 (default: as stored)"


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` as a torch dtype (None stays None); a name that is none of :data:`DTYPES` is a ConfigError."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {**DTYPES, **_ALIASES}
    if dtype not in names:
        raise ConfigError(f"dtype={dtype!r} is not one of {sorted(names)}")
    return names[dtype]


def cast_weights(
    tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """``tensors`` (a state dict) in ``dtype`` on ``device``: quantised tensors keep theirs, the routers'
    ``e_score_correction_bias`` stays float32 (as transformers keeps it); a tensor already right is kept as it is
    (a mapped view stays one), any other is one copy straight into the contiguous layout."""
    out = {}
    for name, t in tensors.items():
        if is_quantized_tensor(name) or not t.is_floating_point():  # quantised: int data and their own scales
            out[name] = t
            continue
        want = torch.float32 if name.endswith("e_score_correction_bias") else dtype
        if t.dtype != want or t.device != torch.device(device):
            t = t.to(device=device, dtype=want, memory_format=torch.contiguous_format)
        out[name] = t
    return out
