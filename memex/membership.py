"""The built membership index as later stages read it: where it is, its shards, its tables.

The index stage (memex/stages/index.py) writes `<index root>/<key>/` (layout.IndexLayout) and an
`IndexInfo` as its `_SUCCESS.json`; an audit copies that IndexInfo into the run folder
(`<run>/index.json`), so the match stage and the prompt ranking read everything from here:
FAISS shards (searched with memex/index.py), training rows by global id, near-duplicate counts
and the quarantine of unreadable training images. No Ray, no model: plain reads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, fields

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memex.config import IndexConfig
from memex.index import IndexSpec, load_index
from memex.layout import PICTURES_SCHEMA, QUARANTINE_SCHEMA, IndexLayout, RunLayout, StorageError
from memex.storage import READ_THREADS, client_error, damaged, is_damage, marker_of, store_failed
from memex.train_rows import read_gids, read_in


@dataclass
class IndexInfo:
    """What later stages need to use a built index (its _SUCCESS.json, and <run>/index.json)."""

    root: str
    key: str
    shards: list[tuple[int, int]]  # gid range [start, stop) per shard
    metric: str  # "l2" (faiss returns squared distances) or "ip"
    dim: int
    n_train: int
    n_indexed: int
    n_quarantined: int
    # True: embedded from each training image's luma (a grayscale model's audit: memex/stages/index.py)
    luma: bool = False
    # [height, width]: each training image cut to the generations' aspect first (non-square ones)
    aspect: list[int] | None = None
    # the embedder's weights when it was built (memex/embed.py weights_stamp): a reuse with others is refused
    embedder_stamp: str | None = None
    # "drop": training images decoded with their transparency ignored (trainset.alpha); None: onto white
    alpha: str | None = None

    @classmethod
    def from_json(cls, d: dict, where: str = "index.json") -> "IndexInfo":
        """`where`: the file `d` was read from, named when it is not an index this memex reads (keys of a
        newer memex, or none of its own: a bare TypeError from the dataclass)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        lacking = sorted(f.name for f in fields(cls) if f.default is MISSING and f.name not in d)
        if unknown or lacking:
            what = f"keys this memex does not know ({', '.join(unknown)})" if unknown else \
                f"no {', '.join(lacking)}"
            raise StorageError(f"{where} has {what}: it was written by another memex version, or is not an "
                               "index's; run the memex that wrote it, or delete the index folder to build it again")
        return cls(**{**d, "shards": [tuple(s) for s in d["shards"]]})

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("luma", "aspect", "embedder_stamp", "alpha"):  # left out unless set: a plain index JSON as before
            if not d[k]:
                del d[k]
        return d

    def layout(self, storage_options: dict) -> IndexLayout:
        return IndexLayout(self.root, self.key, storage_options)

    def spec(self, cfg: IndexConfig) -> IndexSpec:
        return IndexSpec.from_config(cfg, self.metric)


def read_info(run: RunLayout) -> IndexInfo:
    """The index an audit matched (or will match) this run against."""
    d = run.store.read_json(run.index_json)
    if d is None:
        raise StorageError(f"run {run.uri} has no index.json: it was not made by `memex audit`, which builds the "
                           "membership index first; run `memex audit` with the same settings")
    return IndexInfo.from_json(d, run.store.uri_of(run.index_json))


def load_shards(layout: IndexLayout, shards: list[int]) -> list[faiss.Index]:
    opts = layout.store.options
    return [load_index(layout.store.uri_of(layout.faiss_path(s)), opts) for s in shards]


def fetch_train_rows(layout: IndexLayout, gids: list[int], columns: list[str] | None = None) -> pa.Table:
    """Training rows for the given global ids, in gid order (the join of matches with training images;
    images from train.pack, one ranged read each: memex/train_rows.py)."""
    return read_gids(layout, gids, columns)


def read_quarantine(info: IndexInfo, storage_options: dict) -> pa.Table:
    """The training images that could not be read, and why (one table over all shards)."""
    layout = info.layout(storage_options)
    return pa.concat_tables([layout.store.read_table(layout.quarantine_path(s), schema=QUARANTINE_SCHEMA)
                             for s in range(len(info.shards))])


def read_duplicates(info: IndexInfo, storage_options: dict) -> pa.Table:
    """Near-duplicate count per indexed training image, most duplicated first (ties: by gid). Every
    training row in memory (~300 bytes each at the peak): the prompt ranking reads NearDuplicates instead."""
    t = info.layout(storage_options).dups.read()
    return t.sort_by([("near_duplicates", "descending"), ("gid", "ascending")])


RANK_SCHEMA = pa.schema([("caption", pa.string()), ("near_duplicates", pa.int32())])
RANK_ORDER = [("near_duplicates", "descending"), ("caption", "ascending")]  # rank_by_near_duplicates' order
_SCAN_BATCH = 16_384  # dups rows decoded at a time (~1 MB of LAION captions)


class NearDuplicates:
    """The index's captions in prompt rank order (most near-duplicated first, ties by caption as stored),
    read a page at a time for memex.prompts.rank_by_near_duplicates, which stops at prompts.limit.
    read_duplicates held every training row (gid, id, caption) and sorted them twice to pick 24 prompts:
    +630 MiB of driver memory for 2M rows, ~600 GiB for LAION-2B's (bench/bench_dups_memory.py). A page
    scans every dups file (caption and count, a batch at a time) and keeps only its own rows: memory grows
    with the page, not the training set."""

    def __init__(self, info: IndexInfo, storage_options: dict):
        self.layout = info.layout(storage_options)

    def pages(self, first: int | None) -> Iterator[pa.Table]:
        """(caption, near_duplicates) of the captioned rows in RANK_ORDER, `first` rows at first, then each
        page as many as all before it (so a reader that stops early scanned the files ~log2(rows it read /
        first) + 1 times); first=None: every row, one page. A row with the count and caption of a page's
        last row may be left out of the next page: it would only repeat that caption."""
        after, size, read = None, first, 0
        while True:
            page = self._page(after, size)
            if page.num_rows:
                yield page
            if size is None or page.num_rows < size:  # every captioned row ranked after `after` is read
                return
            after = (page["near_duplicates"][-1].as_py(), page["caption"][-1].as_py())
            read += page.num_rows
            size = read

    def _page(self, after: tuple[int, str] | None, size: int | None) -> pa.Table:
        """The first `size` captioned rows ranked after `after` (a row's count and caption), in RANK_ORDER,
        from every dups file (READ_THREADS at a time) into one _Top."""
        dups = self.layout.dups
        paths = [dups.file(i) for i in dups.complete()]
        top = _Top(size)
        if paths:
            with ThreadPoolExecutor(min(READ_THREADS, len(paths)), thread_name_prefix="memex-dups") as pool:
                list(pool.map(lambda p: self._scan(p, after, top), paths))
        return top.table()

    def _scan(self, path: str, after: tuple[int, str] | None, top: _Top) -> None:
        """One dups file's captioned rows ranked after `after` and not after top.cut, into `top`, a batch at a time."""
        store = self.layout.store
        try:
            with store.fs.open(path, "rb") as f:
                # pre_buffer=False: one row group's columns at a time (with it, every group read so far stays
                # buffered: memex/manifest.py)
                pf = pq.ParquetFile(f, pre_buffer=False)
                col = pf.schema_arrow.get_field_index("near_duplicates")
                for g in range(pf.metadata.num_row_groups):
                    st = pf.metadata.row_group(g).column(col).statistics
                    if st is not None and st.has_min_max and ((after is not None and st.min > after[0]) or
                                                              (top.cut is not None and st.max < top.cut[0])):
                        continue  # every row of the group ranks before `after`, or after the cut
                    for b in pf.iter_batches(batch_size=_SCAN_BATCH, row_groups=[g], columns=RANK_SCHEMA.names):
                        t = pa.Table.from_batches([b]).select(RANK_SCHEMA.names).cast(RANK_SCHEMA)
                        top.add(t.filter(_ranked_within(after, top.cut)))
        except Exception as e:
            # named like Store.read_table names a damaged or unserved file: its marker in the recovery
            uri = store.uri_of(path)
            if client_error(e) or (isinstance(e, OSError) and not is_damage(e)):
                raise StorageError(store_failed("read", uri, e)) from e
            if not isinstance(e, (pa.ArrowInvalid, pa.ArrowTypeError, OSError)):
                raise
            marker = marker_of(path)
            raise StorageError(damaged(uri, "Parquet", e, [store.uri_of(marker)] if marker else None)) from e


class _Top:
    """The first `size` rows in RANK_ORDER of those the scan threads add (all: None). Rows are kept until they
    reach twice `size`, then sorted down to `size` (a sort every `size` rows kept); `cut` is then the last row
    kept (its count and caption): the threads skip any row ranked after it."""

    def __init__(self, size: int | None):
        self.size, self.kept, self.rows = size, [], 0
        self.cut: tuple[int, str] | None = None
        self._lock = threading.Lock()

    def add(self, t: pa.Table) -> None:
        if not t.num_rows:
            return
        with self._lock:
            self.kept.append(t)
            self.rows += t.num_rows
            if self.size is not None and self.rows >= 2 * self.size:
                self.kept = [_first(pa.concat_tables(self.kept), self.size)]
                self.rows = self.size
                self.cut = (self.kept[0]["near_duplicates"][-1].as_py(), self.kept[0]["caption"][-1].as_py())

    def table(self) -> pa.Table:
        return _first(pa.concat_tables(self.kept), self.size) if self.kept else RANK_SCHEMA.empty_table()


def _ranked_within(after: tuple[int, str] | None, cut: tuple[int, str] | None) -> pc.Expression:
    """Captioned rows ranked after `after` and not after `cut` (each a row's count and caption)."""
    nd, caption = pc.field("near_duplicates"), pc.field("caption")
    keep = caption.is_valid()
    if after is not None:
        keep = keep & ((nd < after[0]) | ((nd == after[0]) & (caption > pa.scalar(after[1]))))
    if cut is not None:
        keep = keep & ((nd > cut[0]) | ((nd == cut[0]) & (caption <= pa.scalar(cut[1]))))
    return keep


def _first(t: pa.Table, size: int | None) -> pa.Table:
    """The first `size` rows of `t` in RANK_ORDER (all of them: None), sorted."""
    # (a sort, then the first rows taken: pc.select_k_unstable took 5x a sort's time on two keys, a string one;
    # a slice of the sorted table would hold on to all of it)
    order = pc.sort_indices(t, RANK_ORDER)
    return t.take(order if size is None else order[:size])


def read_pictures(info: IndexInfo, storage_options: dict, gids) -> dict[int, int]:
    """gid -> its picture for the ids >= 0 in `gids`: the smallest gid of its group of near-duplicates
    (connected within index.dup_threshold, PICTURES_SCHEMA), or its own gid. Rows of one picture (LAION
    duplicates, re-encodings) count once in relative l2's reference set and in the extracted count."""
    want = sorted({int(g) for g in np.asarray(gids).ravel() if g >= 0})
    if not want:
        return {}
    t = _pictures(info, storage_options, ("gid", want), ["gid", "picture"])
    return {g: g for g in want} | dict(zip(t["gid"].to_pylist(), t["picture"].to_pylist()))


def picture_rows(info: IndexInfo, storage_options: dict, pictures: list[int]) -> dict[int, list[str]]:
    """picture -> the ids of every training row of that picture (sorted by gid, the picture's own first)."""
    if not pictures:
        return {}
    t = _pictures(info, storage_options, ("picture", pictures))
    out: dict[int, list[tuple[int, str]]] = {p: [] for p in pictures}
    for g, i, p in zip(*(t[c].to_pylist() for c in ("gid", "id", "picture"))):
        out[p].append((g, i))
    single = [p for p, rows in out.items() if not rows]  # a picture of one row: its id from train_rows.parquet
    ids = fetch_train_rows(info.layout(storage_options), single, columns=["gid", "id"])
    out.update({g: [(g, i)] for g, i in zip(ids["gid"].to_pylist(), ids["id"].to_pylist())})
    return {p: [i for _, i in sorted(rows)] or [str(p)] for p, rows in out.items()}


def _pictures(info: IndexInfo, storage_options: dict, where: tuple[str, list[int]],
              columns: list[str] | None = None) -> pa.Table:
    """The rows of pictures.parquet whose where[0] ("gid" or "picture") is one of where[1]: only the row groups
    that can hold one are read (read_in; ("in", 640 gids) read every group). A lost or damaged file is
    named, with the fix."""
    layout = info.layout(storage_options)
    return read_in(layout.store, layout.pictures_path, where[0], where[1], columns, schema=PICTURES_SCHEMA)
