"""The errors muvi raises for problems a caller can fix, all under :class:`MuviError`.

Each message is one line that names the file or argument at fault (a checkpoint's mismatch
list is the one exception: it lists every mismatch on its own line). The command-line tools
print them as ``muvi: error: …`` and exit with status 2; nothing else about them is special.

The classes also derive from the built-in type a caller would catch without knowing muvi
(``ValueError`` for bad values, ``FileNotFoundError`` for missing files, ``RuntimeError`` for
work that failed), so ``except ValueError`` keeps working.
"""
from __future__ import annotations


def one_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class MuviError(Exception):
    """Base class of every error muvi raises on purpose."""


class InputError(MuviError, ValueError):
    """A bad argument or input file: a number out of range, a file that cannot be used."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong type (a string where a number belongs, a bool for an integer)."""


class MissingFileError(InputError, FileNotFoundError):
    """An input file or folder that does not exist."""


class OutputError(InputError):
    """An output path that cannot be written: it exists, it is an input, or its folder is not writable."""


class OutputExistsError(OutputError, FileExistsError):
    """The output exists and replacing it was not asked for."""


class GenerationError(MuviError, RuntimeError):
    """Generation ran but produced something unusable (non-finite audio); nothing was written."""


class MuxError(MuviError, RuntimeError):
    """The video with music could not be written (the music itself is saved elsewhere)."""
