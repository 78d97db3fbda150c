"""Annotate every face in a set of images: object storage -> Ray actor pool -> Parquet, exactly once.

Run locally (starts a local Ray)::

    python -m jobs.annotate --input s3://bucket/photos/ --output s3://bucket/faces/

or on a cluster::

    ray job submit --working-dir . -- python -m jobs.annotate --input ... --output ...

The input is listed and cut into shards on the driver, or, from an inventory (``--inventory``),
planned in Ray Data without holding the URIs on the driver; images already in committed shards
of the output are skipped; the rest stream through a Ray Data actor pool, each shard becoming
one Parquet object whose write is its commit. See ``docs/annotate.md`` for the flags, the
output layout and the queries.

One module per concept, each importing only those above it:

- :mod:`.config`: :class:`AnnotateConfig`, the job's settings;
- :mod:`.shards`: :class:`Shard`, consecutive URIs named by their hash, and the rows the actors take;
- :mod:`.digests`: URI digests, how the driver compares a listing with the output;
- :mod:`.output`: :class:`OutputStore`, the output folder, its layout and commits;
- :mod:`.inventory`: the input from an inventory, planned in Ray Data;
- :mod:`.lease`: :class:`RunLease`, one run at a time on an output;
- :mod:`.plan`: every job-level check, then what a run does (:class:`Plan`);
- :mod:`.summary`: the shard and run summaries;
- :mod:`.crops`: the faces' aligned crops (``--crops``), the worker's crop hook;
- :mod:`.worker`: what runs on the Ray workers (:class:`ShardAnnotator`);
- :mod:`.job`: :func:`run`, the plan streamed through the actor pool;
- :mod:`.cli`: :func:`main`, the command line and its exit status;
- :mod:`.report`: ``python -m jobs.annotate.report``, a contact sheet of an output.

The job's input listing (:mod:`jobs._inputs`), model identity (:mod:`jobs._model`) and exit
statuses (:mod:`jobs._exit`) are shared with the other jobs.
"""

from .cli import main
from .config import AnnotateConfig
from .job import Interrupted, ShardsFailed, run

__all__ = ["AnnotateConfig", "Interrupted", "ShardsFailed", "main", "run"]
