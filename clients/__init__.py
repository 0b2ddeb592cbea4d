"""newllm's client: a typed httpx client (sync and async) and the ``newllm-client`` CLI.

Talks HTTP to a newllm server (``newllm serve``): OpenAI-compatible chat and completions with
sessions, streaming, and session memory export/import/move. Imports only httpx, pydantic and
the standard library, so it installs light on machines that only talk to a server.

    from clients import Client, move_session
    with Client("http://127.0.0.1:8000") as c:
        print(c.chat("Hello!", session="s1", temperature=0).text)
    move_session("s1", "http://a:8000", "http://b:8000")
"""

from clients.aio import AsyncClient, AsyncStream, async_move_session
from clients.client import Client, Stream, move_session
from clients.errors import (
    APIError,
    AuthError,
    BadRequest,
    Conflict,
    IntegrityError,
    MemoryRefused,
    NewllmError,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    RateLimited,
    RequestTimeout,
    ServerError,
    ServerUnavailable,
    StreamError,
    StreamInterrupted,
)
from clients.memory import MemoryFileInfo
from clients.types import (
    ChatResult,
    CompletionResult,
    Delta,
    ImportResult,
    ModelCard,
    MoveResult,
    SessionInfo,
    SessionTurn,
    Usage,
)

__all__ = [
    "APIError", "AsyncClient", "AsyncStream", "AuthError", "BadRequest", "ChatResult", "Client",
    "CompletionResult", "Conflict", "Delta", "ImportResult", "IntegrityError", "MemoryFileInfo",
    "MemoryRefused", "ModelCard", "MoveResult", "NewllmError", "NotFound", "PayloadTooLarge",
    "ProtocolError", "RateLimited", "RequestTimeout", "ServerError", "ServerUnavailable",
    "SessionInfo", "SessionTurn", "Stream", "StreamError", "StreamInterrupted", "Usage",
    "async_move_session", "move_session",
]
