"""Running one request's token stream: the request timeout, resuming on another replica after a replica
died (prompt + the tokens so far), stop strings, and the mapping of failures to OpenAI errors."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

from actors.serve.openai.detokenize import TextAssembler
from actors.serve.openai.errors import ApiError, DeadlineExceeded
from actors.serve.reasons import public_reason

log = logging.getLogger("calm_ray.api")

@dataclass
class Piece:
    """What one step of a request's token stream brings for one choice."""

    index: int  # which of the request's n choices
    text: str  # text delta (held back while it may grow into a stop string)
    finish: str | None  # "stop" / "length" on the choice's last piece
    completion_tokens: int  # the choice's tokens so far
    logprobs: list[dict] | None = None  # the engine's entries for the tokens this piece brings
    prompt_logprobs: list | None = None  # on the choice's first piece, with echo + logprobs


async def token_pieces(frontend, p, rid: str):
    """Async iterator of ``Piece`` for request ``p`` (one or more per engine chunk, every choice interleaved).

    Runs the token stream with the request timeout, resumes it on another replica after a
    replica death (n == 1 only: n > 1 answers 503), applies stop strings; raises ApiError for failures.
    """
    texts = [TextAssembler(frontend.tokenizer, p.stop) for _ in range(p.n)]
    generated: list[list[int]] = [[] for _ in range(p.n)]
    open_choices = set(range(p.n))  # choices still being answered
    deadline = asyncio.get_running_loop().time() + frontend.limits.request_timeout_s
    attempts = 0
    while True:
        request = replace(  # a resume (n == 1) continues from the prompt + the tokens so far
            p.generation,
            request_id=f"{rid}-{attempts}",
            prompt_ids=p.prompt_ids + generated[0],
            max_tokens=p.generation.max_tokens - len(generated[0]),
            prompt_logprobs=p.generation.prompt_logprobs and not generated[0],
            grammar_generated=list(generated[0]) if p.generation.grammar is not None else [],
        )
        stream = None
        settled = False  # the stream ended or failed by itself: nothing to cancel
        running = set(open_choices)  # choices the engine still decodes (a stop string leaves it decoding)
        try:
            stream = frontend.open_stream(request)
            while open_choices:
                scope = asyncio.timeout_at(deadline)
                try:
                    async with scope:  # around the await only: never around a yield
                        chunk = await stream.__anext__()
                except StopAsyncIteration:
                    settled = True
                    raise ApiError(500, "the token stream ended without a finish reason") from None
                except asyncio.TimeoutError as e:
                    if scope.expired():
                        raise DeadlineExceeded from None
                    settled = True
                    raise ApiError(503, f"the model did not answer in time ({type(e).__name__}): retry later",
                                   type_="overloaded") from None
                except BaseException as e:
                    settled = not isinstance(e, asyncio.CancelledError)
                    raise
                i = chunk.get("index", 0)
                if chunk["finish_reason"] is not None:
                    running.discard(i)
                settled = not running
                if i not in open_choices:  # a choice cut at a stop string: the engine decodes on, unseen
                    continue
                generated[i] += chunk["token_ids"]
                finish = chunk["finish_reason"]
                text = texts[i]
                delta = text.add(chunk["token_ids"])
                piece = Piece(i, delta, None, len(generated[i]), chunk.get("logprobs"), chunk.get("prompt_logprobs"))
                if text.stopped:
                    piece.finish = "stop"
                elif finish is not None:
                    piece.text, piece.finish = delta + text.finish(), finish
                if piece.finish is not None:
                    open_choices.discard(i)
                if piece.text or piece.finish or piece.logprobs or piece.prompt_logprobs:
                    yield piece
            return
        except DeadlineExceeded:
            frontend.counters["timeouts"] += 1
            raise ApiError(504, f"the request took longer than the server's request timeout of "
                                f"{frontend.limits.request_timeout_s:g} s: lower max_tokens", type_="timeout") from None
        except frontend.overloaded:
            raise ApiError(503, "the server is at capacity (request queue full): retry later",
                           type_="overloaded") from None
        except frontend.retryable as e:
            attempts += 1
            frontend.counters["retries"] += 1
            if attempts > frontend.limits.max_retries or p.n > 1:
                raise ApiError(503, f"the replica serving this request failed {attempts} times "
                                    f"({type(e).__name__}): retry later") from None
            continue
        except ApiError:
            raise
        except ValueError as e:
            raise ApiError(400, public_reason(e).partition(": ")[2] or "the request was refused") from None
        except Exception as e:  # noqa: BLE001 - answered as a 500 with the reason, one log line
            reason = public_reason(e)
            log.warning("request %s failed: %s", rid, reason)
            log.debug("request %s traceback", rid, exc_info=e)
            raise ApiError(500, f"generation failed ({reason}); request id {rid}") from None
        finally:
            if stream is not None and not settled:  # stop string, timeout or a client that left
                await _close(stream)


async def _close(stream) -> None:
    """Stop a token stream early (best effort): Serve's response generators cancel, async generators close."""
    try:
        cancel = getattr(stream, "cancel", None)
        if cancel is not None:
            cancel()
        elif getattr(stream, "aclose", None) is not None:
            await stream.aclose()
    except Exception:  # noqa: BLE001 - the request is over either way
        pass
