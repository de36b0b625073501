"""One clear message and a non-zero exit for user errors, instead of a traceback."""
from __future__ import annotations

import functools
import sys


def _user_errors() -> tuple[type[BaseException], ...]:
    # Imported lazily: a CLI that fails early should not pay for importing Lightning and Opacus.
    from dpdm.data import DatasetCorruptError, DatasetMissingError
    from dpdm.training.module import PrivacyBudgetExhausted

    return (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
            DatasetMissingError, DatasetCorruptError, PrivacyBudgetExhausted)


def _user_error_of(e: BaseException) -> BaseException | None:
    """The user error behind `e`: itself, or the cause Hydra wrapped in "Error in call to target"."""
    from hydra.errors import InstantiationException

    errors = _user_errors()
    if isinstance(e, errors):
        return e
    if isinstance(e, InstantiationException) and isinstance(e.__cause__, errors):
        return e.__cause__
    return None


def exit_on_user_error(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            err = _user_error_of(e)
            if err is None:
                raise
            print(f"\nerror: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
