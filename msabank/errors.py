"""msabank's error hierarchy.

Every error msabank raises on purpose derives from `MsabankError` and, where a caller would naturally
catch a builtin, from that builtin too (zarr style). Errors carry the data at fault (path, document id,
field) and a `hint`; the CLI boundary (`msabank.cli.main`) is the only place that catches them and prints
`error: ...` / `hint: ...`. Never use `assert` for user input: `python -O` strips it.
"""

from __future__ import annotations


class MsabankError(Exception):
    """Base class. `hint` tells the user what to do next (may be empty)."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        if hint:
            self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(MsabankError, ValueError):
    """A checkpoint config, option or environment value msabank cannot serve."""


class CheckpointError(MsabankError, ValueError):
    """A checkpoint directory with missing/unknown/mis-shaped tensors or unreadable files."""


class InputError(MsabankError, ValueError):
    """Malformed user input (corpus file, question, id). Carries `path`/`line` when known."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, hint: str = "") -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message, hint=hint)
        self.path = path
        self.line = line


class DocumentNotFoundError(MsabankError, KeyError):
    """A user document id that is not (or no longer) in the bank."""

    def __init__(self, doc_id: str, *, hint: str = "") -> None:
        super().__init__(f"document {doc_id!r} is not in the bank", hint=hint or "list documents with `msabank ls`")
        self.doc_id = doc_id

    def __str__(self) -> str:  # KeyError would quote the whole message otherwise
        return self.message


class BankError(MsabankError):
    """Base for problems with a bank on disk."""


class BankNotFoundError(BankError, FileNotFoundError):
    """No bank at the given path."""


class BankExistsError(BankError, FileExistsError):
    """Creating a bank where one already exists."""


class BankFormatError(BankError, ValueError):
    """A bank written in another on-disk format version, or not a bank at all."""


class BankModelMismatchError(BankError, ValueError):
    """The bank was built with another model (fingerprint differs)."""


class BankLockedError(BankError):
    """Another process holds the bank's writer lock."""


class BankCorruptedError(BankError):
    """A checksum or structural check failed. Carries the document at fault when known."""

    def __init__(self, message: str, *, doc_id: str | None = None, hint: str = "") -> None:
        super().__init__(message, hint=hint or "run `msabank verify` for a full report")
        self.doc_id = doc_id


class BankAccessError(BankError, PermissionError):
    """The operating system refused access to a bank's files (permissions)."""


class BankReadOnlyError(BankError):
    """A write on a bank opened read-only."""


class BankClosedError(BankError):
    """A bank handle used after `close()` (or after the bank was opened for writing again in this process)."""


class KernelUnavailableError(MsabankError, RuntimeError):
    """An explicitly requested kernel implementation cannot run here."""


class ServerError(MsabankError):
    """An `msabank serve` server could not be reached or refused a request (the message names its URL)."""


class DistributedError(MsabankError, RuntimeError):
    """A memory-parallel rank failed or timed out."""
