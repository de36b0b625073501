"""One clear message and a non-zero exit for user errors, instead of a traceback."""
from __future__ import annotations

import functools
import sys

from dpdm.data.acquire import DatasetCorruptError, DatasetMissingError
from dpdm.training.module import PrivacyBudgetExhausted

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, DatasetMissingError,
               DatasetCorruptError, PrivacyBudgetExhausted)


def exit_on_user_error(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            print(f"\nerror: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
