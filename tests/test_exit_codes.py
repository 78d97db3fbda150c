"""One exit-code enum for every entrypoint, and its one table in docs/exit_codes.md agrees with it."""

from __future__ import annotations

import importlib
import re
import typing
from pathlib import Path

import pytest

from jobs._exit import ExitCode

DOC = Path(__file__).resolve().parents[1] / "docs" / "exit_codes.md"
ENTRYPOINTS = ("jobs.annotate.cli", "jobs.evaluate", "jobs.train", "jobs.registry", "jobs.demo")


def table_rows() -> dict[int, str]:
    """Code -> its row of the table in docs/exit_codes.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|", line)
        if match:
            rows[int(match.group(1))] = line
    return rows


def test_the_table_lists_exactly_the_enums_codes_with_their_names():
    rows = table_rows()
    assert set(rows) == {int(code) for code in ExitCode}
    for name, code in ExitCode.__members__.items():  # aliases included
        assert f"`{name}`" in rows[int(code)], f"{name} = {int(code)} is not named in its row of {DOC.name}"


def test_codes_users_and_schedulers_rely_on():
    # The CronJob's podFailurePolicy fails on 3; argparse exits 2 on a bad command line; shells report 130 for Ctrl-C.
    assert (ExitCode.OK, ExitCode.CRASHED, ExitCode.FAILED, ExitCode.INTERRUPTED) == (0, 1, 2, 130)
    assert ExitCode.SHARDS_FAILED is ExitCode.REFUSED is ExitCode.INCOMPLETE == 3


@pytest.mark.parametrize("module", ENTRYPOINTS)
def test_every_entrypoint_returns_the_enum(module):
    main = importlib.import_module(module).main
    assert typing.get_type_hints(main)["return"] is ExitCode


def test_a_bad_command_line_is_failed(capsys):
    from jobs.annotate import main

    with pytest.raises(SystemExit) as exc:
        main(["--output", "x"])  # --input missing
    assert exc.value.code == ExitCode.FAILED
    assert "--input" in capsys.readouterr().err
