"""Training images inside WebDataset tar shards (LAION's layout: img2dataset's webdataset output),
and the one function that reads any image uri, `read_uri`.

A shard `00000.tar` holds each sample as members sharing a key: `000000123.jpg` (the image),
`000000123.txt` (its caption), `000000123.json` (metadata). An image member's uri is fsspec's own
chained form, `tar://000000123.jpg::s3://b/laion/00000.tar`, which any fsspec user can open.

Why not fsspec.open on that uri: its TarFileSystem shares one file handle per shard, and the
decoder reads rows on threads (memex/ingest.py), so members would be read through one seek
position at once. `read_uri` reads a member as one ranged read of the shard at the member's offset
(one request on object storage, as for a file of its own), from the shard's offsets (member ->
data offset, size), kept in memory for the shards last read, up to TAR_CACHE_BYTES (as Arrow arrays:
~33 bytes a member, ~0.33 MB for a shard of 10k samples). Where the offsets come from, per shard and process:
  * the shard's kept listing (`<index root>/_shard_listings/`, memex/ingest.py), which records each
    member's offset and size as the listing's one sequential read of the shard saw them: one HEAD of
    the shard (its version names the listing: a shard rewritten since has none) and one GET of the
    listing (~0.5 MB for 10k LAION samples, captions included; ~1/1000 of the shard);
  * else a scan of the shard's headers (a listing kept before offsets were, a set listed without
    an index, a manifest of tar:// uris). tarfile seeks over the data, but through s3fs's readahead
    file that reads the whole shard (~400 MB for a LAION shard) for one member.
"""

from __future__ import annotations

import logging
import posixpath
import re
import tarfile
import threading
from collections import OrderedDict
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger("memex.shards")
# tar://<member>::<shard>: split at the last "::" that a URI (protocol://) follows, else an absolute path, else the
# first: a member named img::1.jpg is that member (the first "::" made it member "img" of a shard "1.jpg::s3://..",
# no such file). memex writes the shard's part with fs.unstrip_protocol (always a protocol); tests write plain paths
TAR_URI = re.compile(r"^tar://(?P<member>.+)::(?P<tar>[A-Za-z][A-Za-z0-9+.-]*://.*)$")
_TAR_URI_PATH = re.compile(r"^tar://(?P<member>.+)::(?P<tar>/.*)$")
_TAR_URI_ANY = re.compile(r"^tar://(?P<member>.+?)::(?P<tar>.+)$")
# The shards' offsets kept per process, by bytes: ~770 LAION shards of 10k samples (~0.33 MB each as Arrow arrays).
# A match shard's ~640 neighbours (64 generations x match.k=10) lie in ~640 shards of a LAION-size set, and each
# shard looked up again costs a HEAD of it and a GET of its kept listing (~0.5 MB) before the member's read: with
# the 64 shards kept before (as dicts, ~1.9 MB a shard, 125 MB), each samples shard looked up nearly every one of
# its shards again (321 of 331 in a set of 400 shards). A set of up to ~770 shards (7.7M images) is now looked up
# once a process; past that (LAION-2B: 231k shards) a neighbour's shard is rarely one kept, and only offsets kept
# with the index's rows would spare those requests (bench/bench_gid_reads.py --tars).
TAR_CACHE_BYTES = 256 << 20
# by (shard uri, its version: the listing's stamp, size + ETag/mtime): a shard rewritten in place in a long-lived
# process (a whole-night `memex nightly`) gave its members' old offsets, i.e. another member's bytes, without error
# (and by whether a kept listing was asked: its offsets are of image members only) -> (offsets, from a listing)
_index: OrderedDict[tuple[str, str | None, bool], tuple[Offsets, bool]] = OrderedDict()
_lock = threading.Lock()  # guards _index and _scanning
# one look-up per shard: the decoder's 8 threads ask at once
_scanning: dict[tuple[str, str | None, bool], threading.Lock] = {}
_unkept: set[str] = set()  # listing folders already named as holding no offsets (logged once each)
OFFSET_COLUMNS = ["member", "offset", "size"]  # of a kept listing (memex/ingest.py SHARD_LISTING_FILE_SCHEMA)


class Offsets:
    """A tar shard's member name -> (data offset, size), as Arrow arrays: ~33 bytes a LAION member (a name of
    13 characters), where a dict of str -> (int, int) held ~195. The names are sorted and `get` bisects them
    (~17 steps for 100k members): a scan of them per lookup made reading a whole shard quadratic (the index
    build reads every member: 61 s for a 100k-member shard). A name twice (a tar appended to) is its last
    member, as tarfile and a dict give it."""

    def __init__(self, members: list[str] | pa.Array, offsets, sizes):
        members, offsets, sizes = (v.cast(t) if isinstance(v, pa.Array) else pa.array(v, t)
                                   for v, t in ((members, pa.string()), (offsets, pa.int64()), (sizes, pa.int64())))
        # reversed, then a stable sort by name (UTF-8 bytes: Python's str order): of equal names the last member
        # comes first, where get's bisection lands
        order = np.arange(len(members) - 1, -1, -1)
        order = order[pc.sort_indices(members.take(order)).to_numpy()]
        self.members, self.offsets, self.sizes = members.take(order), offsets.take(order), sizes.take(order)
        self.nbytes = self.members.nbytes + self.offsets.nbytes + self.sizes.nbytes

    def get(self, member: str) -> tuple[int, int] | None:
        lo, hi = 0, len(self.members)
        while lo < hi:  # the first name >= member
            mid = (lo + hi) // 2
            if self.members[mid].as_py() < member:
                lo = mid + 1
            else:
                hi = mid
        if lo == len(self.members) or self.members[lo].as_py() != member:
            return None
        return self.offsets[lo].as_py(), self.sizes[lo].as_py()

    def __len__(self) -> int:
        return len(self.members)


def is_hidden(rel: str) -> bool:
    """Whether a path relative to a training set's root (a tar member's name) lies in a hidden or tool's part:
    one starting with "." (.ipynb_checkpoints/, macOS's ._a.jpg AppleDouble files, .DS_Store) or named
    __MACOSX (a zip's AppleDouble folder), as pyarrow skips a Parquet dataset's _/. parts. "." alone (a tar
    member ./0001.jpg) is no hidden part; the root's own name is not in `rel` (a user's ~/.cache/... set)."""
    return any((p.startswith(".") and p != ".") or p == "__MACOSX" for p in rel.split("/"))


def member_uri(member: str, tar_uri: str) -> str:
    return f"tar://{member}::{tar_uri}"


def split_member_uri(uri: str) -> tuple[str, str] | None:
    """(member, shard URI) of a tar member's uri (member_uri), or None for any other uri."""
    m = TAR_URI.match(uri) or _TAR_URI_PATH.match(uri) or _TAR_URI_ANY.match(uri)
    return None if m is None else (m["member"], m["tar"])


def uri_fs(uri: str, opts: dict[str, Any]) -> tuple[Any, str]:
    """(filesystem, path) of a uri, as fsspec.core.url_to_fs gives them, but "::" in a file's name is part of its
    name: fsspec reads every "::" as a link of a chain (simplecache::s3://b/x.png, zip://a.png::s3://b/a.zip), so
    file:///pics/g::h.png opened the file /pics/g (the image quarantined as missing, under another file's name).
    A uri is a chain only where each part after the first is a URI of its own or a protocol's name."""
    parts = uri.split("::")
    if len(parts) == 1 or all("://" in p or p in fsspec.available_protocols() for p in parts[1:]):
        return fsspec.core.url_to_fs(uri, **opts)
    # the same filesystem and options (a protocol's nested ones too) from the uri with no "::", then its own path
    fs, _ = fsspec.core.url_to_fs(uri.replace("::", "__"), **opts)
    return fs, fs._strip_protocol(uri)


def tar_members(tar_uri: str, opts: dict[str, Any], version: str | None = None) -> Offsets:
    """Member name -> (data offset, size) of the regular files of a tar shard, from a scan of its headers,
    cached per process (see _offsets)."""
    return _offsets(tar_uri, opts, version, None)[0]


def _offsets(tar_uri: str, opts: dict[str, Any], version: str | None,
             listings: str | None) -> tuple[Offsets, bool]:
    """(member name -> (data offset, size), whether from a kept listing: its image members only), cached per
    process by (shard, version, whether a listing was asked for). From the shard's listing under `listings`
    where one of its current version holds offsets (kept_offsets), else from a scan of all its headers.
    One thread looks a shard up while the others asking for it wait: without that, every thread asked
    before the first scan ended scanned it too (measured: 2,000 images in 4 shards decoded in 7.0-7.5 s
    against 5.3-5.5 s with the shards' indexes ready, bench/bench_shards.py)."""
    key = (tar_uri, version, listings is not None)
    with _lock:
        if key in _index:
            _index.move_to_end(key)
            return _index[key]
        scan = _scanning.setdefault(key, threading.Lock())
    with scan:
        with _lock:
            if key in _index:
                return _index[key]
        members = kept_offsets(tar_uri, opts, listings) if listings else None
        got = (members, True) if members is not None else (_scan(tar_uri, opts), False)
        with _lock:
            _index[key] = got
            _scanning.pop(key, None)
            # (summed anew: a few hundred entries, once a shard looked up, i.e. a request of ~20-50 ms)
            held = sum(m.nbytes for m, _ in _index.values())
            while held > TAR_CACHE_BYTES and len(_index) > 1:  # (the shard just read is kept, whatever its size)
                held -= _index.popitem(last=False)[1][0].nbytes
    return got


def _scan(tar_uri: str, opts: dict[str, Any]) -> Offsets:
    """Every header of the shard: through s3fs's readahead file, the whole shard is read."""
    fs, path = uri_fs(tar_uri, opts)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
        files = [m for m in tf.getmembers() if m.isfile()]
    return Offsets([m.name for m in files], [m.offset_data for m in files], [m.size for m in files])


def kept_offsets(tar_uri: str, opts: dict[str, Any], listings: str) -> Offsets | None:
    """The shard's image members' offsets from its listing kept under `listings` (memex/ingest.py _from_shards),
    or None: no listing there of the shard's version now (none kept: the set listed without an index, or under
    another root; the shard rewritten since: its old offsets would give other bytes), or one kept before
    listings held offsets (then logged once: the scan reads every such shard whole).

    Why the listing, and not the index's train_rows.parquet (which the neighbour fetch reads anyway): the listing
    is written where the shard is read (its offsets are there for free), it is keyed by exactly what makes
    offsets valid (the shard's URI and version), and a set listed before is upgraded by listing it again, with
    no index rebuilt; offsets in train_rows.parquet would need its schema and every index built before to change.
    Cost: a HEAD of the shard for its version (asked of the store, not of this process's listing cache, which
    may predate a rewrite) and one GET of the listing whole (captions too: ~0.5 MB for 10k LAION samples, one
    request; its three columns alone, ~0.1 MB, were 3 requests, size, footer then pages, each ~20-50 ms on S3,
    where 0.4 MB more is ~4 ms at S3's ~100 MB/s a connection)."""
    from memex.ingest import _stamp, shard_listing_name  # (memex.ingest imports this module)
    from memex.storage import is_damage

    fs, path = uri_fs(tar_uri, opts)
    fs.invalidate_cache(path)
    name = posixpath.join(listings.rstrip("/"), shard_listing_name(tar_uri, _stamp(fs.info(path))))
    lfs, lpath = fsspec.core.url_to_fs(name, **opts)
    try:
        t = pq.read_table(pa.BufferReader(lfs.cat_file(lpath, start=0)))  # (a range: s3fs sends no HEAD first)
    except FileNotFoundError:
        return None
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:  # a damaged listing: the listing pass makes it again
        if isinstance(e, OSError) and not is_damage(e):  # the store's failure: raised, as the scan's would be
            raise
        return None
    if not set(OFFSET_COLUMNS) <= set(t.column_names):
        with _lock:
            first = listings not in _unkept
            _unkept.add(listings)
        if first:
            log.warning("shard listings kept under %s hold no member offsets (kept before memex read members by "
                        "them): each tar shard a training image is read from is read whole to find it, once per "
                        "process. Delete that folder to have the next audit list each shard again (reading it "
                        "whole, once) with its offsets; the index stays as it is", listings)
        return None
    return Offsets(*(t[c].combine_chunks() for c in OFFSET_COLUMNS))


def store_failure(e: BaseException) -> bool:
    """Whether a failed read_uri is the store's (an outage, throttling, credentials: retried by a rerun) rather
    than the row's (a bad row: quarantined, or named). Matched by module, as botocore and the rest are optional
    imports. A missing file, a damaged tar shard and a uri no filesystem reads are the row's."""
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, tarfile.TarError, EOFError,
                      ValueError)):
        return False
    if isinstance(e, OSError):  # fsspec's mapping of S3's refusals, resets and throttling; local disk's errors
        return True
    from memex.storage import client_error

    return client_error(e)


def read_uri(uri: str, opts: dict[str, Any], version: str | None = None, listings: str | None = None) -> bytes:
    """The bytes of an image uri: a file on any fsspec filesystem, or a tar shard's member. `version`:
    the listing's stamp of the uri's file (a tar member's: its shard's), which keys the shard's offsets.
    `listings`: the folder of kept shard listings to take a shard's offsets from (kept_offsets), else its
    headers are scanned."""
    split = split_member_uri(uri)
    if split is None:
        fs, path = uri_fs(uri, opts)
        with fs.open(path, "rb") as f:
            return f.read()
    member, tar = split
    members, listed = _offsets(tar, opts, version, listings)
    found = members.get(member)
    if found is None and listed:  # a member the listing has no row of (a caption, a hidden file): its headers
        found = tar_members(tar, opts, version).get(member)
    if found is None:
        raise FileNotFoundError(f"{member} is not a member of {tar}")
    offset, size = found
    if not size:  # a 0-byte member: a range of nothing, which S3 answers with the whole object (the shard)
        return b""
    fs, path = uri_fs(tar, opts)
    return fs.cat_file(path, start=offset, end=offset + size)


class ShardSampleError(ValueError):
    """A shard sample whose image is not one member (two image fields): which one a trainer read is not ours to
    guess."""


def shard_samples(fs: Any, tar: str, image_suffixes: tuple[str, ...]) -> list[tuple[str, str | None, int, int]]:
    """(image member, caption, its data's offset in the shard, its size) of every sample of one shard, in one
    sequential read of it (the captions are small members between the images: reading them is reading the
    shard, ~its size). The offsets, kept with the listing, let a member be read later without that read
    (kept_offsets).

    WebDataset's rule: a member's key is its name up to the first dot of its basename, its field the
    rest; a sample's image is the member whose whole field is an image suffix (0001.jpg, not the
    0001.depth.png beside it, which a trainer's to_tuple("jpg") never reads), its caption its .txt
    member, else None. A sample with two such fields (0001.jpg and 0001.png: img2dataset writes one of
    jpg/png/webp) raises ShardSampleError naming it. A sample with none:
      * one image member with a dotted field (0001.image.png, 0003.depth.png) is its image, its caption
        the sample's .txt, as before;
      * several (photo.2021.01.jpg, photo.2021.02.jpg: plain files with dots in their names, one "key"
        under the rule above) are each a row of its own, captioned by its <name>.txt, as in a folder, with
        a warning naming the sample (which one a trainer read, if any, is not ours to guess)."""
    fields: dict[str, dict[str, str]] = {}  # key -> field -> member name
    texts: dict[str, str] = {}  # .txt member -> its text
    where: dict[str, tuple[int, int]] = {}  # member -> (data offset, size): as tarfile.getmembers would give
    with fs.open(tar, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for m in tf:
            if not m.isfile() or is_hidden(m.name):  # a tar made on macOS holds ._0001.jpg; a folder tarred whole,
                continue  # its .ipynb_checkpoints/0001-checkpoint.jpg (key and field of a sample of its own)
            folder, base = posixpath.split(m.name)
            stem, _, field = base.partition(".")
            fields.setdefault(posixpath.join(folder, stem), {})[field] = m.name
            where[m.name] = (m.offset_data, m.size)
            if m.name.endswith(".txt"):
                texts[m.name] = caption_text(tf.extractfile(m).read())
        # tarfile reads a header of no bytes at all as the archive's end, so a shard cut at a member boundary (a
        # writer killed between members, a sync stopped on a block) listed its first samples and no error; a
        # whole tar ends with zero blocks (1,024 bytes, padded to 10,240 by tarfile and GNU tar) after them
        size = getattr(f, "size", None)
        if size is not None and tf.offset >= size:
            raise tarfile.ReadError(f"it ends after {len(fields)} samples without tar's end-of-archive blocks: cut "
                                    "short at a member boundary")
    suffixes = {s.lstrip(".") for s in image_suffixes}
    out, split = [], []
    for key in sorted(fields):
        got = fields[key]
        whole = sorted(f for f in got if f.lower() in suffixes)
        dotted = sorted(f for f in got if f.lower() not in suffixes and got[f].lower().endswith(image_suffixes))
        caption = texts.get(got["txt"]) if "txt" in got else None
        if len(whole) > 1:
            raise ShardSampleError(f"shard {fs.unstrip_protocol(tar)}: sample {key} has several images "
                                   f"({', '.join(whole)}): a WebDataset sample holds one image (img2dataset "
                                   "writes one of jpg/png/webp); remove the others from the shard")
        if whole or len(dotted) == 1:
            image = got[whole[0] if whole else dotted[0]]
            out.append((image, caption, *where[image]))
        elif dotted:
            split.append(f"{key} ({', '.join(dotted)})")
            out += [(got[f], texts.get(posixpath.splitext(got[f])[0] + ".txt"), *where[got[f]]) for f in dotted]
    if split:
        log.warning("shard %s: %d sample(s) hold several images with dots in their names and no plain image field, "
                    "listed as a row each, e.g. %s (WebDataset: key = a name up to its first dot)",
                    fs.unstrip_protocol(tar), len(split), split[0])
    return sorted(out, key=lambda r: r[0])


def caption_text(text: bytes | str) -> str:
    """A sidecar caption (.txt) as its text: UTF-8, undecodable bytes as U+FFFD, outer whitespace and one leading
    byte order mark dropped (Windows Notepad and PowerShell write one: it was kept, so the prompt was another text
    than the same caption in a manifest, with its own prompt id). `text` already decoded: a listing kept before."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return text.strip().removeprefix("\ufeff").strip()


# ---- shard patterns --------------------------------------------------------------------------
# WebDataset names a set of shards as `laion/{00000..00099}.tar` (its brace notation, as webdataset
# and img2dataset's docs write it); shell-style globs (`laion/0000*.tar`) are fsspec's own.
PATTERN_CHARS = re.compile(r"[*?\[{]")
BRACE = re.compile(r"\{([^{}]*)\}")


class ShardPatternError(ValueError):
    """A shard pattern that names nothing, or shards that are missing."""


def is_pattern(path: str) -> bool:
    return bool(PATTERN_CHARS.search(path))


def expand_braces(pattern: str) -> list[str]:
    """`{00000..00003}` -> 00000 00001 00002 00003 (zero-padded to the first bound's width when it
    starts with 0), `{a,b}` -> a b; several groups give every combination, in order."""
    m = BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        if int(lo) > int(hi):
            raise ShardPatternError(f"{{{body}}} counts down: write the smaller bound first")
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [x for item in items for x in expand_braces(pattern[:m.start()] + item + pattern[m.end():])]


def pattern_root(pattern: str) -> str:
    """The folder above the pattern's first wildcard: shard ids are relative to it, as they are to a
    folder given whole, so `laion/{00000..00009}.tar` and `laion/` give a shard the same ids."""
    return posixpath.dirname(pattern[:PATTERN_CHARS.search(pattern).start()])


def expand_shards(fs: Any, pattern: str) -> dict[str, dict]:
    """Shard path -> fsspec info of every shard the pattern names: braces expanded, then each glob
    listed (hidden files it matches skipped: is_hidden). A shard named outright that does not exist, or a
    glob matching nothing, raises."""
    found: dict[str, dict] = {}
    missing: list[str] = []
    listed: dict[str, dict[str, dict]] = {}  # folder -> its files: one listing, not a request a shard
    for p in expand_braces(pattern):
        if is_pattern(p):
            top = pattern_root(p)  # what a glob matched below it: a hidden one (macOS's ._00000.tar) is no shard
            hits = {k: v for k, v in fs.glob(p, detail=True).items() if not is_hidden(k[len(top):].lstrip("/"))}
            if not hits:
                missing.append(p)
            found.update({k: v for k, v in hits.items() if v.get("type") != "directory"})
            continue
        parent = posixpath.dirname(p)
        if parent not in listed:
            try:
                listed[parent] = {posixpath.basename(i["name"].rstrip("/")): i for i in fs.ls(parent, detail=True)}
            except FileNotFoundError:
                listed[parent] = {}
        info = listed[parent].get(posixpath.basename(p))
        if info is None or info.get("type") == "directory":
            missing.append(p)
        else:
            found[p] = info
    if missing:
        raise ShardPatternError(f"names {len(missing)} shard(s) that do not exist (e.g. {missing[0]}), of "
                                f"{len(missing) + len(found)}: fix the pattern, or give the folder holding the shards")
    return dict(sorted(found.items()))
