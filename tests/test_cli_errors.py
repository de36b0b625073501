"""The CLIs' user-error path: dpdm's own errors are recognised, and recognising them imports nothing heavy."""
import subprocess
import sys

import pytest

from tests.helpers import REPO


def test_dpdm_user_errors_exit_2_with_one_line_and_other_errors_still_raise(capsys):
    from dpdm.cli.errors import exit_on_user_error
    from dpdm.data.cache import DatasetCorruptError, DatasetMissingError
    from dpdm.training.module import PrivacyBudgetExhausted

    for error in (DatasetMissingError("run `make data`"), DatasetCorruptError("checksum"),
                  PrivacyBudgetExhausted("ε spent"), FileNotFoundError("no such run")):
        def fails(error=error):
            raise error

        with pytest.raises(SystemExit) as exit_info:
            exit_on_user_error(fails)()
        assert exit_info.value.code == 2 and capsys.readouterr().err == f"\nerror: {error}\n"

    def broken():
        raise KeyError("a bug, not a user error")

    with pytest.raises(KeyError):
        exit_on_user_error(broken)()


def test_refusing_a_missing_file_does_not_import_lightning():
    """A fresh interpreter (this one has imported everything): the refusal's path must not pull in the
    training module, which is what made `dpdm-study run <missing file>` take 11.6 s on a 2-core CPU."""
    probe = ("import sys\n"
             "from dpdm.cli.errors import exit_on_user_error\n"
             "def fails():\n    raise FileNotFoundError('missing.yaml')\n"
             "try:\n    exit_on_user_error(fails)()\n"
             "except SystemExit as e:\n    print(e.code, 'dpdm.training.module' in sys.modules, "
             "'pytorch_lightning' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout
