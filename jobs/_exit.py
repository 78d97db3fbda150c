"""How a job ends: :class:`JobError` for a job-level problem, and the exit statuses of ``jobs.train`` and
``jobs.registry``, for schedulers (the weekly CronJob).

=====  ==========================================================================================
code   meaning
=====  ==========================================================================================
0      done: promoted, registered, or nothing to do (already registered / already current)
1      crashed: an unexpected error, with its traceback
2      failed: a reported error in one line (bad flag, checkpoint, data, registry, training run)
3      refused: the model was trained and registered, but the promotion gate kept the current one
130    interrupted (Ctrl-C, ``jobs.train``): rerunning the same command resumes
=====  ==========================================================================================

2 is also what argparse exits with on a bad command line, and what ``jobs.annotate`` and
``jobs.evaluate`` exit with on a reported error, so "2" means the same in every job.
"""

from __future__ import annotations

import enum


class JobError(RuntimeError):
    """A problem of the job itself (not of one image): reported before any work starts."""


class ExitCode(enum.IntEnum):
    """See the module docstring."""

    OK = 0
    FAILED = 2
    REFUSED = 3
    INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C
