"""The activation codec round-trips every streamable dtype bit for bit."""

import numpy as np
import pytest
import torch

from actors.codec import arrays_to_states, numpy_to_tensor, states_to_arrays, tensor_to_numpy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(dtype):
    t = torch.randn(2, 5, 8).to(dtype)
    a = tensor_to_numpy(t)
    assert a.dtype == (np.float32 if dtype == torch.float32 else np.int16)
    assert a.nbytes == t.numel() * t.element_size()  # 16-bit states stay 16-bit on the wire
    assert torch.equal(numpy_to_tensor(a, dtype), t)


def test_read_only_arrays_from_the_object_store_decode():
    a = tensor_to_numpy(torch.randn(3, 4).bfloat16())
    a.flags.writeable = False
    assert numpy_to_tensor(a, "bfloat16").shape == (3, 4)


def test_states_round_trip_through_named_arrays():
    states = [{0: torch.randn(1, 3, 4), 4: torch.randn(1, 3, 4)}, {2: torch.randn(1, 3, 6)}]
    arrays = states_to_arrays(states)
    assert sorted(arrays) == ["aug0_0", "aug0_4", "aug1_2"]
    back = arrays_to_states({**arrays, "input_ids": np.zeros(3)}, "float32")
    assert all(torch.equal(back[i][k], states[i][k]) for i in range(2) for k in states[i])


def test_unsupported_dtype_is_rejected():
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        tensor_to_numpy(torch.zeros(2, dtype=torch.int64))
