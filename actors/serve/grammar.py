"""Constrained decoding: a row's output held to a grammar (a JSON Schema, any JSON object, a tool call).

The grammar engine is llguidance. Per row a matcher advances with each token the row emits; before the row's
next token is chosen, the matcher's set of allowed tokens masks its logits (before logit_bias, the penalties
and sampling: ``DecodeEngine._sample``). Rows with and without grammars share one batch. The grammar is on the
anchor's tokens, the ones emitted; across tokenizers the augmenting side never sees it.

    grammars = Grammars(anchor_tokenizer, vocab_size)    # once per process (about 0.5 s for a 49k vocabulary)
    grammar = json_grammar(schema)                      # text: travels in GenerationRequest.grammar
    grammars.check(grammar)                             # GrammarError naming the problem (the frontend: a 400)
    grammars.compile(grammar)                           # GrammarError past max_compile_s (a worker thread's job)
    matcher = grammars.matcher(grammar)                 # per row: compiled once per grammar, copied per row
    allowed = grammars.allowed(matcher)                 # bool [vocab]: the row's acceptable next tokens
    matcher.consume_token(token)

Why llguidance rather than xgrammar (both are what vLLM and SGLang use):
- it refuses a JSON Schema keyword it cannot enforce and names it (``Unimplemented keys: ["not"]``), so an
  API that promises "valid against the schema" never silently drops a constraint;
- it is lazy: no per-vocabulary precomputation per grammar, so the schemas of API requests compile in about a
  millisecond, and each step's mask costs microseconds on the CPU;
- its work per step is bounded by "fuel" (``_limits``). What fuel does not bound, building a grammar's lexer
  on its first mask, ``compile`` times (CPU seconds, in a worker thread) and refuses past ``max_compile_s``: a
  hostile schema costs a 400, never a stalled batch. Measured on this project's CPU over SmolLM2's 49,152
  tokens: an enum of 3,000 words 22 ms, an object of 500 properties 49 ms; the token tables every grammar
  shares take 1.8 s once per process, at start-up (``Grammars.__init__``);
- one wheel without dependencies, the same on CPU and GPU.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import torch

log = logging.getLogger(__name__)

JSON_OPTIONS = {  # compact, deterministic JSON: one space after ',' and ':', no free whitespace for a small
    "whitespace_flexible": False,  # model to loop in (and tool-call arguments start where the text says)
    "item_separator": ", ",
    "key_separator": ": ",
}
CACHED_GRAMMARS = 256  # compiled grammars kept per process (least recently used dropped)
MAX_COMPILE_S = 1.0  # a grammar's compile and first mask, in CPU seconds; longer is refused (GrammarError: a 400)


def _limits():
    import llguidance

    # llguidance's defaults, stated: ~20 ms of regex work to compile, ~14 ms of lexer work and 50,000 parser items
    # per token; past them the matcher errs (a GrammarError) rather than working on
    return llguidance.LLParserLimits(initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, step_max_items=50_000,
                                     max_grammar_size=500_000)


class GrammarError(ValueError):
    """A grammar that cannot be compiled or matched; the message names the problem."""


def json_grammar(schema: dict | bool) -> str:
    """The llguidance grammar of JSON text valid against ``schema`` (a JSON Schema; ``{"type": "object"}`` is
    JSON mode). Raises GrammarError for what is not a schema; unknown keywords are found by ``Grammars.check``."""
    from llguidance import LLMatcher

    try:
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"not a JSON Schema: {e}") from None


class Grammars:
    """The anchor tokenizer's view for llguidance, and the compiled grammars of this process.

    Args:
        tokenizer: the anchor's Hugging Face (fast) tokenizer: grammars match the text of its tokens.
        vocab_size: the width of the model's logits (its config's vocab_size; may exceed the tokenizer's).
        max_compile_s: the longest a grammar may take to compile and give its first mask.
    """

    def __init__(self, tokenizer, vocab_size: int, max_compile_s: float = MAX_COMPILE_S):
        import llguidance.hf

        self.vocab_size = vocab_size
        eos = tokenizer.eos_token_id
        try:  # llguidance reads tokenizer.json itself (byte-level BPE, SentencePiece, ...)
            self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        except ValueError:  # a decoder it does not know (a Fuse decoder, say): each token's text, decoded alone
            self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_DecodedTokens(tokenizer, vocab_size)))
        self.limits = _limits()
        self.max_compile_s = max_compile_s
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._bits = torch.arange(32, dtype=torch.int32)
        # the first mask over a vocabulary builds llguidance's token tables once per process (1.8 s for 49,152
        # tokens): paid here, at start-up, not by the first request's compile limit
        self._first(json_grammar({"type": "object"}))

    def check(self, grammar: str) -> None:
        """Raises GrammarError naming what llguidance refuses: an unimplemented keyword, a bad reference, a
        grammar past the limits."""
        from llguidance import LLMatcher

        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer, limits=self.limits)
        if is_error:
            raise GrammarError(_clean(messages[0]))

    def is_compiled(self, grammar: str) -> bool:
        return grammar in self._compiled

    def compile(self, grammar: str):
        """The compiled matcher of ``grammar``, its first mask computed (which builds its lexer): cached, so later
        rows of it start at once. Raises GrammarError for a grammar in error or slower than ``max_compile_s``.
        Slow for large grammars: call it from a worker thread (llguidance releases the GIL)."""
        template = self._compiled.get(grammar)
        if template is not None:
            self._compiled.move_to_end(grammar)
            return template
        start = time.thread_time()  # CPU time of this thread: what the grammar costs, however loaded the machine
        template = self._first(grammar)
        took = time.thread_time() - start
        if took > self.max_compile_s:
            raise GrammarError(f"compiling it took {took:.2f} s, more than this server allows "
                               f"({self.max_compile_s:g} s): simplify it (fewer enum values or alternatives)")
        self._compiled[grammar] = template
        if len(self._compiled) > CACHED_GRAMMARS:
            self._compiled.popitem(last=False)
        return template

    def _first(self, grammar: str):
        """A matcher of ``grammar`` whose first mask was computed."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self.tokenizer, grammar, log_level=0, limits=self.limits)
        if matcher.is_error():
            raise GrammarError(_clean(matcher.get_error()))
        self.allowed(matcher)
        return matcher

    def matcher(self, grammar: str, generated: list[int] = ()):
        """A new matcher of ``grammar`` that has consumed ``generated`` (a resumed row's tokens so far)."""
        matcher = self.compile(grammar).deep_copy()
        if generated and not matcher.consume_tokens(list(generated)):
            raise GrammarError(f"the tokens generated so far do not match the grammar: {_clean(matcher.get_error())}")
        return matcher

    def allowed(self, matcher) -> torch.Tensor:
        """bool [vocab_size]: the tokens ``matcher`` accepts next (the end-of-sequence token once the text is
        complete). Raises GrammarError for a matcher in an error state (it accepts nothing)."""
        from llguidance.torch import fill_next_token_bitmask

        words = torch.zeros(1, (self.vocab_size + 31) // 32, dtype=torch.int32)
        fill_next_token_bitmask(matcher, words, 0)
        if matcher.is_error():
            raise GrammarError(f"the output cannot continue under its grammar: {_clean(matcher.get_error())}")
        return ((words[0, :, None] >> self._bits) & 1).view(-1)[: self.vocab_size].bool()


class _DecodedTokens:
    """llguidance's generic tokenizer interface over a Hugging Face tokenizer: each token's bytes are its text
    decoded alone (right for tokenizers whose tokens are whole characters); special tokens are marked as
    llguidance expects (a 0xFF byte first), so no grammar ever matches them as text."""

    def __init__(self, tokenizer, vocab_size: int):
        special = set(tokenizer.all_special_ids)
        self.tokens = [
            b"\xff" + str(tokenizer.convert_ids_to_tokens(i)).encode() if i in special or i >= len(tokenizer)
            else tokenizer.decode([i]).encode("utf-8") for i in range(vocab_size)]
        self.eos_token_id, self.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
        self.special_token_ids = sorted(i for i in special if i < vocab_size)
        self._encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, text: str) -> list[int]:
        return self._encode(text)


def grammars_for(tokenizer, vocab_size: int) -> Grammars | None:
    """``Grammars`` of ``tokenizer``, or None (constrained decoding off, logged once) where llguidance cannot read
    it: a slow (Python) tokenizer, or llguidance not installed."""
    try:
        return Grammars(tokenizer, vocab_size)
    except Exception as e:  # noqa: BLE001 - the server still serves free text
        log.warning("constrained decoding (response_format, tools) is off: llguidance cannot read the anchor's "
                    "tokenizer (%s: %s)", type(e).__name__, e)
        return None


def consume(matcher, token: int) -> None:
    """Advance a row's matcher by the token it emitted; GrammarError when the grammar cannot take it."""
    if not matcher.consume_token(token):
        raise GrammarError(f"token {token} does not continue the grammar: {_clean(matcher.get_error())}")


def _clean(message: str) -> str:
    """llguidance's message on one line, without its internal prefixes."""
    return " ".join(str(message).split()).removeprefix("Error: ")

