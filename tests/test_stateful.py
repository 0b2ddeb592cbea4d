"""The Responses and Conversations APIs through the official openai client, on one live server
(tiny-infini, one slot so greedy replies repeat exactly)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from benchmarks.live import LiveServer, running_servers

MODEL = "tiny-infini"
GREEDY = {"temperature": 0, "max_output_tokens": 8}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with running_servers(MODEL, {"s": 1}, folder=tmp_path_factory.mktemp("stateful")) as s:
        yield s["s"]


@pytest.fixture
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                       timeout=60) as c:
        yield c


def test_a_chain_reads_only_the_new_input_and_answers_as_a_session(
        client: openai.OpenAI, server: LiveServer) -> None:
    first = client.responses.create(model=MODEL, input="My name is Ada.", **GREEDY)
    assert first.id.startswith("resp_") and first.status in ("completed", "incomplete")
    second = client.responses.create(model=MODEL, input="What is my name?",
                                     previous_response_id=first.id, **GREEDY)
    assert second.previous_response_id == first.id
    # the same two turns as a chat session: the same replies, and the second turn read only
    # its own message (its input tokens are the session turn's prompt tokens)
    with server.client() as c:
        one = c.chat("My name is Ada.", session="as-session", max_tokens=8, temperature=0)
        two = c.chat("What is my name?", session="as-session", max_tokens=8, temperature=0)
    assert first.output_text == one.text and second.output_text == two.text
    assert second.usage is not None and two.usage is not None
    assert second.usage.input_tokens == two.usage.prompt_tokens
    assert second.usage.input_tokens < first.usage.input_tokens + second.usage.input_tokens
    assert client.responses.retrieve(second.id).output_text == second.output_text
    items = client.responses.input_items.list(second.id)
    assert [i.content[0].text for i in items.data] == ["What is my name?"]


def test_streaming_gives_the_events_and_the_same_text(client: openai.OpenAI) -> None:
    plain = client.responses.create(model=MODEL, input="Tell me a story.", **GREEDY)
    kinds, deltas, final = [], [], None
    with client.responses.create(model=MODEL, input="Tell me a story.", stream=True,
                                 **GREEDY) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            if event.type in ("response.completed", "response.incomplete"):
                final = event.response
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert final is not None and final.output_text == "".join(deltas) == plain.output_text
    assert client.responses.retrieve(final.id).output_text == plain.output_text


def test_branches_are_independent_and_store_false_keeps_nothing(
        client: openai.OpenAI, server: LiveServer) -> None:
    root = client.responses.create(model=MODEL, input="Once upon a time", **GREEDY)
    a1 = client.responses.create(model=MODEL, input="there was a cat.",
                                 previous_response_id=root.id, **GREEDY)
    client.responses.create(model=MODEL, input="there was a dog.",
                            previous_response_id=root.id, **GREEDY)
    a2 = client.responses.create(model=MODEL, input="there was a cat.",
                                 previous_response_id=root.id, **GREEDY)
    assert a2.output_text == a1.output_text  # the dog branch changed nothing of the root
    with server.client() as c:
        before = {s.id for s in c.sessions()}
        gone = client.responses.create(model=MODEL, input="not kept", store=False,
                                       previous_response_id=root.id, **GREEDY)
        assert {s.id for s in c.sessions()} == before
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(gone.id)
    client.responses.delete(a1.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(a1.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="x", previous_response_id=a1.id, **GREEDY)


def test_a_conversation_accumulates_items_and_moves_like_a_session(
        client: openai.OpenAI, server: LiveServer, tmp_path: Path) -> None:
    conv = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "Remember: the key is 42."}],
        metadata={"topic": "keys"})
    assert conv.id.startswith("conv_")
    r1 = client.responses.create(model=MODEL, input="What is the key?",
                                 conversation=conv.id, **GREEDY)
    r2 = client.responses.create(model=MODEL, input="Say it again.", conversation=conv.id,
                                 **GREEDY)
    items = client.conversations.items.list(conv.id, order="asc")
    texts = [(i.role, i.content[0].text) for i in items.data]
    assert texts == [("user", "Remember: the key is 42."), ("user", "What is the key?"),
                     ("assistant", r1.output_text), ("user", "Say it again."),
                     ("assistant", r2.output_text)]
    assert client.responses.retrieve(r2.id).conversation.id == conv.id
    # an item read into the memory cannot be taken out; a pending one can
    with pytest.raises(openai.ConflictError):
        client.conversations.items.delete(items.data[0].id, conversation_id=conv.id)
    added = client.conversations.items.create(
        conv.id, items=[{"type": "message", "role": "user", "content": "pending"}])
    client.conversations.items.delete(added.data[0].id, conversation_id=conv.id)
    assert len(client.conversations.items.list(conv.id).data) == 5
    assert client.conversations.update(conv.id, metadata={"topic": "k2"}).metadata == \
        {"topic": "k2"}
    # the conversation is a session: export, import as a copy, continue both alike
    with server.client() as c:
        data = c.export_memory(conv.id)
        c.import_memory("conv_copy", data)
    nxt = client.responses.create(model=MODEL, input="And now?", conversation=conv.id,
                                  **GREEDY)
    cpy = client.responses.create(model=MODEL, input="And now?", conversation="conv_copy",
                                  **GREEDY)
    assert nxt.output_text == cpy.output_text
    client.conversations.delete(conv.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)


def test_bad_requests_are_refused_with_a_reason(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for body, code in [({"model": MODEL, "input": "x", "previous_response_id": "resp_nope"},
                            404),
                           ({"model": MODEL, "input": "x", "conversation": "conv_nope"}, 404),
                           ({"model": MODEL, "input": "x", "tools": [{"type": "web"}]}, 400),
                           ({"model": MODEL, "input": [{"role": "robot", "content": "x"}]},
                            400)]:
            r = http.post("/v1/responses", json=body)
            assert r.status_code == code, r.text
            assert r.json()["error"]["message"]
        assert http.get("/v1/responses/not-a-response").status_code == 404
        assert http.get("/v1/conversations/conv_missing/items").status_code == 404
