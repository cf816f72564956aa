"""Dataset readers, WebDataset shard writing and reading.

Import the reader (it needs torch) from :mod:`wildreid.shards.reader`; this
package level stays light so shard-writing worker processes start fast.
"""

from wildreid.shards.layouts import (
    LAYOUTS,
    DatasetIndex,
    Record,
    Reject,
    detect_layout,
    read_dataset,
    read_folder,
    read_list,
)
from wildreid.shards.writer import load_manifest, pack_dataset, verify_shards

__all__ = [
    "LAYOUTS",
    "DatasetIndex",
    "Record",
    "Reject",
    "detect_layout",
    "load_manifest",
    "pack_dataset",
    "read_dataset",
    "read_folder",
    "read_list",
    "verify_shards",
]
