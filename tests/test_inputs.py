"""What an input names, as a user meets it: every object an image (one row later) or a counted
skip, whatever its name's bytes; one image rule for folders, S3 prefixes and manifests;
manifest entries made canonical; clear refusals; ``--max-pixels`` as the only pixel limit.

Real local folders (names with spaces, ``#``, ``?``, ``%``, newlines and bytes that are not
UTF-8), the session's moto S3 server and real manifests; no Ray.
"""

from __future__ import annotations

import io
import os
import struct
import urllib.parse
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs._config import parse_config
from jobs._exit import JobError
from jobs._inputs import list_input
from jobs.annotate import AnnotateConfig
from retinaface_core.image_io import ImageDecodeError, decode_image, read_bytes
from retinaface_core.storage import canonical_uri, filesystem

LATIN1 = os.fsdecode(b"caf\xe9.jpg")  # "café.jpg" written in Latin-1: not valid UTF-8
ODD_NAMES = ["a.jpg", "sp ace.jpg", "h#a?s%h.jpg", "new\nline.jpg", LATIN1, "anim.gif", "scan.TIF", "scan2.tiff"]


def write_files(folder: Path, names: list[str]) -> dict[str, bytes]:
    """Distinct bytes under each name (an object is then known by what it holds); returns name -> bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        data = f"object {i}: {name!r}".encode("utf-8", "surrogateescape")
        (folder / name).write_bytes(data)
        written[name] = data
    return written


def s3_put(bucket: str, files: dict[str, bytes]) -> None:
    fs, _ = filesystem(f"s3://{bucket}")  # keys as written, "?" and "#" included
    for key, data in files.items():
        fs.pipe_file(f"{bucket}/{key}", data)
    fs.invalidate_cache()


def test_a_local_folder_lists_every_name_whatever_its_bytes(tmp_path):
    folder = tmp_path / "photos"
    written = write_files(folder, [*ODD_NAMES, "notes.txt", "sub/.DS_Store", "sub/deeper/z.JPEG"])
    listing = list_input(str(folder))
    uris = listing.uris.to_pylist()
    assert listing.objects == len(written) == 11
    assert dict(listing.skipped.counts) == {"not_an_image_name": 2}
    assert len(uris) == 9 and uris == sorted(uris)
    # Each URI reads back exactly the object it names: nothing lost, nothing confused.
    by_content = {read_bytes(u): u for u in uris}
    for name, data in written.items():
        if name.endswith(("txt", "Store")):
            continue
        uri = by_content[data]
        if name == LATIN1:
            assert uri == f"file://{urllib.parse.quote(os.fsencode(str(folder)))}/caf%E9.jpg"
            assert os.fsdecode(urllib.parse.unquote_to_bytes(uri[len("file://") :])) == str(folder / LATIN1)
        else:
            assert uri == str(folder / name)


def test_an_s3_prefix_takes_gif_and_tiff_and_counts_what_it_skips(make_bucket):
    bucket = make_bucket("inputs")
    files = {f"in/{n}": f"object {i}".encode() for i, n in enumerate(["a b.jpg", "h#a?s%h.jpg", "anim.GIF", "scan.tif", "scan2.TIFF"])}
    files["in//slash.png"] = b"a key with an empty folder name"
    files["in/folder/"] = b""
    files["in/readme.md"] = b"text"
    s3_put(bucket, files)
    listing = list_input(f"s3://{bucket}/in/")
    assert dict(listing.skipped.counts) == {"folder_marker": 1, "not_an_image_name": 1}
    assert listing.skipped.examples["folder_marker"] == [f"s3://{bucket}/in/folder/"]
    images = {k: v for k, v in files.items() if not k.endswith(("/", ".md"))}
    assert listing.uris.to_pylist() == sorted(f"s3://{bucket}/{k}" for k in images)
    assert listing.objects == len(files)
    assert {read_bytes(u) for u in listing.uris.to_pylist()} == set(images.values())


def test_manifest_entries_are_canonical_relative_to_the_manifest_and_counted(tmp_path):
    folder = tmp_path / "set"
    write_files(folder, ["a.jpg", "b.png", "anim.gif", LATIN1, "notes.txt"])
    lines = [
        "# a comment, then a blank line",
        "",
        "a.jpg",  # relative: to the manifest's folder, not to the working directory
        f"file://{folder}/a.jpg",  # the same object again
        f"  {folder}//./a.jpg\t",  # and again
        f"{folder}/../set/b.png",
        "anim.gif",
        "notes.txt",
        "sub/",
        "caf\udce9.jpg",  # raw Latin-1 bytes in the text
        f"file://{urllib.parse.quote(str(folder))}/caf%E9.jpg",  # the same object, percent-encoded
        "s3://some-bucket/x\udce9.jpg",  # no object store holds such a name
    ]
    manifest = folder / "list.txt"
    manifest.write_bytes("\n".join(lines).encode("utf-8", "surrogateescape"))
    listing = list_input(str(manifest))
    latin1 = f"file://{urllib.parse.quote(str(folder))}/caf%E9.jpg"
    assert listing.uris.to_pylist() == sorted([str(folder / "a.jpg"), str(folder / "b.png"), str(folder / "anim.gif"), latin1])
    assert dict(listing.skipped.counts) == {"duplicate": 3, "not_an_image_name": 1, "folder_marker": 1, "name_not_utf8": 1}
    assert listing.objects == 10, "every entry, blank lines and comments aside"
    assert read_bytes(latin1) == (folder / LATIN1).read_bytes()

    # A Parquet manifest: a binary column carries names that are not UTF-8; nulls are no entries.
    pq.write_table(
        pa.table({"uri": pa.array([b"a.jpg", os.fsencode(LATIN1), None, str(folder / "b.png").encode()], pa.binary())}),
        folder / "list.parquet",
    )
    listing = list_input(str(folder / "list.parquet"))
    assert listing.uris.to_pylist() == sorted([str(folder / "a.jpg"), str(folder / "b.png"), latin1])
    assert listing.skipped.total() == 0


def test_manifest_on_s3_relative_entries_and_keys_as_written(make_bucket):
    bucket = make_bucket("manifest")
    s3_put(bucket, {"in/a b.jpg": b"1", "in/x.gif": b"2", "k.jpg": b"plain key", "/k.jpg": b"key with a leading slash"})
    s3_put(bucket, {"in/list.txt": "\n".join([
        "a b.jpg", f"s3a://{bucket}/in/a b.jpg", "x.gif", f"s3://{bucket}/in/x.gif/", f"s3://{bucket}/k.jpg", f"s3://{bucket}//k.jpg",
    ]).encode()})  # fmt: skip
    listing = list_input(f"s3://{bucket}/in/list.txt")
    wanted = [f"s3://{bucket}/in/a b.jpg", f"s3://{bucket}/in/x.gif", f"s3://{bucket}/k.jpg", f"s3://{bucket}//k.jpg"]
    assert listing.uris.to_pylist() == sorted(wanted)
    assert dict(listing.skipped.counts) == {"duplicate": 1, "folder_marker": 1}
    # s3://b//k names the key "/k": another object than s3://b/k, so both are kept.
    assert read_bytes(f"s3://{bucket}//k.jpg") == b"key with a leading slash" and read_bytes(f"s3://{bucket}/k.jpg") == b"plain key"
    assert canonical_uri(f"s3://{bucket}//k.jpg") == f"s3://{bucket}//k.jpg"


def test_a_single_file_as_input_is_refused_saying_so(tmp_path, make_bucket):
    write_files(tmp_path, ["one.jpg"])
    with pytest.raises(JobError, match="one.jpg is a single file, not a folder or prefix: .* or a manifest"):
        list_input(str(tmp_path / "one.jpg"))
    bucket = make_bucket("single")
    s3_put(bucket, {"photos/one.jpg": b"x"})
    with pytest.raises(JobError, match=f"s3://{bucket}/photos/one.jpg is a single file"):
        list_input(f"s3://{bucket}/photos/one.jpg")
    with pytest.raises(JobError, match="no such prefix or directory"):
        list_input(str(tmp_path / "absent"))


def test_no_images_says_what_was_skipped(tmp_path):
    write_files(tmp_path / "docs", ["readme.txt", "clip.mov"])
    with pytest.raises(JobError, match=r"no images found .*\.gif.*skipped 2 not_an_image_name \(e\.g\. .*clip\.mov"):
        list_input(str(tmp_path / "docs"))
    from jobs._inputs import SKIP_REASONS

    assert set(SKIP_REASONS) == {"folder_marker", "not_an_image_name", "duplicate", "name_not_utf8"}


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` 8-bit grey pixels, followed by image data
    that does not decode: what an image over Pillow's own bomb limit looks like until decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"not zlib data") + chunk(b"IEND", b"")


def test_max_pixels_is_the_only_pixel_limit(monkeypatch):
    huge = png_header(14000, 13000)  # 182 MP: above Pillow's own limit of 179 MP
    with pytest.raises(ImageDecodeError) as err:
        decode_image(huge, "huge.png", max_pixels=300_000_000)
    assert err.value.kind == "corrupt", "past every pixel limit: only its broken data stops it"
    with pytest.raises(ImageDecodeError, match=r"huge.png: .*182.0 MP exceeds the limit of 100 MP") as err:
        decode_image(huge, "huge.png", max_pixels=100_000_000)
    assert err.value.kind == "too_large"
    # Whatever another library in the process set Pillow's limit to, ours decides.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    small = io.BytesIO()
    Image.fromarray(np.zeros((100, 200), np.uint8)).save(small, "PNG")
    assert decode_image(small.getvalue(), "small.png").shape == (100, 200, 3)
    with pytest.raises(ImageDecodeError, match="exceeds the limit of 0.01 MP"):
        decode_image(small.getvalue(), "small.png", max_pixels=10_000)
    # The flag takes the way one writes such a limit.
    config = parse_config(AnnotateConfig, ["--input", "a", "--output", "b", "--max-pixels", "3e8"])
    assert config.max_pixels == 300_000_000
