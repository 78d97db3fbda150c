"""How a job ends: :class:`JobError` for a job-level problem, and :class:`ExitCode`, the exit status
of every entrypoint (``jobs.annotate``, ``jobs.evaluate``, ``jobs.train``, ``jobs.registry``,
``jobs.demo``), for people and schedulers (the weekly CronJob).

The table of codes and what each means for each job is ``docs/exit_codes.md`` (a test checks that
it lists exactly these codes: ``tests/test_exit_codes.py``).
"""

from __future__ import annotations

import enum


class JobError(RuntimeError):
    """A problem of the job itself (not of one image): reported before any work starts."""


class ExitCode(enum.IntEnum):
    """An entrypoint's exit status; see ``docs/exit_codes.md``."""

    OK = 0
    # What Python exits with on an uncaught exception (its traceback says where): a bug, never returned.
    CRASHED = 1
    # A reported error, in one line; also what argparse exits with on a bad command line.
    FAILED = 2
    # The work ran to its end but its goal was not reached; what was done is kept.
    INCOMPLETE = 3
    # The same status under the name each job gives its case of it.
    SHARDS_FAILED = 3  # jobs.annotate: shards did not commit after their retries; a rerun does the rest
    REFUSED = 3  # jobs.train --promote, jobs.registry promote: the gate kept the current model
    INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C
