"""The commands' error type, in a module of its own so that every command module (and :mod:`srn_fast.cli` itself)
can import it without an import cycle."""


class UserError(Exception):
    """An error the user can fix (missing data folder, incompatible checkpoint, ...): printed as one line."""
