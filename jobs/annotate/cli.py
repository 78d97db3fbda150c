"""``python -m jobs.annotate``: the command line of the annotation job and its exit status."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from retinaface_core.storage import redact

from .._config import parse_config
from .._exit import JobError
from .config import AnnotateConfig
from .job import ShardsFailed, run

EXIT_SHARDS_FAILED = 3


def main(argv: Sequence[str] | None = None) -> int:
    # A package run with -m would otherwise call itself "__main__.py" in its usage line.
    config = parse_config(AnnotateConfig, argv, prog="python -m jobs.annotate")
    try:
        run(config)
    except JobError as exc:
        print(f"annotate: error: {redact(str(exc))}", file=sys.stderr, flush=True)
        return 2
    except ShardsFailed as exc:
        print(f"annotate: error: {redact(str(exc))}", file=sys.stderr, flush=True)
        return EXIT_SHARDS_FAILED
    return 0
