"""Chat-form recall: one rendering of the chat template for server and training (`newllm.chat`),
chat examples (`training.chat_data`) and the library-level chat recall (`training.chat_eval`)."""

from __future__ import annotations

import random

import pytest
import torch

from newllm import chat
from newllm.tokenizer import Tokenizer
from server import transcript
from training import chat_data as C
from training import chat_eval as E

PROSE = ("It was a bright cold day in April, and the clocks were striking thirteen. The hall "
         "smelt of boiled cabbage and old rag mats. At one end of it a coloured poster, too "
         "large for indoor display, had been tacked to the wall. ") * 4


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.byte_level()


def test_server_renders_with_the_library_template() -> None:
    assert transcript.render_chat is chat.render_chat
    assert (transcript.CUE, transcript.CHAT_STOP, transcript.ROLES) == (
        chat.CUE, chat.CHAT_STOP, chat.ROLES)
    # the server's template, byte for byte, as it was before it moved to newllm.chat
    messages = [("system", "be brief"), ("developer", "d"), ("user", "hi"), ("tool", "t"),
                ("assistant", "a")]
    assert chat.render_chat(messages, open_reply=False) == (
        "System: be brief\nSystem: d\nUser: hi\nTool: t\nAssistant: a\nAssistant:")
    assert chat.render_chat([("user", "more")], open_reply=True) == "\nUser: more\nAssistant:"


def test_conversation_text_is_what_a_session_reads_turn_by_turn() -> None:
    turns = [([("system", "s"), ("user", "My name is Ada.")], " Hello Ada."),
             ([("user", "How are you?")], " Well."), ([("user", "What is my name?")], "")]
    expected = (transcript.render_chat(turns[0][0], False) + " Hello Ada."
                + transcript.render_chat(turns[1][0], True) + " Well."
                + transcript.render_chat(turns[2][0], True))
    assert chat.conversation_text(turns) == expected
    assert expected == ("System: s\nUser: My name is Ada.\nAssistant: Hello Ada.\nUser: How are "
                        "you?\nAssistant: Well.\nUser: What is my name?\nAssistant:")


def _turn_ids(tok: Tokenizer, messages: list[tuple[str, str]], open_reply: bool) -> list[int]:
    return tok.encode(chat.render_chat(messages, open_reply))


@pytest.mark.parametrize("at_start", [0.0, 1.0])
def test_chat_examples(tok: Tokenizer, at_start: float) -> None:
    maker = C.ChatExamples(tok, at_start=at_start)
    window = torch.tensor(tok.encode(PROSE)[:401])  # L + 1 = 401
    for seed in range(20):
        new, mask, fact = maker.make(window, random.Random(seed))
        assert fact is not None and new.shape == window.shape and mask.shape == (400,)
        ids = new.tolist()
        first = _turn_ids(tok, [("user", "")], False)[:len("User: ")]
        start = 0 if at_start else ids.index(tok.eos_token_id) + 1
        assert ids[start:start + len(first)] == first  # the conversation opens a session
        # the loss weight is on the answer only: the last reply, right after the question
        answer = tok.encode(fact.answer)
        weighted = new[1:][mask].tolist()
        assert weighted == answer
        a0 = int(mask.nonzero()[0]) + 1
        question = _turn_ids(tok, [("user", fact.ask)], True)
        assert ids[a0 - len(question):a0] == question
        # the value: once in the first user message, once in the answer, nowhere else
        text = tok.decode(ids[start:a0 + len(answer)])
        first_turn = text[:text.index("\nAssistant:")]
        assert fact.tell in first_turn and first_turn.count(fact.value) == 1
        assert text.count(fact.value) == 2 and text.endswith(fact.answer)
        assert C.answer_matches(fact.answer, fact.value)
        if at_start:  # after the answer the next user line begins (as far as there is room)
            after = tok.decode(ids[a0 + len(answer):])
            assert after.startswith(chat.CHAT_STOP) or chat.CHAT_STOP.startswith(after)


def test_chat_examples_are_deterministic_and_vary(tok: Tokenizer) -> None:
    maker = C.ChatExamples(tok)
    window = torch.tensor(tok.encode(PROSE)[:401])
    a = [maker.make(window, random.Random(f"s-{i}")) for i in range(10)]
    b = [maker.make(window, random.Random(f"s-{i}")) for i in range(10)]
    for (n1, m1, f1), (n2, m2, f2) in zip(a, b, strict=True):
        assert torch.equal(n1, n2) and torch.equal(m1, m2) and f1 == f2
    assert len({f.tell for _, _, f in a if f}) > 5
    short = torch.tensor(tok.encode("ab cd ef"))
    same, mask, fact = maker.make(short, random.Random(0))
    assert torch.equal(same, short) and not mask.any() and fact is None


def test_chat_examples_with_acknowledgements(tok: Tokenizer) -> None:
    """``acks=1``: every reply before the question is a short acknowledgement, the answer and
    its weight as before; by default the replies are prose."""
    window = torch.tensor(tok.encode(PROSE)[:401])
    acked = C.ChatExamples(tok, at_start=1.0, acks=1.0)
    fillers = 0
    for seed in range(10):
        new, mask, fact = acked.make(window, random.Random(seed))
        assert fact is not None and tok.decode(new[1:][mask].tolist()) == fact.answer
        text = tok.decode(new.tolist())
        text = text[:text.index(fact.answer) + len(fact.answer)]
        replies = [turn.split(chat.CHAT_STOP)[0] for turn in text.split("\nAssistant:")[1:]]
        assert replies[-1] == fact.answer
        assert replies[0] in C.ACKS + C.FACT_ACKS  # the reply to the fact's message
        assert all(r in C.ACKS for r in replies[1:-1])
        assert text.count(fact.value) == 2
        fillers += len(replies) - 2
    assert fillers > 10
    new, _, fact = C.ChatExamples(tok, at_start=1.0).make(window, random.Random(3))
    text = tok.decode(new.tolist())
    text = text[:text.index(fact.answer) + len(fact.answer)]
    replies = [turn.split(chat.CHAT_STOP)[0] for turn in text.split("\nAssistant:")[1:-1]]
    assert replies and not set(replies) & set(C.ACKS + C.FACT_ACKS)  # prose, as before
    with pytest.raises(ValueError, match="acks"):
        C.ChatExamples(tok, acks=1.5)


def test_packed_chat_examples(tok: Tokenizer) -> None:
    """``pack``: the window holds conversations one after another, each opening after EOS (the
    first at 0), every answer weighted and right after its question; the fact returned is the
    first conversation's."""
    window = torch.tensor(tok.encode(PROSE * 8)[:4097])
    packed = C.ChatExamples(tok, pack=True, acks=0.5)
    opening = _turn_ids(tok, [("user", "")], False)[:len("User: ")]
    counts = []
    for seed in range(5):
        new, mask, fact = packed.make(window, random.Random(seed))
        assert fact is not None and new.shape == window.shape and mask.shape == (4096,)
        ids, eos = new.tolist(), tok.eos_token_id
        starts = [0] + [i + 1 for i, t in enumerate(ids) if t == eos]
        marked = [i + 1 for i in mask.nonzero().flatten().tolist()]  # answer token positions
        convs = [(s0, e0) for s0, e0 in zip(starts, starts[1:], strict=False)]
        assert len(convs) >= 3 and fact.tell in tok.decode(ids[:convs[0][1]])
        for s0, e0 in convs:  # every conversation: opening ... question, answer, EOS
            assert ids[s0:s0 + len(opening)] == opening
            answer = [i for i in marked if s0 <= i < e0]
            assert answer and answer == list(range(answer[0], e0 - 1))
            text = tok.decode(ids[s0:answer[0]])
            told = text[:text.index("\nAssistant:")]
            value = tok.decode(ids[answer[0]:e0 - 1]).rstrip(".").split()[-1]
            assert text.endswith("\nAssistant:") and value in told
        assert all(i < convs[-1][1] for i in marked)  # nothing weighted after the last one
        counts.append(len(convs))
    assert len(set(counts)) > 1  # the number of conversations varies with the draw
    _, one, _ = C.ChatExamples(tok, at_start=1.0).make(window, random.Random(0))
    assert int(one.sum()) < int(packed.make(window, random.Random(0))[1].sum())


def test_facts_say_whether_their_value_is_digits_or_words() -> None:
    facts = [C.random_fact(random.Random(i)) for i in range(200)]
    assert {f.kind for f in facts} == {"digits", "words"}
    assert all((f.kind == "digits") == f.value.isdigit() for f in facts)


def test_answer_matches() -> None:
    assert C.answer_matches(" Your name is Ada.", "Ada")
    assert C.answer_matches(" It is 52817, I think", "52817")
    assert not C.answer_matches(" Your name is Adam.", "Ada")
    assert not C.answer_matches(" No.\nAda", "Ada")  # only the reply's first line counts


def test_trainer_mixes_chat_examples(tmp_path) -> None:
    from tests.test_training_lm import write_corpus
    from training.config import TrainConfig
    from training.lm import Trainer

    data = write_corpus(tmp_path / "data", n=30)
    cfg = TrainConfig(data=(str(data),), out=str(tmp_path / "c"), cache_dir="none",
                      preset="tiny-infini", steps=2, batch_size=4, seq_len=512, chat_fraction=1.0,
                      recall_weight=3.0)
    trainer = Trainer(cfg)
    _, batch, weights, mask, _ = trainer.make_batch(0)
    assert mask is not None and weights is not None and mask.any(dim=1).all()
    assert torch.all(weights[mask] == 3.0) and torch.all(weights[~mask] == 1.0)
    again = Trainer(cfg).make_batch(0)[1]
    assert torch.equal(batch, again)  # a pure function of (seed, step, rank)
    TrainConfig(data=("x",), out="o", recall_fraction=0.3, repeat_fraction=0.3,
                chat_fraction=0.4)  # shares that add up to 1 in decimals: accepted
    with pytest.raises(ValueError, match="chat-fraction"):
        TrainConfig(data=("x",), out="o", recall_fraction=0.5, chat_fraction=0.6)


def test_library_chat_recall_runs_with_a_move(tok: Tokenizer) -> None:
    from newllm import load_checkpoint

    model, tokenizer = load_checkpoint("tiny-infini")
    words = PROSE.split()
    script = E.conversation_script(random.Random(0), words, turns=3, user_tokens=12)
    assert script.messages[0].startswith(script.fact.tell)
    assert script.messages[-1] == script.fact.ask and len(script.messages) == 3
    moved = E.run_conversation(model, tokenizer, script, reply_tokens=4, move_at=1)
    stayed = E.run_conversation(model, tokenizer, script, reply_tokens=4, move_at=0)
    assert moved == stayed and len(moved) == 3  # the memory file carries the session exactly
    result = E.chat_recall(model, tokenizer, words, conversations=2, turns=3, user_tokens=12,
                           reply_tokens=4, move_at=2)
    assert 0.0 <= result["recall"] <= 1.0 and "floor" in result
    kinds = result["by_kind"]
    assert set(kinds) <= {"digits", "words"}
    assert sum(k["conversations"] for k in kinds.values()) == 2
    right = sum(k["recall"] * k["conversations"] for k in kinds.values())
    assert right == pytest.approx(result["recall"] * 2)
    assert result["prose_replies"]["replies"] <= 2  # one prose turn each


def test_a_fact_and_its_question_in_one_message(tok: Tokenizer) -> None:
    from newllm import load_checkpoint

    model, tokenizer = load_checkpoint("tiny-infini")
    got = E.same_message(model, tokenizer, per_topic=2, reply_tokens=3)
    words = [t for t in E.TOPICS if t.kind == "words"]
    assert got["trials"] == 2 * len(words) and len(got["by_topic"]) == len(words)
    assert 0 <= got["recall"] <= 1
    assert got["recall"] == pytest.approx(sum(got["by_topic"].values()) / len(words))


def test_repetition_of_prose_replies() -> None:
    assert E.repeated_bigrams("not not not not not") == pytest.approx(0.75)
    assert E.repeated_bigrams("the woods, and the woods, and") == pytest.approx(2 / 5)
    assert E.repeated_bigrams("a fine day it was") == 0.0
    assert E.repeated_bigrams("too short") is None
    got = E.prose_repetition(["not not not not not", "a fine day it was", "hm"])
    assert got == {"repeated_bigrams": pytest.approx(0.375), "looping": 0.5, "replies": 2}
    assert E.prose_repetition(["hm"])["replies"] == 0


def test_trainer_evaluates_chat_recall(tmp_path) -> None:
    import json

    from tests.test_training_lm import run, write_corpus

    data = write_corpus(tmp_path / "data", n=30)
    run(tmp_path, data, "c", 2, chat_fraction=0.5, recall_weight=2.0, seq_len=512,
        eval_chat=1, eval_batches=1)
    lines = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= lines[-1]["chat_recall"] <= 1.0
    kinds = lines[-1]["chat_recall_by_kind"]  # one conversation: one kind, scored like the whole
    assert len(kinds) == 1 and list(kinds.values()) == [lines[-1]["chat_recall"]]
    assert "chat-fraction: 0.5" in (tmp_path / "c" / "config.yaml").read_text()


def test_value_choice_scores_each_value_as_a_continuation(tmp_path) -> None:
    import json

    from newllm import load_checkpoint

    model, tokenizer = load_checkpoint("tiny-infini")
    words = PROSE.split()
    # a value's score, read on from the prefix's state, is its log-probability read in one go
    prefix, value = tokenizer.encode("User: My name is Ada.\nAssistant: Your name is"), " Ada"
    ids = tokenizer.encode(value)
    with torch.no_grad():
        logits, state = model(torch.tensor([prefix]), None)
        whole, _ = model(torch.tensor([prefix + ids[:-1]]), None)
    at_once = torch.log_softmax(whole[0, len(prefix) - 1:].float(), -1)
    expected = at_once.gather(1, torch.tensor(ids)[:, None]).sum().item()
    got = E._continuation_logprob(model, logits[0, -1], state, ids)
    assert got == pytest.approx(expected, abs=1e-4)

    result = E.value_choice(model, tokenizer, words, trials=3, fillers=(0, 1))
    topics = [t for t in C.TOPICS if not isinstance(t.values[0], int)]
    chance = sum(1 / len(topics[i % len(topics)].values) for i in range(3)) / 3
    rows = result["by_fillers"]
    assert set(rows) == {"0", "1"}
    for row in rows.values():
        assert row["chance"] == pytest.approx(chance)
        assert 0.0 <= row["top1"] <= 1.0 and 0.0 <= row["top1_lift"] <= 1.0
    assert rows["1"]["tokens"] > rows["0"]["tokens"] + 20  # an exchange of prose in between
    assert E.value_choice(model, tokenizer, words, trials=3, fillers=(1,))["by_fillers"]["1"] \
        == rows["1"]  # the same seed draws the same conversations

    filler = tmp_path / "filler.txt"
    filler.write_text(PROSE)
    out = tmp_path / "vc.json"
    assert E.main(["--checkpoint", "tiny-infini", "--filler", str(filler), "--value-choice", "2",
                   "--value-fillers", "0", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["by_fillers"]) == {"0"}
    for bad in (["--value-choice", "2", "--value-fillers", "-1"], ["--value-choice", "-3"]):
        with pytest.raises(SystemExit):
            E.main(["--checkpoint", "tiny-infini", "--filler", str(filler), *bad])
