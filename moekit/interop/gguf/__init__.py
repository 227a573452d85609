"""GGUF import: llama.cpp's model files (MoE families moekit knows) as moekit models, checkpoints and tokenizers.

:func:`from_gguf` / :func:`load_gguf` read a ``.gguf`` file with the ``gguf`` package; ``moekit convert
--from-gguf FILE.gguf --out DIR`` writes a moekit checkpoint (``--bits 8|4``: its experts in moekit's int8/int4,
quantised one expert at a time as they are read), and ``--model FILE.gguf`` loads one wherever an HF folder is
accepted. See :mod:`.arch` (architectures and tensor names), :mod:`.reader` (tensor types) and
:mod:`.vocab` (tokenizers).
"""

from moekit.interop.gguf.api import convert_from_gguf, from_gguf, load_gguf
from moekit.interop.gguf.reader import GGUFFile, is_gguf_file

__all__ = ["GGUFFile", "convert_from_gguf", "from_gguf", "is_gguf_file", "load_gguf"]
