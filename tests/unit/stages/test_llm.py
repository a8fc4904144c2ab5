"""actors/llm.py against a real HTTP server on loopback: the session the LLM stages give
ray.data.llm retries what is worth retrying and answers a final failure with an error body;
the online client shares the policy and the parsing of choices[0]."""

import asyncio
import json

from actors.llm import TolerantSession, chat_completion, completion
from tests.helpers import ScriptedEndpoint

BUSY = (503, "text/plain", b"busy")
REFUSED = (401, "application/json", b'{"error": "bad key"}')


def _ok(content) -> tuple[int, str, bytes]:
    body = {"choices": [{"message": {"content": content}}]}
    return 200, "application/json", json.dumps(body).encode()


async def _post_through_session(url: str, retries: int):
    async with TolerantSession(retries, 0.01) as session:
        response = await session.post(url, json={"model": "m", "messages": []})
        return response.status, await response.json()


def test_the_session_retries_busy_answers_then_returns_the_answer():
    endpoint = ScriptedEndpoint([BUSY, BUSY, _ok("a lovely red star")])
    try:
        status, body = asyncio.run(_post_through_session(endpoint.url, retries=2))
    finally:
        endpoint.close()
    assert len(endpoint.calls) == 3 and status == 200
    assert completion({"http_response": body}, "http") == ("a lovely red star", None)


def test_the_session_answers_a_final_failure_with_an_error_body_not_an_exception():
    endpoint = ScriptedEndpoint([BUSY])
    try:
        _, body = asyncio.run(_post_through_session(endpoint.url, retries=1))
    finally:
        endpoint.close()
    assert len(endpoint.calls) == 2
    text, error = completion({"http_response": body}, "http")
    assert text is None and "HTTP 503" in str(error) and "2 attempts" in str(error)


def test_a_refusal_is_not_retried_and_the_answer_is_parsed_once():
    async def ask(url):
        import aiohttp

        async with aiohttp.ClientSession() as session:
            return await chat_completion(session, url, {"messages": []}, {}, 3, 0.01)

    refused, good = ScriptedEndpoint([REFUSED]), ScriptedEndpoint([_ok("fine")])
    malformed = ScriptedEndpoint([(200, "text/html", b"<html>502</html>")])
    try:
        assert asyncio.run(ask(refused.url)) == (None, "HTTP 401")
        assert asyncio.run(ask(good.url)) == ("fine", None)
        text, error = asyncio.run(ask(malformed.url))
    finally:
        for e in (refused, good, malformed):
            e.close()
    assert len(refused.calls) == 1 and text is None and "not JSON" in error
