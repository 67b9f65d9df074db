"""Constrained decoding: a row's output held to a grammar (a JSON Schema, any JSON object, a tool call).

The grammar engine is llguidance. Per row a matcher advances with each token the row emits; before the row's
next token is chosen, the matcher's set of allowed tokens masks its logits (before logit_bias, the penalties
and sampling: ``DecodeEngine._sample``). Rows with and without grammars share one batch. The grammar is on the
anchor's tokens, the ones emitted; across tokenizers the augmenting side never sees it.

    grammars = Grammars(anchor_tokenizer, vocab_size)    # once per process (about 2 s for a 49k vocabulary)
    grammar = json_grammar(schema)                      # text: travels in GenerationRequest.grammar
    compiled = await grammars.compile_async(grammar)    # GrammarError naming the problem or past max_compile_s
    matcher = grammars.matcher(compiled)                # per row: a copy of the compiled grammar
    allowed, errors = grammars.masks([matcher, ...])    # bool [rows, vocab]: each row's acceptable next tokens
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

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

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
    JSON mode). Raises GrammarError for what is not a schema; unknown keywords are found by ``Grammars.compile``."""
    from llguidance import LLMatcher

    if schema is False:
        raise GrammarError("the schema is false, which no value matches: send a schema some JSON satisfies")
    try:
        return LLMatcher.grammar_from_json_schema({} if schema is True else schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"not a JSON Schema: {e}") from None


class Grammars:
    """The anchor tokenizer's view for llguidance, and the compiled grammars of this process.

    Compiled grammars are cached by their text (LRU, ``CACHED_GRAMMARS``), and so are refusals (a client that
    resends a schema slow to compile pays nothing the second time). Compiles run on one dedicated thread
    (``compile_async``), never on the thread pool the model calls use, so a burst of new schemas queues behind
    itself instead of delaying decode steps. The cache is shared by that thread and the event loop: a lock
    guards it.

    Args:
        tokenizer: the anchor's Hugging Face (fast) tokenizer: grammars match the text of its tokens.
        vocab_size: the width of the model's logits (its config's vocab_size; may exceed the tokenizer's).
        max_compile_s: the most CPU seconds a grammar may take to compile and give its first mask.
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
        self._refused: OrderedDict[str, GrammarError] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self._bits = torch.arange(32, dtype=torch.int32)
        # the first mask over a vocabulary builds llguidance's token tables once per process (1.8 s for 49,152
        # tokens): paid here, at start-up, not by the first request's compile limit
        self._first(json_grammar({"type": "object"}))

    def cached(self, grammar: str):
        """The compiled matcher of ``grammar`` if this process has it (GrammarError if it was refused), else None."""
        with self._lock:
            if grammar in self._refused:
                raise self._refused[grammar]
            template = self._compiled.get(grammar)
            if template is not None:
                self._compiled.move_to_end(grammar)
            return template

    def compile(self, grammar: str):
        """The compiled matcher of ``grammar``, its first mask computed (which builds its lexer), cached. Raises
        GrammarError for a grammar in error or slower than ``max_compile_s``. Slow for large grammars: from the
        event loop, ``await compile_async``."""
        template = self.cached(grammar)
        if template is not None:
            return template
        start = time.thread_time()  # CPU time of this thread: what the grammar costs, however loaded the machine
        try:
            template = self._first(grammar)
            took = time.thread_time() - start
            if took > self.max_compile_s:
                raise GrammarError(f"compiling it took {took:.2f} s, more than this server allows "
                                   f"({self.max_compile_s:g} s): simplify it (fewer enum values or alternatives)")
        except GrammarError as e:
            with self._lock:
                _remember(self._refused, grammar, e)
            raise
        with self._lock:
            _remember(self._compiled, grammar, template)
        return template

    async def compile_async(self, grammar: str):
        """``compile`` on the dedicated compile thread (llguidance releases the GIL), unless it is cached."""
        template = self.cached(grammar)
        if template is not None:
            return template
        return await asyncio.get_running_loop().run_in_executor(self._compiler, self.compile, grammar)

    def _first(self, grammar: str):
        """A matcher of ``grammar`` whose first mask was computed."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self.tokenizer, grammar, log_level=0, limits=self.limits)
        if matcher.is_error():
            raise GrammarError(_clean(matcher.get_error()))
        self.masks([matcher])
        return matcher

    def matcher(self, compiled, generated: list[int] = ()):
        """A new matcher of a grammar (its text, or what ``compile`` returned) that has consumed ``generated`` (a
        resumed row's tokens so far)."""
        template = self.compile(compiled) if isinstance(compiled, str) else compiled
        matcher = template.deep_copy()
        if generated and not matcher.consume_tokens(list(generated)):
            raise GrammarError(f"the tokens generated so far do not match the grammar: {_clean(matcher.get_error())}")
        return matcher

    def masks(self, matchers: list) -> tuple[torch.Tensor, list[GrammarError | None]]:
        """bool [len(matchers), vocab_size]: the tokens each matcher accepts next (the end-of-sequence token once
        its text is complete), filled once for all of them; and per matcher None, or the GrammarError of one in
        an error state (it accepts nothing)."""
        from llguidance.torch import fill_next_token_bitmask

        words = torch.zeros(len(matchers), (self.vocab_size + 31) // 32, dtype=torch.int32)
        errors: list[GrammarError | None] = []
        for i, matcher in enumerate(matchers):
            fill_next_token_bitmask(matcher, words, i)
            errors.append(GrammarError(f"the output cannot continue under its grammar: {_clean(matcher.get_error())}")
                          if matcher.is_error() else None)
        bits = (words[:, :, None] >> self._bits) & 1
        return bits.view(len(matchers), -1)[:, : self.vocab_size].bool(), errors


def _remember(cache: OrderedDict, key: str, value) -> None:
    cache[key] = value
    cache.move_to_end(key)
    if len(cache) > CACHED_GRAMMARS:
        cache.popitem(last=False)


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

