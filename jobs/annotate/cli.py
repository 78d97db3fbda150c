"""``python -m jobs.annotate``: the command line of the annotation job and its exit status."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

from retinaface_core.storage import redact

from .._config import parse_config
from .._exit import ExitCode, JobError
from .config import AnnotateConfig
from .job import Interrupted, ShardsFailed, run


def main(argv: Sequence[str] | None = None) -> ExitCode:
    """Run the job; FAILED for a job-level error, SHARDS_FAILED when shards did not commit,
    INTERRUPTED after SIGINT/SIGTERM (``docs/exit_codes.md``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # A package run with -m would otherwise call itself "__main__.py" in its usage line.
    config = parse_config(AnnotateConfig, argv, prog="python -m jobs.annotate")
    try:
        run(config)
    except JobError as exc:
        print(f"annotate: error: {redact(str(exc))}", file=sys.stderr, flush=True)
        return ExitCode.FAILED
    except ShardsFailed as exc:
        print(f"annotate: error: {redact(str(exc))}\n{resume_line(argv, config)}", file=sys.stderr, flush=True)
        return ExitCode.SHARDS_FAILED
    except (Interrupted, KeyboardInterrupt) as exc:
        what = str(exc) if isinstance(exc, Interrupted) else "interrupted"
        print(f"annotate: {redact(what)}\n{resume_line(argv, config)}", file=sys.stderr, flush=True)
        return ExitCode.INTERRUPTED
    return ExitCode.OK


def resume_line(argv: list[str], config: AnnotateConfig) -> str:
    """The command that goes on where this run stopped: the same one, never with ``--overwrite``
    (which would delete what this run committed)."""
    args = [a for a in argv if a != "--overwrite"] + (["--no-overwrite"] if config.overwrite else [])
    return "annotate: resume with: " + redact(shlex.join(["python", "-m", "jobs.annotate", *args]))
