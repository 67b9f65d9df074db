"""The augmenting side on Ray: a pool of actors that run frozen augmenting models.

``AugmentBatchEncoder`` is a plain class (it works without Ray): it loads the augmenting models
once and maps a tokenised batch to the same batch plus one column per selected hidden state,
``aug{i}_{index}`` [batch, seq, d_aug], encoded by ``actors.codec`` (16-bit states as their raw
int16 bits, float32 as float32), so the object store moves them as zero-copy numpy buffers and
never pickles a torch tensor. Only the layers the bridges read are emitted.

``with_augment_states`` puts it behind Ray Data's autoscaling actor pool; ``augment_actor`` gives a
plain Ray actor of it for callers that want to drive it themselves.
"""

from __future__ import annotations

import numpy as np
import torch

from actors.codec import states_to_arrays
from composition.augment import AugmentEncoder
from composition.loading import load_causal_lm
from composition.model import positions_from_mask


class AugmentBatchEncoder:
    """Runs the augmenting models on token batches and returns their selected hidden states.

    Args:
        augments: model folders or hub ids, one per augmenting model.
        indices: per augmenting model, the hidden-state indices to emit (0 = embeddings).
        dtype: the models' dtype (float32, bfloat16, float16): the streamed states keep it.
        device: "cpu", "cuda" or "auto" (cuda when this process sees a GPU).
    """

    def __init__(self, augments: list[str], indices: list[list[int]], dtype: str = "float32", device: str = "auto"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.encoders = [
            AugmentEncoder(load_causal_lm(path, dtype, self.device), idx) for path, idx in zip(augments, indices)
        ]

    @torch.no_grad()
    def encode(self, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[int, torch.Tensor]]:
        """Per augmenting model, from its (input_ids, attention_mask) [batch, seq_i]: ``{index: [batch, seq_i,
        d_aug]}``, positions as ComposedModel computes them."""
        return [enc(ids, mask, positions_from_mask(mask))[0] for enc, (ids, mask) in zip(self.encoders, inputs)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``input_ids`` and ``attention_mask`` [batch, seq] (+ any columns) -> the same plus ``aug{i}_{index}``.

        An augmenting model with its own tokenizer reads ``aug{i}_input_ids`` / ``aug{i}_attention_mask``
        (``actors.train.data``), the others the anchor's tokens.
        """
        def tensor(name):  # small copies: the batches Ray hands over are read-only
            return torch.from_numpy(np.array(batch[name], dtype=np.int64)).to(self.device)

        inputs = []
        for i in range(len(self.encoders)):
            own = f"aug{i}_input_ids" in batch
            inputs.append((tensor(f"aug{i}_input_ids" if own else "input_ids"),
                           tensor(f"aug{i}_attention_mask" if own else "attention_mask")))
        return {**batch, **states_to_arrays(self.encode(inputs))}


def _remote_args(resources: dict[str, float] | None) -> dict:
    """Custom resources (``{name: amount}``) as Ray remote options; ``memory`` (bytes) is its own option."""
    extra = dict(resources or {})
    args = {}
    memory = extra.pop("memory", None)
    if memory:
        args["memory"] = memory
    if extra:
        args["resources"] = extra
    return args


def with_augment_states(ds, augments: list[str], indices: list[list[int]], dtype: str, *, batch_size: int,
                        max_actors: int, cpus_per_actor: float, gpus_per_actor: float,
                        resources_per_actor: dict[str, float] | None = None):
    """``ds`` (token columns) -> a dataset that also carries the selected augmenting states.

    The states are computed by an autoscaling pool of 1..``max_actors`` actors, each holding the
    models once; Ray Data streams the output blocks to the consumers while the pool computes the
    next ones. ``resources_per_actor``: custom resources each actor also asks for (e.g.
    ``{"augment_node": 0.01}``), so that the pool only runs on node types that declare them.
    """
    import ray.data

    return ds.map_batches(
        AugmentBatchEncoder,
        fn_constructor_kwargs={"augments": augments, "indices": indices, "dtype": dtype,
                               "device": "cuda" if gpus_per_actor > 0 else "cpu"},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        **_remote_args(resources_per_actor),
    )


def augment_actor(num_cpus: float = 1.0, num_gpus: float = 0.0, resources: dict[str, float] | None = None):
    """``AugmentBatchEncoder`` as a Ray actor class: ``augment_actor().remote(augments, indices, dtype)``."""
    import ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, **_remote_args(resources))(AugmentBatchEncoder)
