"""smallbig.data: acquisition, frames, validation, sampling and views, the embedded dataset.

Public API (docs/architecture.md, section Data; details in docs/data.md):
    build_dataset(params, split, mode, protocol=None), collate(batch), normalize(x, mean, std),
    BadSample, DataError, Entry, read_list, write_list.
Imported lazily, so light tools (the check workers) do not load torch.
"""

from __future__ import annotations

_DATASET = {"BadSample", "VideoDataset", "build_dataset", "collate", "normalize"}
_LISTS = {"DataError", "Entry", "read_list", "write_list"}
__all__ = sorted(_DATASET | _LISTS)


def __getattr__(name: str):
    if name in _DATASET:
        from smallbig.data import dataset

        return getattr(dataset, name)
    if name in _LISTS:
        from smallbig.data import lists

        return getattr(lists, name)
    raise AttributeError(f"module 'smallbig.data' has no attribute {name!r}")
