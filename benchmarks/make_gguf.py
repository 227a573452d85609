"""Convert an HF checkpoint to GGUF with llama.cpp's own converter, then quantise with llama.cpp.

The converter (``convert_hf_to_gguf.py``, in llama.cpp's source, e.g. the llama-cpp-python sdist's
``vendor/llama.cpp``) recognises a tokenizer by hashing how it splits a test string; a benchmark checkpoint's
small BPE (``make_big_checkpoint.py``) has no entry, so this runs the converter with that one lookup
answering "qwen2" (a GPT-2-style byte-level BPE, what the checkpoint's tokenizer is). Speed does not depend
on it. Q4_K_M needs llama.cpp's quantiser: ``llama_cpp.llama_model_quantize`` in ``--llama-python``.

Usage:
    python benchmarks/make_gguf.py --model /tmp/q3-1.7b --converter .../convert_hf_to_gguf.py \
        --llama-python /path/to/venv/bin/python --types bf16,q8_0,q4_k_m
"""

from __future__ import annotations

import argparse
import os
import runpy
import subprocess
import sys
from pathlib import Path

QUANTIZE = r"""
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
params.nthread = 2
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(rc)
"""


def convert(converter: str, model: str, outtype: str, outfile: str) -> None:
    """Run the converter in this process with the tokenizer lookup patched (see module docstring)."""
    sys.path.insert(0, str(Path(converter).parent))
    sys.path.insert(0, str(Path(converter).parent / "gguf-py"))
    from conversion import base

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
    sys.argv = [converter, model, "--outtype", outtype, "--outfile", outfile]
    runpy.run_path(converter, run_name="__main__")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--converter", default=os.environ.get("MOEKIT_LLAMA_CONVERTER"))
    ap.add_argument("--llama-python", default=os.environ.get("MOEKIT_LLAMA_PYTHON"))
    ap.add_argument("--types", default="bf16,q8_0,q4_k_m")
    ap.add_argument("--out-dir", default=None, help="default: beside the model folder")
    ap.add_argument("--one", nargs=2, metavar=("OUTTYPE", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        convert(args.converter, args.model, *args.one)
        return 0
    out_dir = Path(args.out_dir or Path(args.model).parent)
    name = Path(args.model).name
    for kind in args.types.split(","):
        out = out_dir / f"{name}-{kind}.gguf"
        if kind == "q4_k_m":
            src = out_dir / f"{name}-bf16.gguf"
            subprocess.run([args.llama_python, "-c", QUANTIZE, str(src), str(out)], check=True)
        else:
            cmd = [sys.executable, __file__, "--model", args.model, "--converter", args.converter]
            subprocess.run([*cmd, "--one", kind, str(out)], check=True)
        print(f"{out}: {out.stat().st_size / 1e9:.2f} GB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
