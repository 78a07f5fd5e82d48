"""Every error path answers OpenAI's error body with the right status, and the server keeps serving."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.conftest import ServerProcess, chat_body


def assert_error(r: httpx.Response, status: int, *, param: str | None = None, says: str = "") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text and 'File "' not in r.text
    if param is not None:
        assert err["param"] == param, err
    assert says.lower() in err["message"].lower(), err["message"]
    return err


@pytest.mark.parametrize(
    "body, param, says",
    [
        ({"model": "base"}, "messages", "required"),
        ({"model": "base", "messages": []}, "messages", "at least 1"),
        ({"model": "base", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", ""),
        ({"model": "base", "messages": [{"role": "user"}]}, "messages[0].content", "required"),
        ({"model": "base", "messages": [{"role": "user", "content": 5}]}, "messages[0].content", ""),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature", ""),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature", ""),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens", ""),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}, "max_tokens", "limit"),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p", ""),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "stop": ["s"] * 100}, "stop", "at most"),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "n": 17}, "n", ""),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}],
          "tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools[0].function.name", "letters"),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}],
          "functions": [{"name": "f"}]}, "functions", "not supported"),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "audio": {"voice": "alloy", "format": "wav"}},
         "audio", "not supported"),
        ({"model": "base", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
         "messages[0].content[0].type", "not supported"),
        ({"model": "base", "messages": [{"role": "function", "content": "x", "name": "f"}]},
         "messages[0].role", "not supported"),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "modalities": ["text", "audio"]},
         "modalities", "not supported"),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "adapters": [{"scale": 1}]},
         "adapters[0].name", "required"),
        ({"model": "", "messages": [{"role": "user", "content": "x"}]}, "model", ""),
    ],
)
def test_invalid_requests_get_400_naming_the_field(server: ServerProcess, body: dict, param: str, says: str) -> None:
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=body)
    err = assert_error(r, 400, param=param, says=says)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe", b'{"model": NaN}', b"null"])
def test_broken_json_is_400(server: ServerProcess, raw: bytes) -> None:
    with server.http() as http:
        r = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_nan_and_infinity_are_refused(server: ServerProcess) -> None:
    raw = b'{"model": "base", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    with server.http() as http:
        assert_error(http.post("/v1/chat/completions", content=raw), 400, param="temperature")
        raw = raw.replace(b"NaN", b"Infinity")
        assert_error(http.post("/v1/chat/completions", content=raw), 400, param="temperature")


@pytest.mark.parametrize("model", ["nope", "style-a@99", "../../etc/passwd", "style-a@x", "a" * 600])
def test_unknown_model_route_or_adapter_is_404(server: ServerProcess, model: str) -> None:
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=chat_body(model=model))
    if len(model) > 512:
        assert_error(r, 400, param="model")
    else:
        assert_error(r, 404, param="model")


def test_unknown_per_request_adapter_is_404(server: ServerProcess) -> None:
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=chat_body(adapters=[{"name": "ghost"}]))
    assert_error(r, 404, param="adapters", says="ghost")


def test_unknown_endpoint_and_method_are_openai_shaped(server: ServerProcess) -> None:
    with server.http() as http:
        assert_error(http.get("/v1/nothing-here"), 404)
        assert_error(http.get("/v1/chat/completions"), 405)


def test_prompt_over_the_context_is_400_with_both_numbers(server: ServerProcess) -> None:
    long_text = "word " * 1200  # the test server has 1024 tokens per sequence
    for stream in (False, True):
        with server.http() as http:
            r = http.post("/v1/chat/completions", json=chat_body(long_text, max_tokens=10, stream=stream))
        err = assert_error(r, 400, param="messages")
        assert err["code"] == "context_length_exceeded"
        assert "1024" in err["message"] and "max_tokens" in err["message"]
    # fits alone, but not with the asked-for answer length
    medium = "word " * 900
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=chat_body(medium, max_tokens=500))
    err = assert_error(r, 400, says="500")


def test_openai_client_raises_typed_errors(server: ServerProcess) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], n=17)


def test_body_too_large_is_413(fresh_server) -> None:
    srv = fresh_server(max_body_bytes=4096)
    with srv.http() as http:
        r = http.post("/v1/chat/completions", json=chat_body("x" * 10_000))
    assert_error(r, 413, says="4096")
    with srv.http() as http:  # still serving
        assert http.post("/v1/chat/completions", json=chat_body(max_tokens=2)).status_code == 200


def test_api_keys_constant_time_and_public_endpoints(fresh_server) -> None:
    srv = fresh_server(api_keys=["sk-user-1", "sk-user-2"], admin_keys=["sk-admin"], metrics_public=False)
    with srv.http() as http:
        err = assert_error(http.post("/v1/chat/completions", json=chat_body()), 401)
        assert err["type"] == "authentication_error"
        assert_error(http.post("/v1/chat/completions", json=chat_body(),
                               headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(http.get("/v1/models"), 401)
        assert_error(http.get("/metrics"), 401)
        assert http.get("/health").status_code == 200
        assert http.get("/ready").status_code == 200
        ok = http.post("/v1/chat/completions", json=chat_body(max_tokens=2),
                       headers={"Authorization": "Bearer sk-user-2"})
        assert ok.status_code == 200
        assert http.get("/metrics", headers={"Authorization": "Bearer sk-user-1"}).status_code == 200
        # reload is an admin action
        assert_error(http.post("/v1/adapters/reload", headers={"Authorization": "Bearer sk-user-1"}), 401)
        assert http.post("/v1/adapters/reload", headers={"Authorization": "Bearer sk-admin"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        srv.client(api_key="wrong").models.list()
    assert srv.client(api_key="sk-user-1").models.list().data
    assert "sk-user-1" not in srv.logs() and "sk-admin" not in srv.logs()


def test_queue_full_is_429_with_retry_after_and_admitted_requests_finish(fresh_server) -> None:
    srv = fresh_server(parallel=1, queue_max=1)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as http:
            body = chat_body("Tell me a long story about the sea.", max_tokens=60)
            return await asyncio.gather(*[http.post("/v1/chat/completions", json=body) for _ in range(6)])

    responses = asyncio.run(run())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and 429 in codes, codes
    assert set(codes) <= {200, 429}
    rejected = next(r for r in responses if r.status_code == 429)
    assert_error(rejected, 429)
    assert rejected.headers["retry-after"] == "1"
    for r in responses:
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] > 0
