"""One clear message and a non-zero exit for user errors, instead of a traceback."""
from __future__ import annotations

import functools
import sys


def _user_errors() -> tuple[type[BaseException], ...]:
    # Imported lazily: a CLI that fails early should not pay for importing Lightning and Opacus.
    from dpdm.data.acquire import DatasetCorruptError, DatasetMissingError
    from dpdm.training.module import PrivacyBudgetExhausted

    return (ValueError, FileNotFoundError, FileExistsError, PermissionError, DatasetMissingError,
            DatasetCorruptError, PrivacyBudgetExhausted)


def exit_on_user_error(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not isinstance(e, _user_errors()):
                raise
            print(f"\nerror: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
