"""``python -m jobs.annotate``: the command line of the annotation job and its exit status."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from retinaface_core.storage import redact

from .._config import parse_config
from .._exit import ExitCode, JobError
from .config import AnnotateConfig
from .job import ShardsFailed, run


def main(argv: Sequence[str] | None = None) -> ExitCode:
    """Run the job; FAILED for a job-level error, SHARDS_FAILED when shards did not commit (``docs/exit_codes.md``)."""
    # A package run with -m would otherwise call itself "__main__.py" in its usage line.
    config = parse_config(AnnotateConfig, argv, prog="python -m jobs.annotate")
    try:
        run(config)
    except JobError as exc:
        print(f"annotate: error: {redact(str(exc))}", file=sys.stderr, flush=True)
        return ExitCode.FAILED
    except ShardsFailed as exc:
        print(f"annotate: error: {redact(str(exc))}", file=sys.stderr, flush=True)
        return ExitCode.SHARDS_FAILED
    return ExitCode.OK
