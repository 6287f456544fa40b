"""A sidecar caption saved by Windows Notepad (or PowerShell's Out-File) starts with a UTF-8 byte order
mark. It was read into the caption, so the prompt was "\ufeffa red logo": another prompt than the same
caption in a manifest or a metadata file (its own prompt id), and a character CLIP's tokenizer reads as
text."""
import io
import tarfile

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memex.images import encode_png
from memex.ingest import list_training_set
from memex.storage import Store

BOM = "\ufeff".encode()


def _png(i: int) -> bytes:
    return encode_png(np.full((16, 16, 3), i * 40, np.uint8))


def test_a_byte_order_mark_is_not_part_of_a_folder_sidecar_caption(tmp_path):
    fs, root = fsspec.filesystem("file"), str(tmp_path / "set")
    fs.makedirs(root, exist_ok=True)
    for i, text in enumerate([BOM + b"a red logo\r\n", b"a blue logo", BOM + BOM + b" a green logo"]):
        fs.pipe_file(f"{root}/{i}.png", _png(i))
        fs.pipe_file(f"{root}/{i}.txt", text)
    # a BOM is removed once, as the codec does; a second one is text the file holds
    assert list_training_set(root)["caption"].to_pylist() == ["a red logo", "a blue logo", "\ufeff a green logo"]


def test_a_byte_order_mark_is_not_part_of_a_webdataset_caption(tmp_path):
    fs, root = fsspec.filesystem("file"), str(tmp_path / "shards")
    fs.makedirs(root, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for k, text in enumerate([BOM + b"a red logo\n", b"a blue logo"]):
            for name, data in ((f"{k:09d}.png", _png(k)), (f"{k:09d}.txt", text)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    fs.pipe_file(f"{root}/00000.tar", buf.getvalue())
    assert list_training_set(root)["caption"].to_pylist() == ["a red logo", "a blue logo"]
    # a shard listing kept before (its captions with the mark) gives the same captions as a fresh listing
    cache = Store(str(tmp_path / "_shard_listings"))
    assert list_training_set(root, shard_cache=cache)["caption"].to_pylist() == ["a red logo", "a blue logo"]
    (kept,) = fs.glob(f"{tmp_path}/_shard_listings/*.parquet")
    t = pq.read_table(kept)
    old = t.set_column(t.schema.get_field_index("caption"), "caption",
                       pa.array(["\ufeff" + c for c in t["caption"].to_pylist()]))
    pq.write_table(old, kept)
    assert list_training_set(root, shard_cache=cache)["caption"].to_pylist() == ["a red logo", "a blue logo"]
