"""``moekit convert --from-hf DIR --out DIR`` / ``--to-hf CKPT --out DIR`` / ``--from-gguf FILE.gguf --out DIR``:
Hugging Face <-> moekit, and llama.cpp GGUF -> moekit.

--from-hf writes a moekit checkpoint folder (config.json + model.safetensors + the tokenizer files) that
``moekit generate/eval --checkpoint``, ``moekit train --init-from`` and ``moekit.load`` read; the weights
keep their dtype. --to-hf writes a folder ``transformers.AutoModelForCausalLM.from_pretrained`` loads,
in the checkpoint's dtype unless --dtype says otherwise, sharded past --max-shard-size, with the tokenizer
(moekit's byte/char tokenizers become a ``tokenizer.json`` that ``AutoTokenizer`` loads with the same ids).
--from-gguf reads a llama.cpp file (qwen3moe, qwen2moe, olmoe, llama/Mixtral; F32/F16/BF16 kept, quantised types
such as Q8_0/Q4_0/Q4_K dequantised into --dtype, float32 by default) and its tokenizer; with --bits 8|4
[--group-size G] its experts become moekit's int8/int4 as they are read, one expert at a time (as
``moekit quantize`` would make them from the float import, without the float experts ever in memory).
"""

from __future__ import annotations

import argparse
import re

from moekit.errors import ConfigError
from moekit.io.folders import check_output_folder


def add_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "convert",
        help="convert Hugging Face <-> moekit checkpoints, GGUF -> moekit",
        description=__doc__,
        allow_abbrev=False,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="Hugging Face model folder to import")
    source.add_argument("--to-hf", metavar="CKPT", help="moekit checkpoint or run folder to export")
    source.add_argument("--from-gguf", metavar="FILE", help="llama.cpp GGUF file to import")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="write into --out even if it is not empty")
    p.add_argument(
        "--dtype", default=None, help="--to-hf, --from-gguf: float32 | bfloat16 | float16 (default: the file's)"
    )
    p.add_argument("--bits", type=int, choices=[4, 8], help="--from-gguf: quantise the experts to int8 / int4")
    p.add_argument("--group-size", type=int, default=None, help="--from-gguf --bits 4: int4 group (32, 64, 128)")
    p.add_argument("--family", default=None, help="--to-hf: HF model_type (default: the imported one, or inferred)")
    p.add_argument("--max-shard-size", default="5GB", help="--to-hf: shard above this size (e.g. 500MB, 5GB)")
    p.set_defaults(func=run)


def parse_size(text: str) -> int:
    """Bytes from ``"5GB"``, ``"500MB"``, ``"100KB"`` or a plain number (powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]?i?B?)\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ConfigError(f"--max-shard-size={text!r} is not a size like 500MB or 5GB")
    unit = match.group(2).upper().rstrip("B").rstrip("I")
    return int(float(match.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[unit])


def convert(
    from_hf=None,
    to_hf=None,
    out=None,
    dtype=None,
    family=None,
    max_shard_size="5GB",
    from_gguf=None,
    bits=None,
    group_size=None,
):
    """Run one conversion; returns the output folder. ``bits``/``group_size`` (``from_gguf`` only): quantise the
    experts while reading (see :func:`moekit.interop.gguf.convert_from_gguf`)."""
    from moekit.interop.hf import convert_from_hf, convert_to_hf

    if sum(x is not None for x in (from_hf, to_hf, from_gguf)) != 1:
        raise ConfigError(
            "give exactly one of from_hf= (an HF folder), to_hf= (a moekit checkpoint) or from_gguf= (a GGUF file)"
        )
    if from_gguf is None and (bits is not None or group_size is not None):
        raise ConfigError("--bits and --group-size apply to --from-gguf (for other models: moekit quantize)")
    if bits is None and group_size is not None:
        raise ConfigError("--group-size needs --bits 4")
    if from_gguf is not None:
        from moekit.interop.gguf import convert_from_gguf

        if family:
            raise ConfigError("--family applies to --to-hf")
        return convert_from_gguf(from_gguf, out, dtype=dtype, bits=bits, group_size=group_size or 32)
    if from_hf is not None:
        if dtype or family:
            raise ConfigError("--dtype and --family apply to --to-hf; --from-hf keeps the checkpoint's dtype")
        return convert_from_hf(from_hf, out)
    size = parse_size(max_shard_size)
    return convert_to_hf(to_hf, out, dtype=dtype, family=family, max_shard_bytes=size, family_flag="--family")


def run(args: argparse.Namespace) -> int:
    check_output_folder(args.out, args.overwrite)
    path = convert(
        args.from_hf,
        args.to_hf,
        args.out,
        args.dtype,
        args.family,
        args.max_shard_size,
        args.from_gguf,
        args.bits,
        args.group_size,
    )
    kind = "Hugging Face model" if args.to_hf else "moekit checkpoint"
    quantised = f" (experts in int{args.bits})" if args.bits else ""
    print(f"wrote {kind} to {path}{quantised}")
    return 0
