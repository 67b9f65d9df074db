"""Aligning an anchor and augmenting models that use different tokenizers (plain Python + torch, no Ray).

Both models read the same text; each tokenises it with its own tokenizer. The anchor's token ids
are the input (as always); the text is what they decode to, and the augmenting tokens are derived
from that text here. The rule (docs/tokenizers.md has the long form):

* **Anchor character ends** come from incremental decoding of the anchor ids: the end of anchor
  token i is the length of the text that ids[:i+1] decode to, minus a trailing incomplete
  character (a multi-byte UTF-8 character split over byte tokens counts only once complete).
  Special tokens (BOS, chat markers) add no text: their end is the end of the text before them.
* **Pieces.** The text is cut before every space (U+0020) that follows a non-whitespace
  character: "Hello,  wide world" -> "Hello," | "  wide" | " world". Each piece is tokenised
  alone by the augmenting tokenizer (no special tokens); the augmenting sequence is the
  tokenizer's own leading special tokens (e.g. BOS) followed by the tokens of the pieces in order.
  For tokenizers that split words at spaces before merging (byte-level BPE, SentencePiece /
  Metaspace) this is exactly the tokenisation of the whole text.
* **Closing.** A piece is *closed* once the next piece has begun, i.e. once the text holds the
  space after it. Anchor token i may attend to augmenting token j when j is one of the leading
  specials or lies in a piece closed by the text up to anchor token i's end. Which pieces exist,
  their tokens, and whether they are closed depend only on that text, and every augmenting token
  before j is in a closed piece too, so the augmenting state at j (a causal model over tokens <= j)
  and the set of visible tokens are functions of the text up to anchor token i's end: no future leaks.
  The last, open piece is never visible (the anchor cannot know that word is finished), so it is
  never fed to the augmenting model either: cached decoding only ever appends closed tokens and
  never rolls a cache back.
* **One shared tokenizer** (equal fingerprints): the augmenting tokens *are* the anchor's tokens and
  the alignment is the identity (augmenting token j is visible from anchor token j on): the paper's
  composition of models that share a vocabulary (``Aligner.shared``; no tokenizers needed).
* **Rotary positions.** A bridge key gets the anchor position of the first anchor token that sees
  it; queries keep their anchor positions. So ``query - key`` counts anchor tokens since the
  augmenting token became visible, which for a shared tokenizer is the distance between the tokens.

``visible`` below is always "how many real (non-padding) augmenting tokens an anchor position may
see", counted from the start of the sequence, so it does not depend on how rows are padded.

Standalone use (the training pipeline tokenises each example once per model)::

    a = align_text("Hola, ¿qué tal?", anchor_tokenizer, augment_tokenizer)
    a["anchor_ids"], a["augment_ids"], a["visible"]           # plain lists
    inputs = collate([a["augment_ids"]], [a["visible"]], anchor_attention_mask)   # AugmentInputs
    model(anchor_ids, anchor_attention_mask, augment_inputs=[inputs])
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass

import torch

from composition.padding import pad_left

REPLACEMENT = "\ufffd"  # what a decoder yields for bytes that are not (yet) a whole UTF-8 character


class TokenizerError(TypeError):
    """A tokenizer that cross-tokenizer composition cannot use; the message says what to do."""


@dataclass
class AugmentInputs:
    """One augmenting model's inputs aligned to a batch of anchor tokens.

    Attributes:
        input_ids: [batch, seq_aug] augmenting token ids (any padding layout; the new tokens only
            when continuing a cache).
        attention_mask: [batch, seq_aug], 0 at padding.
        visible: [batch, seq] long, per anchor position (of the new anchor tokens): how many real
            augmenting tokens, counted from the start of the sequence (cached ones included), it may
            attend to. Non-decreasing along each row.
        identity: these are the anchor's own tokens, mask and positions (one shared tokenizer): token j is
            visible from anchor token j on, so ``ComposedModel`` may take the masks and key positions straight
            from the anchor's (the same values at every real position, fewer operations per decode step; with a
            ``window`` it takes the general rule, which counts real tokens where the anchor's mask counts columns).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    visible: torch.Tensor
    identity: bool = False


# ---------------------------------------------------------------------------- tokenizers
def check_fast(tokenizer, role: str):
    """The Rust tokenizer behind ``tokenizer``; TokenizerError when there is none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", True):
        raise TokenizerError(
            f"the {role} tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer: composing models with "
            f"different tokenizers needs the Rust `tokenizers` backend (decoding with offsets). Load it with "
            f"AutoTokenizer.from_pretrained(..., use_fast=True), or wrap a tokenizers.Tokenizer in "
            f"PreTrainedTokenizerFast(tokenizer_object=...)"
        )
    return backend


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer, role: str = "given") -> dict:
    """What makes two tokenizers tokenise alike: hashes of the vocabulary (model), normalizer,
    pre-tokenizer, decoder and added tokens. Padding and truncation settings are left out."""
    data = json.loads(check_fast(tokenizer, role).to_str())
    return {
        "model": (data.get("model") or {}).get("type"),
        "vocab_size": len(tokenizer),
        "vocab_sha256": _sha(data.get("model")),
        "normalizer_sha256": _sha(data.get("normalizer")),
        "pre_tokenizer_sha256": _sha(data.get("pre_tokenizer")),
        "decoder_sha256": _sha(data.get("decoder")),
        "added_tokens_sha256": _sha([(t["id"], t["content"], t.get("special")) for t in data.get("added_tokens", [])]),
    }


def _plain_backend(tokenizer, role: str):
    """A private copy of the Rust tokenizer with padding and truncation off (the wrapper toggles them per call)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(check_fast(tokenizer, role).to_str())
    backend.no_padding()
    backend.no_truncation()
    return backend


def prefix_special_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. [BOS]); trailing ones (EOS) are left out."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return list(full[:k])
    return []


def special_ids(tokenizer) -> set[int]:
    """Ids that add no text: the tokenizer's special tokens and its added tokens marked special."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return ids


# ---------------------------------------------------------------------------- one row, step by step
@dataclass(frozen=True)
class RowText:
    """Where one row's anchor text stands (immutable: every step makes a new one, so a cache can be
    continued twice).

    The decode window follows the usual incremental-detokenisation scheme: ``window`` holds the
    anchor ids since a clean point (a decode that did not end in an incomplete character); its
    first ``context`` ids were emitted before and are decoded again only as context, so
    decoders that treat the first token specially (SentencePiece's leading space) act alike.
    """

    window: tuple[int, ...] = ()
    context: int = 0  # leading ids of ``window`` already emitted (decode context)
    context_text: str = ""  # decode(window[:context])
    pending_chars: int = 0  # characters past the context already emitted (stable part of a pending decode)
    chars: int = 0  # stable characters so far: the character end of the last anchor token
    piece: str = ""  # the open piece: text since the last cut
    last_is_text: bool = False  # the last character is not whitespace (a space after it cuts)


def _cut(piece: str, last_is_text: bool, text: str) -> tuple[str, bool, list[str]]:
    """Append ``text`` to the open ``piece``; returns (open piece, last character is not whitespace, closed pieces)."""
    closed, start = [], 0
    for k, ch in enumerate(text):
        if ch == " " and last_is_text:
            closed.append(piece + text[start:k])
            piece, start = "", k
        last_is_text = not ch.isspace()
    return piece + text[start:], last_is_text, closed


class Aligner:
    """Aligns anchor token ids with each augmenting model's tokens, row by row and step by step.

    Every composition has one: with one shared tokenizer it is the identity (``Aligner.shared``), so a
    ComposedModel and the serving engine run one path whatever the tokenizers.

    Args:
        anchor_tokenizer: the anchor's fast tokenizer.
        augment_tokenizers: one fast tokenizer per augmenting model.
        identity_when_shared: an augmenting model whose tokenizer has the anchor's fingerprint reads
            the anchor's own tokens (the shared-tokenizer composition). False forces the text path
            (re-tokenising by pieces) even then: used to measure that path.
    """

    @classmethod
    def shared(cls, num_augments: int) -> Aligner:
        """The alignment of models that read the anchor's own token ids (no tokenizers needed)."""
        return cls(None, [None] * num_augments)

    def __init__(self, anchor_tokenizer, augment_tokenizers: list, identity_when_shared: bool = True):
        if anchor_tokenizer is None:  # ``Aligner.shared``: every model reads the anchor's ids; nothing to tokenise
            n = len(augment_tokenizers)
            self.anchor_fingerprint, self.augment_fingerprints, self.identity = None, [None] * n, [True] * n
            self._anchor, self._special, self._augments, self._prefix = None, set(), [None] * n, [[]] * n
            self.augment_pad_ids = [0] * n
            return
        self.anchor_fingerprint = tokenizer_fingerprint(anchor_tokenizer, "anchor")
        self.augment_fingerprints = [tokenizer_fingerprint(t, f"augmenting model {i}")
                                     for i, t in enumerate(augment_tokenizers)]
        self.identity = [identity_when_shared and fp == self.anchor_fingerprint for fp in self.augment_fingerprints]
        self._anchor = _plain_backend(anchor_tokenizer, "anchor")
        self._special = special_ids(anchor_tokenizer)
        self._augments = [_plain_backend(t, f"augmenting model {i}") for i, t in enumerate(augment_tokenizers)]
        self._prefix = [prefix_special_ids(t) for t in augment_tokenizers]
        self.augment_pad_ids = [t.pad_token_id if t.pad_token_id is not None else 0 for t in augment_tokenizers]

    @classmethod
    def select(cls, entries: list[tuple[Aligner, int]]) -> Aligner:
        """The alignment whose augmenting model m is ``entries[m]``: augmenting model i of that aligner (the
        alignment of several compositions over one anchor, ``ComposedModel.stack``). The aligners that tokenise
        must share the anchor's tokenizer."""
        texts = [a for a, _ in entries if a.has_tokenizers]
        anchors = {json.dumps(a.anchor_fingerprint, sort_keys=True) for a in texts}
        if len(anchors) > 1:
            raise ValueError("the compositions were built with different anchor tokenizers: stack compositions "
                             "of one anchor, each built with that anchor's tokenizer")
        out = cls.shared(len(entries)) if not texts else copy.copy(texts[0])
        fields = ("augment_fingerprints", "identity", "_augments", "_prefix", "augment_pad_ids")
        for name in fields:
            setattr(out, name, [getattr(a, name)[i] for a, i in entries])
        if texts:  # identity entries of a shared aligner read the anchor's ids: no tokenizer of their own
            out.augment_fingerprints = [fp or out.anchor_fingerprint for fp in out.augment_fingerprints]
        return out

    @property
    def needs_text(self) -> bool:
        return not all(self.identity)

    @property
    def has_tokenizers(self) -> bool:
        """Built from tokenizers (their fingerprints go into a checkpoint), not ``Aligner.shared``."""
        return self.anchor_fingerprint is not None

    def _decode(self, ids) -> str:
        return self._anchor.decode(list(ids), skip_special_tokens=True)

    def push(self, state: RowText, token_id: int) -> tuple[RowText, list[str]]:
        """Feed one anchor token; returns the new state and the pieces its text closed."""
        if token_id in self._special:
            return state, []
        window = state.window + (token_id,)
        text = self._decode(window)
        complete = not text.endswith(REPLACEMENT)
        stable = text if complete else text.rstrip(REPLACEMENT)
        # Characters are appended, never taken back: a decoder that rewrites earlier characters
        # (ByteFallback turns a valid byte into U+FFFD when an invalid one follows) only delays the
        # text until it is longer again, so the text is always a function of the ids so far.
        done = len(state.context_text) + state.pending_chars  # characters of ``text`` emitted already
        new_text = stable[done:]
        piece, last_is_text, closed = _cut(state.piece, state.last_is_text, new_text)
        chars = state.chars + len(new_text)
        if complete and len(stable) >= done:  # a clean point: the ids emitted since the context become the next context
            window = window[state.context :]
            return RowText(window, len(window), self._decode(window), 0, chars, piece, last_is_text), closed
        pending = max(done, len(stable)) - len(state.context_text)
        return RowText(window, state.context, state.context_text, pending, chars, piece, last_is_text), closed

    def tokenize_pieces(self, augment: int, pieces: list[str]) -> list[list[int]]:
        """Each piece's augmenting token ids (no special tokens)."""
        if not pieces:
            return []
        return [e.ids for e in self._augments[augment].encode_batch(pieces, add_special_tokens=False)]

    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        states: list[RowText] | None,
        seen: list[torch.Tensor] | None,
    ) -> tuple[list[RowText] | None, list[AugmentInputs]]:
        """Align new anchor tokens.

        Args:
            input_ids, attention_mask: [batch, seq] the new anchor tokens (all of them without a cache).
            states: per row RowText from the previous step, or None at the start of the sequences.
            seen: per augmenting model [batch] real augmenting tokens already fed (0 at the start).
        Returns:
            (per row new RowText, or None when every augmenting model is an identity;
             per augmenting model AugmentInputs for the new augmenting tokens, left-padded).
        """
        batch, seq = input_ids.shape
        device = input_ids.device
        if seen is None:
            seen = [torch.zeros(batch, dtype=torch.long, device=device) for _ in self._augments]
        real = attention_mask.bool()
        out: list[AugmentInputs | None] = [None] * len(self._augments)
        for m, same in enumerate(self.identity):
            if same:
                visible = seen[m][:, None] + real.long().cumsum(-1)
                out[m] = AugmentInputs(input_ids, attention_mask, visible, identity=True)
        if not self.needs_text:
            return None, out  # type: ignore[return-value]

        fresh = states is None
        states = list(states) if states is not None else [RowText() for _ in range(batch)]
        ids_rows, real_rows = input_ids.tolist(), real.tolist()
        closed_at: list[list[tuple[int, list[str]]]] = []  # per row: (position, pieces closed there)
        for b in range(batch):
            state, events = states[b], []
            for t in range(seq):
                if real_rows[b][t]:
                    state, closed = self.push(state, ids_rows[b][t])
                    if closed:
                        events.append((t, closed))
            states[b] = state
            closed_at.append(events)

        for m, same in enumerate(self.identity):
            if same:
                continue
            flat = [p for events in closed_at for _, pieces in events for p in pieces]
            tokens = iter(self.tokenize_pieces(m, flat))
            prefix = self._prefix[m] if fresh else []
            new_rows, visible = [], torch.empty(batch, seq, dtype=torch.long)
            for b in range(batch):
                row = list(prefix)
                count = [0] * seq  # new tokens visible from each position
                for t, pieces in closed_at[b]:
                    for _ in pieces:
                        row += next(tokens)
                    count[t] = len(row) - len(prefix)
                running = len(prefix)
                for t in range(seq):
                    running = max(running, len(prefix) + count[t])
                    count[t] = running
                new_rows.append(row)
                visible[b] = torch.tensor(count)
            ids, mask = pad_left(new_rows, self.augment_pad_ids[m])
            out[m] = AugmentInputs(ids.to(device), mask.to(device), seen[m][:, None] + visible.to(device))
        return states, out  # type: ignore[return-value]


# ---------------------------------------------------------------------------- masks and positions
def visible_mask(augment_mask: torch.Tensor, visible: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Which augmenting positions each anchor position may attend to.

    Args:
        augment_mask: [batch, seq_aug] all augmenting positions so far (cached + new), 0 at padding.
        visible: [batch, queries] real augmenting tokens each anchor query may see (``AugmentInputs.visible``).
        window: if set, only the last ``window`` of those.
    Returns:
        [batch, 1, queries, seq_aug] bool, True where attention is allowed. With the identity
        alignment (shared tokenizer) this is exactly ``bridge.cross_model_mask`` at every real position.
    """
    valid = augment_mask.bool()
    rank = valid.long().cumsum(-1) - 1  # [batch, seq_aug]: index among the real tokens
    allowed = valid[:, None, :] & (rank[:, None, :] < visible[:, :, None])
    if window is not None:
        allowed &= rank[:, None, :] >= visible[:, :, None] - window
    return allowed[:, None]


def key_positions(augment_mask: torch.Tensor, new: int, visible: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """Rotary positions [batch, new] of the last ``new`` augmenting positions: the anchor position of the
    first query that sees each one (one past the last query for a token no query sees).

    Args:
        augment_mask: [batch, seq_aug] all augmenting positions so far (cached + new).
        visible: [batch, queries]; query_positions: [batch, queries] the anchor queries' positions.
    """
    rank = (augment_mask.long().cumsum(-1) - 1)[:, augment_mask.shape[1] - new :].contiguous()
    first = torch.searchsorted(visible.contiguous(), rank, right=True)  # first query with visible > rank
    last = query_positions.shape[1] - 1
    pos = torch.gather(query_positions, 1, first.clamp(max=last))
    return torch.where(first > last, query_positions[:, last:] + 1, pos)


# ---------------------------------------------------------------------------- standalone (plain lists)
def align(anchor_ids: list[int], anchor_tokenizer, augment_tokenizer, aligner: Aligner | None = None) -> dict:
    """Align one sequence of anchor ids with one augmenting tokenizer.

    Returns a dict of plain lists: ``augment_ids`` (the augmenting tokens any anchor token can see:
    leading specials and the closed pieces), ``visible`` (per anchor token, how many of them it may
    attend to), ``anchor_char_ends`` (per anchor token), ``augment_char_ends`` (per augmenting
    token; 0 for specials) and ``text`` (the stable text of all anchor tokens).
    Pass an ``aligner`` built once to align many sequences faster.
    """
    aligner = aligner or Aligner(anchor_tokenizer, [augment_tokenizer], identity_when_shared=False)
    state, ends, pieces, closed_by = RowText(), [], [], []
    for token in anchor_ids:
        state, closed = aligner.push(state, int(token))
        ends.append(state.chars)
        pieces += closed
        closed_by.append(len(pieces))
    prefix = aligner._prefix[0]
    encodings = aligner._augments[0].encode_batch(pieces, add_special_tokens=False) if pieces else []
    augment_ids, augment_ends, sizes, start = list(prefix), [0] * len(prefix), [], 0
    for piece, enc in zip(pieces, encodings):
        augment_ids += enc.ids
        augment_ends += [start + e for _, e in enc.offsets]
        sizes.append(len(enc.ids))
        start += len(piece)
    cumulative = [len(prefix)]
    for n in sizes:
        cumulative.append(cumulative[-1] + n)
    full_text = "".join(pieces) + state.piece
    return {
        "augment_ids": augment_ids,
        "visible": [cumulative[k] for k in closed_by],
        "anchor_char_ends": ends,
        "augment_char_ends": augment_ends,
        "text": full_text,
    }


def align_text(text: str, anchor_tokenizer, augment_tokenizer, add_special_tokens: bool = True,
               aligner: Aligner | None = None) -> dict:
    """Tokenise ``text`` with the anchor tokenizer and align it (``align``); adds ``anchor_ids``."""
    anchor_ids = anchor_tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    return {"anchor_ids": list(anchor_ids), **align(anchor_ids, anchor_tokenizer, augment_tokenizer, aligner)}


def collate(augment_ids: list[list[int]], visible: list[list[int]], anchor_attention_mask: torch.Tensor,
            pad_id: int = 0) -> AugmentInputs:
    """Batch per-row ``align`` results for one augmenting model.

    Args:
        augment_ids: per row, the augmenting ids; visible: per row, one count per real anchor token.
        anchor_attention_mask: [batch, seq] the padded anchor batch's mask (any padding side).
    Returns:
        AugmentInputs with left-padded augmenting ids and ``visible`` [batch, seq] (a padding
        position repeats the count before it, 0 at the start).
    """
    ids, mask = pad_left(augment_ids, pad_id)
    real = anchor_attention_mask.bool().cpu()
    out = torch.zeros(real.shape, dtype=torch.long)
    for b, counts in enumerate(visible):
        if int(real[b].sum()) != len(counts):
            raise ValueError(f"row {b}: {len(counts)} visible counts for {int(real[b].sum())} real anchor tokens")
        out[b, real[b]] = torch.tensor(counts, dtype=torch.long)
        out[b] = torch.cummax(out[b], dim=0).values
    return AugmentInputs(ids, mask, out.to(anchor_attention_mask.device))
