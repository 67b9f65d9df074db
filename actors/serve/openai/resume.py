"""Running one request's token stream: the request timeout, resuming on another replica after a replica
died (prompt + the tokens so far), stop strings, and the mapping of failures to OpenAI errors."""

from __future__ import annotations

import asyncio
import logging
import re

from actors.serve.engine import GenerationRequest
from actors.serve.openai.detokenize import TextAssembler
from actors.serve.openai.errors import ApiError, DeadlineExceeded

log = logging.getLogger("calm_ray.api")

# what a message from another process may carry that a client must not see: Ray's task header
# "ray::Deployment.method() (pid=12, ip=10.0.0.3, actor_id=...)", addresses, file paths, long hex ids
_INTERNALS = re.compile(r"ray::\S+|\((?:pid|ip)=[^)]*\)|\b(?:pid|ip|actor_id|task_id|node_id)=\S+"
                        r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b|(?:[A-Za-z]:)?(?:[/\\][\w.\-]+){2,}[/\\]?"
                        r"|\b[0-9a-f]{16,}\b")


def public_reason(e: BaseException, limit: int = 200) -> str:
    """``"Type: first line of the message"`` of an exception, fit for a client: a RayTaskError gives its cause,
    only the first line is kept (no traceback), pids, addresses, paths and ids are cut out."""
    cause = getattr(e, "cause", None)  # RayTaskError wraps the exception the replica raised
    if isinstance(cause, BaseException):
        e = cause
    lines = str(e).strip().splitlines()
    text = re.sub(r"\s{2,}", " ", _INTERNALS.sub("", lines[0] if lines else "")).strip(" :,")
    if len(text) > limit:
        text = text[:limit].rstrip() + "..."
    name = type(e).__name__
    return f"{name}: {text}" if text else name


async def token_pieces(frontend, p, rid: str):
    """Async iterator of (text delta, finish_reason or None, completion tokens so far) for request ``p``.

    Runs the token stream with the request timeout, resumes it on another replica after a
    replica death, applies stop strings; raises ApiError for failures.
    """
    text = TextAssembler(frontend.tokenizer, p.stop)
    generated: list[int] = []
    deadline = asyncio.get_running_loop().time() + frontend.limits.request_timeout_s
    attempts = 0
    while True:
        request = GenerationRequest(
            request_id=f"{rid}-{attempts}",
            prompt_ids=p.prompt_ids + generated,
            max_tokens=p.max_tokens - len(generated),
            temperature=p.temperature,
            top_p=p.top_p,
            seed=p.seed,
            eos_ids=[] if p.ignore_eos else frontend.eos_ids,
        )
        stream = None
        settled = False  # the stream ended or failed by itself: nothing to cancel
        try:
            stream = frontend.open_stream(request)
            while True:
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
                generated += chunk["token_ids"]
                finish = chunk["finish_reason"]
                settled = finish is not None
                delta = text.add(chunk["token_ids"])
                if text.stopped:
                    yield delta, "stop", len(generated)
                    return
                if finish is not None:
                    yield delta + text.finish(), finish, len(generated)
                    return
                if delta:
                    yield delta, None, len(generated)
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
            if attempts > frontend.limits.max_retries:
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
