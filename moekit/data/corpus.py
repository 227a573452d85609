"""The built-in corpus: tiny-shakespeare, shipped xz-compressed inside the package (no network, no /work/shared).

See ``moekit/data/builtin/README.md`` for its source and licence (public domain text).
"""

from __future__ import annotations

import functools
import hashlib
import lzma
from importlib import resources

from moekit.errors import DataError

__all__ = ["BUILTIN_CORPORA", "builtin_corpus"]

# name -> (resource file in moekit/data/builtin, sha256 of the uncompressed text)
BUILTIN_CORPORA = {
    "tinyshakespeare": (
        "tinyshakespeare.txt.xz",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
}


@functools.lru_cache(maxsize=2)
def builtin_corpus(name: str = "tinyshakespeare") -> str:
    """The text of a corpus shipped with moekit.

    Args:
        name: ``"tinyshakespeare"`` (1,115,394 characters, 65 distinct; Karpathy's char-rnn file).

    Returns:
        The text, verified against its recorded sha256.

    Raises:
        DataError: unknown name, or the packaged file is missing or damaged.
    """
    if name not in BUILTIN_CORPORA:
        raise DataError(f"unknown built-in corpus {name!r}; available: {', '.join(BUILTIN_CORPORA)}")
    filename, sha256 = BUILTIN_CORPORA[name]
    resource = resources.files("moekit.data").joinpath("builtin", filename)
    try:
        data = lzma.decompress(resource.read_bytes())
    except (OSError, lzma.LZMAError) as e:
        raise DataError(f"built-in corpus {name!r} ({filename}) is missing or damaged: {e}; reinstall moekit") from e
    # Cheap (a few ms) and catches a corrupted install before it silently trains on garbage.
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"built-in corpus {name!r} ({filename}) fails its sha256 check; reinstall moekit")
    return data.decode("utf-8")
