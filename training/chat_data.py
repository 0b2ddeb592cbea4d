"""Chat-form recall examples: a fact told in a conversation's first user message, asked for
turns later, in the server's own chat template (`newllm.chat`), so that training and serving
read the same text.

A training window of real prose becomes a conversation::

    User: {a fact: "My name is Ada.", "I live in Lisbon.", "My pass key is 52817.", ...}
    Assistant: {prose}
    User: {prose}          <- filler turns: user and assistant lines cut from the window's own
    Assistant: {prose}        prose (decoded, whitespace folded), so replies stay English; with
                              ``acks`` a share of the replies is "I see.", "Go on.", ...
    ...
    User: {the question: "What is my name?", ...}
    Assistant: {the answer: " Your name is Ada."}

Each turn is tokenized the way a server session reads it: the rendered new message(s) of a turn
(`newllm.chat.render_chat`) on their own, then the reply on its own, joined as token ids. The
answer (the last reply) is marked for the loss weight (``--recall-weight``, like pass-key answers);
nothing else is. The answer restates the fact's words before its value ("Your pass key is N"),
as the fact said them, so a memory keyed on the few tokens before a value (``memory_history``)
is asked under the key it wrote under.

The conversation either opens the window (position 0: an empty state, as a new server session
starts; the space after the answer is filled by a further user line of prose) or closes it
(prose, EOS, then the conversation). Everything is a pure function of the window and the
`random.Random` given, so batches stay a function of (seed, step, rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from newllm.chat import render_chat

NAMES = ("Ada", "Alice", "Arthur", "Beatrice", "Carlos", "Clara", "Daniel", "Edith", "Felix",
         "Grace", "Hannah", "Hugo", "Irene", "Jonas", "Julia", "Leon", "Lucy", "Martin",
         "Nina", "Oscar", "Paula", "Peter", "Rosa", "Samuel", "Sofia", "Thomas", "Vera",
         "Walter")
CITIES = ("Lisbon", "Madrid", "Paris", "Berlin", "Vienna", "Prague", "Dublin", "Oslo",
          "Warsaw", "Rome", "Athens", "Boston", "Chicago", "Denver", "Toronto", "Sydney",
          "Cairo", "Lima", "Tokyo", "Seoul", "Delhi", "Nairobi", "Geneva", "Glasgow")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey",
           "brown", "pink", "silver", "gold")
FRUITS = ("apples", "pears", "plums", "cherries", "grapes", "oranges", "lemons", "peaches",
          "figs", "bananas", "melons", "strawberries")
ANIMALS = ("horse", "cat", "dog", "fox", "owl", "wolf", "bear", "rabbit", "goat", "swan",
           "eagle", "tiger", "otter")


@dataclass(frozen=True)
class Topic:
    """One kind of fact: ways to tell it, ways to ask for it, the answer, its values."""

    tells: tuple[str, ...]  # "{v}" is the value
    asks: tuple[str, ...]
    answer: str  # the reply to the question, "{v}" the value, starting with a space
    values: tuple[str, ...] | tuple[int, int]  # choices, or an inclusive range of integers

    @property
    def kind(self) -> str:
        """"digits" (values: a range of integers) or "words" (values: the choices)."""
        return "digits" if isinstance(self.values[0], int) else "words"


TOPICS = (
    Topic(("My pass key is {v}.", "Please remember this: my pass key is {v}.",
           "Here is something to keep in mind. My pass key is {v}."),
          ("What is my pass key?", "Can you tell me my pass key?", "What was my pass key?"),
          " Your pass key is {v}.", (10_000, 99_999)),
    Topic(("The code of my locker is {v}.", "Note this down: the code of my locker is {v}."),
          ("What is the code of my locker?", "Do you remember the code of my locker?"),
          " The code of your locker is {v}.", (1_000, 9_999)),
    Topic(("My name is {v}.", "Hello! My name is {v}.",
           "Good morning. My name is {v}, by the way."),
          ("What is my name?", "Do you remember my name?", "Tell me, what is my name?"),
          " Your name is {v}.", NAMES),
    Topic(("I live in {v}.", "Hello. I live in {v}, and I like it there.",
           "You should know that I live in {v}."),
          ("Where do I live?", "Which city do I live in?", "Do you remember where I live?"),
          " You live in {v}.", CITIES),
    Topic(("My favourite colour is {v}.", "I must tell you that my favourite colour is {v}."),
          ("What is my favourite colour?", "Which colour is my favourite?"),
          " Your favourite colour is {v}.", COLOURS),
    Topic(("My favourite fruit is {v}.", "I eat a lot of fruit; my favourite fruit is {v}."),
          ("What is my favourite fruit?", "Which fruit do I like best?"),
          " Your favourite fruit is {v}.", FRUITS),
    Topic(("My favourite animal is the {v}.", "Of all animals, my favourite animal is the {v}."),
          ("What is my favourite animal?", "Which animal is my favourite?"),
          " Your favourite animal is the {v}.", ANIMALS),
)


ACKS = (" I see.", " Go on.", " Yes.", " I understand.", " Indeed.", " Tell me more.",
        " Thank you.", " Very well.")
FACT_ACKS = (" I will remember that.", " Noted.")  # also for the reply to the fact's message


@dataclass(frozen=True)
class ChatFact:
    """One drawn fact: what the user says, what the user asks, the answer and its value."""

    tell: str
    ask: str
    answer: str
    value: str
    kind: str = "words"
    """"digits" (a pass key, a locker code) or "words" (a name, a city, a favourite)"""


def random_fact(rng: Any) -> ChatFact:
    """A fact of a random topic and phrasing (``rng`` is a `random.Random`)."""
    topic = TOPICS[rng.randrange(len(TOPICS))]
    if topic.kind == "digits":
        lo, hi = topic.values
        value = str(rng.randint(int(lo), int(hi)))
    else:
        value = str(topic.values[rng.randrange(len(topic.values))])
    tell = topic.tells[rng.randrange(len(topic.tells))].format(v=value)
    ask = topic.asks[rng.randrange(len(topic.asks))]
    return ChatFact(tell, ask, topic.answer.format(v=value), value, topic.kind)


def answer_matches(reply: str, value: str) -> bool:
    """Whether a reply gives the value: the value as a whole word in the reply's first line."""
    words = reply.split("\n")[0].replace(".", " ").replace(",", " ").replace("!", " ").split()
    return value.lower() in (w.lower() for w in words)


class ChatExamples:
    """Turn real training windows into chat-form recall examples (see the module docstring).

    ``at_start`` is the share of examples whose conversation opens the window (an empty state,
    as a new session); the rest close it after prose and EOS. ``max_fillers`` bounds the filler
    turns between the fact's turn and the question's (fewer when the window is full).
    ``acks`` is the share of replies before the question that are a short acknowledgement
    (`ACKS`; for the fact's message also `FACT_ACKS`) instead of prose from the window.
    ``pack`` fills the whole window with conversations (``at_start`` then does not apply): a
    long window gives one answer per conversation instead of one in all.
    """

    def __init__(self, tokenizer: Any, at_start: float = 0.5, max_fillers: int = 10,
                 acks: float = 0.0, pack: bool = False) -> None:
        if not 0.0 <= at_start <= 1.0 or not 0.0 <= acks <= 1.0:
            raise ValueError(f"at_start and acks must be in [0, 1], got {at_start}, {acks}")
        self.tokenizer, self.at_start, self.max_fillers = tokenizer, at_start, max_fillers
        self.acks, self.pack = acks, pack
        self.eos = tokenizer.eos_token_id

    def make(self, window: Tensor, rng: Any) -> tuple[Tensor, Tensor, ChatFact | None]:
        """window (L + 1,) -> (new window (L + 1,), answer mask over targets (L,), the fact).

        With ``pack`` the window holds as many conversations as fit, one after another, each
        opening after EOS (the first at position 0), every answer marked; the fact returned is
        the first conversation's. The window comes back unchanged (mask all False, fact None)
        when it is too short for the fact's turn and the question's.
        """
        n = len(window)
        words = self.tokenizer.decode([t for t in window.tolist() if t != self.eos]).split()
        if n < 2 or not words:
            return window, torch.zeros(max(n - 1, 0), dtype=torch.bool), None
        text = _Prose(words, rng, self.acks)
        first = self._conversation(text, n, rng)
        if first is None:
            return window, torch.zeros(n - 1, dtype=torch.bool), None
        mask = torch.zeros(n - 1, dtype=torch.bool)
        conv, answer_len, fact = first
        if self.pack:
            ids: list[int] = []
            while first is not None:
                conv, answer_len, _ = first
                _mark(mask, len(ids) + len(conv), answer_len)
                ids = ids + conv + [self.eos]
                first = self._conversation(text, n - len(ids) - 1, rng)  # room for its EOS
            ids = ids[:n]  # the first conversation's EOS may not fit
            return self._then_prose(ids, n, text, window.dtype), mask, fact
        room = n - len(conv)
        if room == 0 or rng.random() < self.at_start:
            start = 0
            new = self._then_prose(conv, n, text, window.dtype)
        else:
            start = room
            before = self.tokenizer.encode(text.prose(room, room))[-(room - 1):] \
                if room > 1 else []
            new = torch.tensor([self.eos] * (room - 1 - len(before)) + before + [self.eos] + conv,
                               dtype=window.dtype)
        _mark(mask, start + len(conv), answer_len)
        return new, mask, fact

    def _then_prose(self, ids: list[int], n: int, text: _Prose, dtype: torch.dtype) -> Tensor:
        """``ids`` followed by a user line of the window's prose (then EOS), ``n`` tokens in all:
        the room after a conversation that opens its window."""
        room = n - len(ids)
        rest = self.tokenizer.encode(render_chat([("user", text.prose(room, room))],
                                                 open_reply=True))
        return torch.tensor(ids + (rest + [self.eos] * room)[:room], dtype=dtype)

    def _conversation(self, text: _Prose, room: int,
                      rng: Any) -> tuple[list[int], int, ChatFact] | None:
        """(token ids of one conversation: the fact's turn, filler turns, the question and the
        answer, at most ``room`` of them; the answer's length; the fact), or None when the fact's
        turn and the question's do not fit in ``room``."""
        enc = self.tokenizer.encode
        fact = random_fact(rng)
        tell = fact.tell
        if rng.random() < 0.3:
            tell = f"{tell} {text.prose(5, 15)}"
        head = (enc(render_chat([("user", tell)], open_reply=False))
                + enc(text.reply(8, 30, ACKS + FACT_ACKS)))
        question = enc(render_chat([("user", fact.ask)], open_reply=True))
        answer = enc(fact.answer)
        tail = len(question) + len(answer)
        if len(head) + tail > room:
            return None
        conv = head
        for _ in range(rng.randint(0, self.max_fillers)):
            turn = (enc(render_chat([("user", text.prose(10, 40))], open_reply=True))
                    + enc(text.reply(5, 30)))
            if len(conv) + len(turn) + tail > room:
                break
            conv = conv + turn
        return conv + question + answer, len(answer), fact


def _mark(mask: Tensor, end: int, answer_len: int) -> None:
    """Mark the targets of an answer whose last token is window[end - 1] (target t is window
    [t + 1])."""
    mask[end - answer_len - 1:end - 1] = True


class _Prose:
    """A window's words handed out in order (wrapping around), and replies before a question."""

    def __init__(self, words: list[str], rng: Any, acks: float) -> None:
        self.words, self.rng, self.acks, self.cursor = words, rng, acks, 0

    def prose(self, lo: int, hi: int) -> str:
        """The next words, about ``lo..hi`` tokens of them (a word is ~4/3 tokens), whitespace
        folded."""
        k = max(1, self.rng.randint(lo, hi) * 3 // 4)
        line = " ".join(self.words[(self.cursor + i) % len(self.words)] for i in range(k))
        self.cursor += k
        return line

    def reply(self, lo: int, hi: int, choices: tuple[str, ...] = ACKS) -> str:
        """A reply before the question: one of ``choices`` (an ``acks`` share of them; drawn only
        then, so that ``acks=0`` leaves the random stream as it was) or prose."""
        if self.acks and self.rng.random() < self.acks:
            return choices[self.rng.randrange(len(choices))]
        return " " + self.prose(lo, hi)
