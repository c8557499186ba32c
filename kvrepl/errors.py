"""Domain errors. The core raises these; only the edges (cli.py, repl.py) turn them into one-line
messages for the user. Each carries a message that is already fit to show."""


class KvreplError(Exception):
    """Base of every error kvrepl shows to the user as one line."""


class ModelError(KvreplError):
    """A model spec that cannot be resolved or loaded, or a model without what kvrepl needs."""


class PromptError(KvreplError):
    """Messages that cannot be rendered: no chat template, or over the context limit."""


class StoreError(KvreplError):
    """The SQLite store cannot be opened, migrated or written."""


class SessionNameError(KvreplError):
    """A session name that is refused (path separators, control characters, too long...)."""


class SnapshotError(KvreplError):
    """A KV snapshot that cannot be trusted or written."""


class UsageError(KvreplError):
    """A slash command or flag used wrongly."""
