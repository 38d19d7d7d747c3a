"""End-to-end: the official `openai` Python client against a running `modelpool serve`.

Run by scripts/e2e-openai.sh, which starts the server with the fake backend, a 6GB limit and a
100 ms token delay, and passes its URL in MODELPOOL_URL. Exits non-zero if any check fails.
"""

import os
import sys
import threading
import re
import time
import urllib.error
import urllib.request

import openai
from runner import run
from openai import OpenAI

BASE = os.environ["MODELPOOL_URL"].rstrip("/") + "/v1"
API_KEY = os.environ["MODELPOOL_E2E_API_KEY"]
ADMIN_KEY = os.environ["MODELPOOL_E2E_ADMIN_KEY"]
client = OpenAI(base_url=BASE, api_key=API_KEY, max_retries=0, timeout=30)

CHAT = "qwen2.5-0.5b-instruct"  # 0.31 GB
BIG = "llama-3-8b-instruct"  # 5.0 GB
MID = "llama-3.2-3b-instruct"  # 2.0 GB
EMBED = "nomic-embed-text-v1.5"  # 0.3 GB
MSGS = [{"role": "user", "content": "Say hello"}]


def test_models_list():
    ids = [m.id for m in client.models.list()]
    for m in (CHAT, BIG, MID, EMBED):
        assert m in ids, (m, ids)
    got = client.models.retrieve(CHAT)
    assert got.id == CHAT and got.object == "model", got


def test_chat():
    r = client.chat.completions.create(model=CHAT, messages=MSGS, max_tokens=5)
    assert r.object == "chat.completion", r
    assert r.choices[0].message.role == "assistant"
    assert len(r.choices[0].message.content.split()) == 5, r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.total_tokens > 5, r.usage


def test_streaming_chat():
    stream = client.chat.completions.create(
        model=CHAT, messages=MSGS, stream=True, stream_options={"include_usage": True}
    )
    text, finish, usage, roles = "", None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert roles == ["assistant"], roles
    assert finish == "stop", finish
    assert usage is not None and usage.completion_tokens == len(text.split()) == 8, (usage, text)
    plain = client.chat.completions.create(model=CHAT, messages=MSGS)
    assert plain.choices[0].message.content == text, "stream and plain answers agree"


def test_completions():
    r = client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=4)
    assert r.object == "text_completion"
    assert len(r.choices[0].text.split()) == 4, r.choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=4, stream=True) if c.choices]
    assert "".join(pieces) == r.choices[0].text, pieces


def test_embeddings():
    # The client asks for base64 by default and decodes it.
    r = client.embeddings.create(model=EMBED, input=["hello world", "goodbye"])
    assert len(r.data) == 2 and r.data[1].index == 1
    v = r.data[0].embedding
    assert len(v) == 384, len(v)
    assert abs(sum(x * x for x in v) - 1.0) < 1e-3
    f = client.embeddings.create(model=EMBED, input="hello world", encoding_format="float")
    assert all(abs(a - b) < 1e-6 for a, b in zip(f.data[0].embedding, v)), "float and base64 agree"


def test_errors():
    try:
        client.chat.completions.create(model="no-such-model", messages=MSGS)
        raise AssertionError("expected 404")
    except openai.NotFoundError as e:
        assert e.status_code == 404 and e.code == "model_not_found", (e.status_code, e.code)
    try:
        client.embeddings.create(model=CHAT, input="x")
        raise AssertionError("expected 400")
    except openai.BadRequestError as e:
        assert e.code == "wrong_model_type" and e.param == "model", e.body
    try:
        client.chat.completions.create(model=CHAT, messages=MSGS, temperature=9)
        raise AssertionError("expected 400")
    except openai.BadRequestError as e:
        assert e.param == "temperature", e.body


def test_503_insufficient_memory_with_retry_after():
    # Hold BIG (5 GB) busy with a slow stream; MID (2 GB) cannot fit in 6 GB meanwhile.
    stream = client.chat.completions.create(model=BIG, messages=MSGS, stream=True)
    first = next(iter(stream))  # the role chunk: the request holds its lease now
    assert first.choices[0].delta.role == "assistant"
    try:
        client.chat.completions.create(model=MID, messages=MSGS)
        raise AssertionError("expected 503")
    except openai.InternalServerError as e:
        assert e.status_code == 503, e.status_code
        assert e.code == "insufficient_memory", e.body
        # 2.0 GB of weights and the KV cache of its context (512 max tokens by default).
        assert "Insufficient memory: need 2." in e.message, e.message
        assert re.search(r"\(2\.0GB of weights \+ \d+MB of KV cache for this request's context\)", e.message), e.message
        retry = e.response.headers.get("retry-after")
        assert retry is not None and int(retry) >= 1, dict(e.response.headers)
    finally:
        stream.close()
    # Once the stream is closed the server notices the disconnect, releases the lease, and MID
    # loads (evicting BIG). Noticing takes a moment: retry briefly, as a client would.
    deadline = time.monotonic() + 5
    while True:
        try:
            r = client.chat.completions.create(model=MID, messages=MSGS, max_tokens=2)
            break
        except openai.InternalServerError as e:
            assert e.code == "insufficient_memory", e.body
            assert time.monotonic() < deadline, "lease not released after the stream closed"
            time.sleep(0.05)
    assert r.choices[0].finish_reason == "length"


def test_503_model_too_large_has_no_retry_after():
    try:
        client.chat.completions.create(model="llama-3-70b-instruct", messages=MSGS)
        raise AssertionError("expected 503")
    except openai.InternalServerError as e:
        assert e.status_code == 503 and e.code == "model_too_large", e.body
        assert e.response.headers.get("retry-after") is None


def test_model_too_large_costs_one_request_with_the_clients_default_retries():
    # The client retries 503s twice by default; `x-should-retry: false` stops it.
    root = os.environ["MODELPOOL_URL"].rstrip("/")

    def refused():
        req = urllib.request.Request(root + "/admin/pool")
        req.add_header("Authorization", f"Bearer {ADMIN_KEY}")
        import json

        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)["stats"]["rejections_by_code"]["model_too_large"]

    retrying = OpenAI(base_url=BASE, api_key=API_KEY, timeout=30)  # max_retries=2, the default
    before = refused()
    try:
        retrying.chat.completions.create(model="llama-3-70b-instruct", messages=MSGS)
        raise AssertionError("expected 503")
    except openai.InternalServerError as e:
        assert e.code == "model_too_large", e.body
        assert e.response.headers.get("x-should-retry") == "false", dict(e.response.headers)
        assert e.response.headers.get("x-modelpool-node"), dict(e.response.headers)
    assert refused() - before == 1, "the client retried a refusal that can never succeed"


def test_concurrent_clients():
    errors = []

    def worker(i):
        try:
            r = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": f"n{i}"}], max_tokens=3)
            assert r.usage.completion_tokens == 3
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_api_keys():
    # A wrong key: the client raises AuthenticationError with OpenAI's code.
    bad = OpenAI(base_url=BASE, api_key="sk-wrong", max_retries=0, timeout=30)
    try:
        bad.models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401 and e.code == "invalid_api_key", (e.status_code, e.code)
    # The admin API wants the admin key, not the API key; /health is open.
    root = os.environ["MODELPOOL_URL"].rstrip("/")

    def get(path, key=None):
        req = urllib.request.Request(root + path)
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert get("/admin/pool", API_KEY) == 401
    assert get("/admin/pool") == 401
    assert get("/admin/pool", ADMIN_KEY) == 200
    assert get("/metrics", API_KEY) == 401
    assert get("/metrics", ADMIN_KEY) == 200
    assert get("/health") == 200


if __name__ == "__main__":
    sys.exit(run(globals()))
