"""The activation codec: augmenting hidden states <-> numpy arrays for Ray's object store.

Ray stores numpy arrays zero-copy on a node, while torch tensors are pickled (copied). numpy has
no bfloat16, so 16-bit states travel as their raw bits (int16 arrays) and are viewed back on
the other side; float32 states travel as float32. Nothing is converted or rounded.

States are named ``aug{i}_{index}`` (augmenting model ``i``, hidden-state ``index``), which is
also their column name in a Ray Dataset.
"""

from __future__ import annotations

import numpy as np
import torch

from composition.config import DTYPES

_RAW16 = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
_BY_NAME = {name: getattr(torch, name) for name in DTYPES}
_CANNOT = f"cannot be streamed: use {', '.join(DTYPES[:-1])} or {DTYPES[-1]}"


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in _BY_NAME.items():
        if d == dtype:
            return name
    raise TypeError(f"activations of dtype {dtype} {_CANNOT}")


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy array sharing ``t``'s bits (int16 for 16-bit floats). Moves CUDA tensors to CPU."""
    t = t.detach().contiguous().cpu()
    if t.dtype in _RAW16:
        return t.view(torch.int16).numpy()
    if t.dtype != torch.float32:
        raise TypeError(f"activations of dtype {t.dtype} {_CANNOT}")
    return t.numpy()


def numpy_to_tensor(a: np.ndarray, dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.Tensor:
    """The tensor ``tensor_to_numpy`` encoded (no copy on CPU when the array is writable)."""
    dtype = _BY_NAME[dtype] if isinstance(dtype, str) else dtype
    if not a.flags.writeable:  # object-store arrays are read-only; torch needs a writable buffer
        a = a.copy()
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype in _RAW16:
        t = t.view(dtype)
    return t.to(device)


def state_key(augment: int, index: int) -> str:
    return f"aug{augment}_{index}"


def states_to_arrays(states: list[dict[int, torch.Tensor]]) -> dict[str, np.ndarray]:
    """``[{index: [batch, seq, d_aug]}]`` per augmenting model -> ``{"aug{i}_{index}": array}``."""
    return {state_key(i, index): tensor_to_numpy(t) for i, s in enumerate(states) for index, t in s.items()}


def arrays_to_states(
    arrays: dict[str, np.ndarray], dtype: str | torch.dtype, device: str | torch.device = "cpu"
) -> list[dict[int, torch.Tensor]]:
    """Inverse of ``states_to_arrays``; keys not named ``aug{i}_{index}`` are ignored."""
    out: dict[int, dict[int, torch.Tensor]] = {}
    for key, a in arrays.items():
        if not key.startswith("aug") or "_" not in key:
            continue
        i, index = key[3:].split("_", 1)
        if not (i.isdigit() and index.isdigit()):
            continue
        out.setdefault(int(i), {})[int(index)] = numpy_to_tensor(np.asarray(a), dtype, device)
    return [out[i] for i in sorted(out)]
