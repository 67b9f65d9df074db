"""Incremental detokenising with stop strings: token ids in, text deltas out (O(1) work per token)."""

from __future__ import annotations


class TextAssembler:
    """Token ids -> text deltas, cut at the first stop string; holds back a possible stop-string start.

    Decoding is incremental (the usual prefix/read offsets): each call decodes a few trailing tokens,
    not the whole answer, so a long streamed answer costs O(1) per token.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] is context already turned into text
        self.read_offset = 0
        self.text = ""  # all decoded text so far (cut at a stop string once found)
        self.sent = 0  # characters of the text already emitted
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _extend(self) -> None:
        """Append the text of tokens decoded since the last call (the standard incremental detokeniser)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):  # wait out incomplete characters
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        self.ids += token_ids
        self._extend()
        if self.stop:
            window = max(0, self.sent - self.longest_stop)  # a stop string can only start after this
            hits = [i for i in (self.text.find(s, window) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self.text = self.text[: min(hits)]
                return self._flush(len(self.text))
        safe = len(self.text)
        for s in self.stop:  # a suffix that may grow into a stop string stays back
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        return self._flush(safe)

    def finish(self) -> str:
        if not self.stopped:
            full = self._decode(self.ids[self.prefix_offset :])
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            self.text += full[len(prefix) :]  # whatever was held back as incomplete
            self.prefix_offset = self.read_offset = len(self.ids)
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta = self.text[self.sent : upto]
        self.sent = upto
        return delta
