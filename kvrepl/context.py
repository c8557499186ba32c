"""The context rule, in one place: a prompt must leave an answer room in the model's context.

`prompt_room` is the most tokens a prompt may hold; `check_fits` is the one check, made before
anything is stored or computed, with its wording for what is too long: a message (the REPL's
line), the conversation (the REPL's history, or the engine's last guard), or the messages of a
server request. Torch-free: the REPL asks it before the model has loaded.
"""

from __future__ import annotations

from kvrepl.errors import PromptError

ANSWER_ROOM = 16  # tokens an answer needs at least, beyond the prompt


def prompt_room(context: int, room: int = ANSWER_ROOM) -> int:
    """The most tokens a prompt may hold: the context less the room an answer needs."""
    return context - room


def check_fits(what: str, n: int, context: int, room: int = ANSWER_ROOM) -> None:
    """Raise a PromptError, in the words for `what` ("message", "conversation" or "request"),
    when `n` tokens leave less than `room` of the context for the answer."""
    most = prompt_room(context, room)
    if n <= most:
        return
    if what == "message":
        raise PromptError(f"this message is {n:,} tokens; the model's context is {context:,} "
                          f"tokens (at most {most:,} for a message): shorten it or send it in "
                          "parts")  # fmt: skip
    if what == "request":
        raise PromptError(f"the messages are {n:,} tokens; the model's context is {context:,} "
                          f"(at most {most:,} for the messages, to leave room for an answer): "
                          "shorten them")  # fmt: skip
    raise PromptError(
        f"the conversation is {n:,} tokens; the model's context is {context:,}: use /new to start "
        "over, /undo to drop the last exchange, /edit to shorten a turn, or `/set drop_oldest on` "
        "to drop old turns"
    )
