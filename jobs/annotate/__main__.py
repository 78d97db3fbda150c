"""``python -m jobs.annotate``; the command line itself is :mod:`jobs.annotate.cli` (a ``main`` defined
here would be imported twice, once as ``jobs.annotate.__main__`` and once as ``__main__``)."""

import sys

from .cli import main

sys.exit(main())
