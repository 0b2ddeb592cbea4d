"""The chat template as text: how messages become what the model reads, shared by the server and
training so that both see the same bytes.

``newllm`` tokenizers carry no chat template, so a conversation is plain text, one message a
line, each after its role's name::

    System: {content}\\n  User: {content}\\n  Assistant: {content}\\n  ...  Assistant:

`render_chat` renders the new messages of one turn and ends with the generation cue `CUE`
(``Assistant:``); the model's reply follows the cue directly (a generated reply usually starts
with a space). When the text read so far ends with a reply the model generated (``open_reply``),
the new text starts with ``\\n`` to end that reply's line. `CHAT_STOP` (``\\nUser:``) is the
stop string a chat reply implicitly has: the model starting the user's next line ends its reply.

`conversation_text` joins whole turns (new messages, then the reply as returned) into the text
a server session's memory has read after them: `server.transcript` renders each turn with
`render_chat`, and training (`training.chat_data`) renders its chat examples with the same
functions.
"""

from __future__ import annotations

from collections.abc import Sequence

ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant",
         "tool": "Tool"}
CUE = "Assistant:"
CHAT_STOP = "\nUser:"

Message = tuple[str, str]  # (role, content), role one of ROLES


def render_chat(messages: Sequence[Message], open_reply: bool) -> str:
    """The text fed to the model for these new messages, ending with the generation cue."""
    lines = "".join(f"{ROLES[role]}: {content}\n" for role, content in messages)
    return ("\n" if open_reply else "") + lines + CUE


def conversation_text(turns: Sequence[tuple[Sequence[Message], str]]) -> str:
    """What a chat session has read after these turns: per turn its new messages rendered by
    `render_chat`, then the reply as the server returned it (cut before any stop string).

    ``turns`` are ``(new messages, reply)``; a reply of ``""`` leaves the cue open with nothing
    after it (the last turn of a prompt still waiting for its reply).
    """
    return "".join(render_chat(messages, open_reply=i > 0) + reply
                   for i, (messages, reply) in enumerate(turns))
