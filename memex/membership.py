"""The built membership index as later stages read it: where it is, its shards, its tables.

The index stage (memex/stages/index.py) writes `<index root>/<key>/` (layout.IndexLayout) and an
`IndexInfo` as its `_SUCCESS.json`; an audit copies that IndexInfo into the run folder
(`<run>/index.json`), so the match stage and the prompt ranking read everything from here:
FAISS shards (searched with memex/index.py), training rows by global id, near-duplicate counts
and the quarantine of unreadable training images. No Ray, no model: plain reads.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields

import faiss
import numpy as np
import pyarrow as pa

from memex.config import IndexConfig
from memex.index import IndexSpec, load_index
from memex.layout import PICTURES_SCHEMA, QUARANTINE_SCHEMA, IndexLayout, RunLayout, StorageError
from memex.train_rows import read_gids


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
    """Near-duplicate count per indexed training image, most duplicated first (ties: by gid)."""
    t = info.layout(storage_options).dups.read()
    return t.sort_by([("near_duplicates", "descending"), ("gid", "ascending")])


def read_pictures(info: IndexInfo, storage_options: dict, gids) -> dict[int, int]:
    """gid -> its picture for the ids >= 0 in `gids`: the smallest gid of its group of near-duplicates
    (connected within index.dup_threshold, PICTURES_SCHEMA), or its own gid. Rows of one picture (LAION
    duplicates, re-encodings) count once in relative l2's reference set and in the extracted count."""
    want = sorted({int(g) for g in np.asarray(gids).ravel() if g >= 0})
    if not want:
        return {}
    t = _pictures(info, storage_options, ("gid", want))
    return {g: g for g in want} | dict(zip(t["gid"].to_pylist(), t["picture"].to_pylist()))


def picture_rows(info: IndexInfo, storage_options: dict, pictures: list[int]) -> dict[int, list[str]]:
    """picture -> the ids of every training row of that picture (sorted by gid, the picture's own first)."""
    if not pictures:
        return {}
    t = _pictures(info, storage_options, ("picture", sorted(pictures)))
    out: dict[int, list[tuple[int, str]]] = {p: [] for p in pictures}
    for g, i, p in zip(*(t[c].to_pylist() for c in ("gid", "id", "picture"))):
        out[p].append((g, i))
    single = [p for p, rows in out.items() if not rows]  # a picture of one row: its id from train_rows.parquet
    ids = fetch_train_rows(info.layout(storage_options), single, columns=["gid", "id"])
    out.update({g: [(g, i)] for g, i in zip(ids["gid"].to_pylist(), ids["id"].to_pylist())})
    return {p: [i for _, i in sorted(rows)] or [str(p)] for p, rows in out.items()}


def _pictures(info: IndexInfo, storage_options: dict, where: tuple[str, list[int]]) -> pa.Table:
    layout = info.layout(storage_options)  # a lost or damaged file is named by read_table, with the fix
    return layout.store.read_table(layout.pictures_path, schema=PICTURES_SCHEMA, filters=[(where[0], "in", where[1])])
