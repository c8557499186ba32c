"""The user's files, as the REPL reads and writes them: a text file put into a message (`/read
PATH` in the REPL, `kvrepl -f FILE` on the command line), and a command's output written to the
file the user names (`write_file`, for /export).

Owns reading one file for a message (`read_file`): a folder, a missing or unreadable file, a
file that is not UTF-8 text (NUL bytes, bytes UTF-8 cannot decode), an empty one or one far
larger than a message can hold is refused in one line in the user's words (a KvreplError), and
nothing is attached. And how files and the typed text make one message (`compose`): each file
as a fenced block under its name, as the user wrote it, then what they typed. The message is
stored as it was sent, so that a resume never needs the file again. Reading is all it does: the
REPL keeps what was read until the next message (registry.Context.attached), and the
conversation counts its tokens. What stops a write is one line too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvrepl.app.listing import format_size
from kvrepl.errors import KvreplError

# More bytes than this per token of a message's room cannot fit, whatever the vocabulary (a
# token is a few bytes of text: 4 on average in English, far fewer in most other scripts).
BYTES_PER_TOKEN = 64
MAX_BYTES = 64 << 20  # read at most, when the model's context is not known yet


@dataclass(frozen=True)
class Attachment:
    """One file's text, named as the user named it."""

    name: str
    text: str

    def block(self) -> str:
        """The file as the message holds it: its name, then its text in a fence that no line
        of the text can close."""
        fence = "`" * max(3, _longest_run(self.text, "`") + 1)
        body = self.text if self.text.endswith("\n") else self.text + "\n"
        return f"{self.name}:\n{fence}\n{body}{fence}"


def compose(attached: Sequence[Attachment], typed: str) -> str:
    """The message: each file's block, then the typed text, a blank line between."""
    parts = [a.block() for a in attached]
    if typed.strip() or not parts:
        parts.append(typed)
    return "\n\n".join(parts)


def names(attached: Sequence[Attachment]) -> str:
    """`notes.txt` or `a.txt, b.md`."""
    return ", ".join(a.name for a in attached)


def read_file(name: str, *, max_bytes: int = MAX_BYTES, room: int | None = None) -> Attachment:
    """The text of the file `name` (`~` is the home folder), or one line saying why not.
    `room`: the most tokens a message may hold, when known (a larger file is refused unread)."""
    path = Path(name).expanduser()
    if room is not None:
        max_bytes = min(max_bytes, BYTES_PER_TOKEN * room)
    data = _read_bytes(name, path, max_bytes, room)
    if b"\0" in data:
        raise KvreplError(f"cannot read {name}: it is a binary file, not text")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is no part of the text
    except UnicodeDecodeError as exc:
        raise KvreplError(f"cannot read {name}: it is not UTF-8 text (byte {exc.start:,} is "
                          "not UTF-8)") from None  # fmt: skip
    if not text.strip():
        raise KvreplError(f"{name} is empty: nothing to read")
    return Attachment(name, text.replace("\r\n", "\n"))


def _read_bytes(name: str, path: Path, max_bytes: int, room: int | None) -> bytes:
    try:
        if path.is_dir():
            raise KvreplError(f"cannot read {name}: it is a folder; name a file in it")
        if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
            raise KvreplError(f"cannot read {name}: it is not a regular file")
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                held = f" (at most {room:,} tokens in a message)" if room is not None else ""
                raise KvreplError(f"cannot read {name}: it is {format_size(size)}, far more "
                                  f"than a message can hold{held}")  # fmt: skip
            return f.read(max_bytes + 1)
    except FileNotFoundError:
        raise KvreplError(f"cannot read {name}: there is no such file") from None
    except NotADirectoryError:
        raise KvreplError(f"cannot read {name}: part of that path is a file, not a "
                          "folder") from None  # fmt: skip
    except PermissionError:
        raise KvreplError(f"cannot read {name}: permission denied") from None
    except OSError as exc:
        raise KvreplError(f"cannot read {name}: {exc.strerror or exc}") from None


def _longest_run(text: str, char: str) -> int:
    return max(map(len, re.findall(re.escape(char) + "+", text)), default=0)


def write_file(target: str, text: str) -> None:
    """Write `text` to the file the user named; what stops it is one line in their words."""
    path = Path(target).expanduser()
    try:
        path.write_text(text, encoding="utf-8")
    except IsADirectoryError:
        raise KvreplError(f"cannot write {target}: it is a folder; name a file in it") from None
    except FileNotFoundError:
        raise KvreplError(f"cannot write {target}: there is no folder {path.parent}") from None
    except NotADirectoryError:
        raise KvreplError(f"cannot write {target}: part of that path is a file, not a "
                          "folder") from None  # fmt: skip
    except PermissionError:
        raise KvreplError(f"cannot write {target}: permission denied") from None
    except OSError as exc:
        raise KvreplError(f"cannot write {target}: {exc.strerror or exc}") from None
