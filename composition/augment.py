"""AugmentEncoder: runs a frozen augmenting model and returns only the selected hidden states.

This is the augmenting side of a composition, usable alone: the Ray actors call it to stream
activations to anchor workers, and ComposedModel calls it in-process.
"""

from __future__ import annotations

import torch
from torch import nn

from composition.layers import DecoderInfo, HiddenStateSite, describe_decoder


class AugmentEncoder(nn.Module):
    """Hidden states of ``model`` at ``indices`` (0 = embeddings, i = output of layer i - 1).

    Runs the base model only (no LM head). The model is frozen and kept in eval mode.
    """

    def __init__(self, model: nn.Module, indices: list[int]):
        super().__init__()
        self.model = model
        self.info: DecoderInfo = describe_decoder(model)
        self.indices: list[int] = []
        self._captured: dict[int, torch.Tensor] | None = None
        self._on_state = None  # during a forward given ``on_state``
        self._sites: dict[int, HiddenStateSite] = {}
        self.add_indices(indices)

    def add_indices(self, indices) -> None:
        """Also return the hidden states at ``indices`` from now on (another composition reads them)."""
        for i in sorted(set(indices) - set(self.indices)):
            self._sites[i] = HiddenStateSite(self.info, i, self._reader(i))
        self.indices = sorted(self._sites)

    def remove_hooks(self) -> None:
        for site in self._sites.values():
            site.remove()
        self._sites = {}

    def _reader(self, index: int):
        def read(hidden: torch.Tensor) -> None:
            if self._captured is not None:
                self._captured[index] = hidden
                if self._on_state is not None:
                    self._on_state(index, hidden)

        return read

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache=None,
        use_cache: bool = False,
        on_state=None,
    ) -> tuple[dict[int, torch.Tensor], object]:
        """Run the augmenting model on ``input_ids``.

        Args:
            input_ids: [batch, seq] new tokens.
            attention_mask: [batch, cached + seq], 0 at padding (covers cached tokens too).
            position_ids: [batch, seq].
            cache: the model's own HF cache from the previous call, or None.
            on_state: ``(index, states)``, called as soon as each index's states exist (from inside the
                forward, at that layer), so a consumer can start on the low layers' states while the upper
                layers still run.
        Returns:
            ({index: [batch, seq, d_augment] in the model's dtype}, the updated HF cache or None).
        """
        self._captured, self._on_state = {}, on_state
        try:
            out = self.info.base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
            )
            states = self._captured
        finally:
            self._captured, self._on_state = None, None
        missing = [i for i in self.indices if i not in states]
        if missing:
            raise RuntimeError(f"{self.info.architecture}: hidden states at indices {missing} were not produced")
        return states, (out.cache if use_cache else None)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # frozen: never dropout
        return self
