"""Session names: which strings may name a session, and why the others may not.

Owns the rule (length, separators and their lookalikes, control and format characters, the
characters allowed) and its one-line refusals. Never looks a name up or stores it: db.py keeps
names unique (and snapshot folders are named by session id, never by name).
"""

import unicodedata

from kvrepl.errors import SessionNameError

NAME_MAX = 64
# Real separators and the lookalikes that would read as one in a listing or a file name.
_SLASHES = "/\\\u2215\u2044\uff0f\u29f8"


def validate_session_name(name: str) -> str:
    """Return `name` if it is a usable session name, else raise SessionNameError saying why."""
    if not name or not name.strip():
        raise SessionNameError("a session name cannot be empty")
    if name != name.strip():
        raise SessionNameError("a session name cannot start or end with whitespace")
    if name in (".", ".."):
        raise SessionNameError(f"{name!r} cannot be a session name")
    if len(name) > NAME_MAX:
        raise SessionNameError(f"a session name has at most {NAME_MAX} characters, not {len(name)}")
    for ch in name:
        if ch in _SLASHES:
            raise SessionNameError(f"a session name cannot contain {ch!r} (a path separator)")
        if unicodedata.category(ch) in ("Cc", "Cf"):
            raise SessionNameError(
                f"a session name cannot contain control characters (U+{ord(ch):04X})"
            )
    if name[0] in "-.":
        raise SessionNameError(f"a session name cannot start with {name[0]!r}")
    for ch in name:
        if unicodedata.category(ch)[0] not in "LNM" and ch not in " -_.":
            raise SessionNameError(
                f"a session name holds letters, digits, spaces, '-', '_' and '.', not {ch!r}"
            )
    return name
