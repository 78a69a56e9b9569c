"""One ATen -> ONNX function registry per process for torch's dynamo exporter."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_TORCHLIB_REGISTRIES: dict = {}  # (registry class, args) -> the registry torch built


@contextlib.contextmanager
def shared_torchlib_registry() -> Iterator[None]:
    """Build torch's ATen -> ONNX function registry once per process, not once per export.

    ``torch.onnx.export(dynamo=True)`` rebuilds it from torchlib on every call (about 1 s of
    each export here, most of a small family's). Built, it is only read during an export (no
    ``custom_translation_table`` is passed), so one per opset serves them all; the exported
    files are byte-identical. Falls back to torch's own behaviour if that internal moves."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        yield
        return
    registry_cls = getattr(_registration, "ONNXRegistry", None)
    original = vars(registry_cls).get("from_torchlib") if registry_cls is not None else None
    if not isinstance(original, classmethod):
        yield
        return

    def cached(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in _TORCHLIB_REGISTRIES:
            _TORCHLIB_REGISTRIES[key] = original.__get__(None, cls)(*args, **kwargs)
        return _TORCHLIB_REGISTRIES[key]

    registry_cls.from_torchlib = classmethod(cached)
    try:
        yield
    finally:
        registry_cls.from_torchlib = original

