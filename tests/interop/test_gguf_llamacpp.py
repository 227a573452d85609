"""Oracle: llama.cpp itself. Not in the default run (marker ``llamacpp``); run with

    MOEKIT_LLAMA_PYTHON=/path/to/venv-with-llama-cpp-python/bin/python \\
    MOEKIT_LLAMA_CONVERTER=/path/to/llama.cpp/convert_hf_to_gguf.py \\
    pytest -m llamacpp tests/interop/test_gguf_llamacpp.py

A tiny random model saved by transformers (Qwen3-MoE, Mixtral, Qwen2-MoE, OLMoE) is converted with llama.cpp's own
``convert_hf_to_gguf.py`` (run by this interpreter: it needs torch, transformers and gguf), then llama.cpp
(``llama-cpp-python``, in the interpreter MOEKIT_LLAMA_PYTHON names, 2 threads) and moekit (``load_gguf``) read
the same file: same token ids for the same text, first-step logits close, and the same greedy continuation.

The converter recognises a BPE tokenizer by hashing its ids on a fixed text, which a toy tokenizer never
matches; ours uses Qwen2's pre-tokenizer, so the converter is run with that recognition pinned to ``qwen2``
(llama.cpp pins ``whitespace`` the same way), everything else unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit.interop.gguf import GGUFFile, load_gguf
from tests.interop.gguf_files import tiny_config, train_byte_level_bpe, transformers

pytestmark = pytest.mark.llamacpp

PROMPT = "The quick brown fox jumps over"
NEW_TOKENS = 12
# fp32 files (F32 KV cache in llama.cpp): the two differ only in summation order, ggml's kernels vs PyTorch's.
FP32_ATOL, FP32_RTOL = 1e-5, 1e-5  # measured: 1.2e-6 at most (logits up to ~3)
QUANT_ATOL = {"q8_0": 0.05, "bf16": 0.05, "q4_k_m": 0.5}

_CONVERT_DRIVER = """
import runpy, sys
sys.path.insert(0, sys.argv[1])
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sentencepiece = conversion.base.TextModel._set_vocab_sentencepiece
def no_sentencepiece_file(self, *args, **kwargs):  # what it does when the sentencepiece package is installed
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError("no tokenizer.model")
    return sentencepiece(self, *args, **kwargs)
conversion.base.TextModel._set_vocab_sentencepiece = no_sentencepiece_file
sys.argv = [sys.argv[2], *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

_LLAMA_RUN = """
import json, sys
import numpy as np
import llama_cpp.llama_cpp as C
from llama_cpp import Llama
defaults = C.llama_model_default_params
def no_repacking():  # this build's repacked int8 (AMX) path crashes on Q8_0: plain CPU buffers instead
    params = defaults()
    params.use_extra_bufts = False
    return params
C.llama_model_default_params = no_repacking
path, prompt, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
# F32 KV cache: its F16 default would round K and V (differences ~1e-3, not the weights' or ours).
llm = Llama(model_path=path, n_ctx=256, n_threads=2, n_batch=64, logits_all=True, verbose=False, type_k=0, type_v=0)
ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
llm.eval(ids)
greedy, steps = [], []
for _ in range(new):
    step = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    steps.append(step.tolist())
    greedy.append(int(np.argmax(step)))
    llm.eval([greedy[-1]])
print(json.dumps({"ids": ids, "steps": steps, "greedy": greedy}))
"""


def _required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"the llamacpp suite needs {name} (see this module's docstring)", pytrace=False)
    return value


def _save_hf(family: str, folder: Path, **overrides) -> Path:
    tok = train_byte_level_bpe(vocab_size=300)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).float().eval()
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _convert(folder: Path, outtype: str, out: Path) -> Path:
    script = Path(_required_env("MOEKIT_LLAMA_CONVERTER"))
    cmd = [sys.executable, "-c", _CONVERT_DRIVER, str(script.parent), str(script)]
    cmd += [str(folder), "--outtype", outtype, "--outfile", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _llama_cpp(path: Path) -> dict:
    python = _required_env("MOEKIT_LLAMA_PYTHON")
    cmd = [python, "-c", _LLAMA_RUN, str(path), PROMPT, str(NEW_TOKENS)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@torch.no_grad()
def _moekit(path: Path, ref: dict, dtype: str | None = None) -> dict:
    """moekit on the same file: its ids for PROMPT, its own greedy continuation, and its logits at every step of
    llama.cpp's greedy path (one forward over prompt + llama.cpp's tokens)."""
    model, tok = load_gguf(path, dtype=dtype)
    ids = tok.encode(PROMPT)
    seq = torch.tensor([ids])
    greedy = []
    for _ in range(NEW_TOKENS):
        greedy.append(int(model(seq).logits[0, -1].argmax()))
        seq = torch.cat([seq, torch.tensor([[greedy[-1]]])], dim=1)
    path_ids = torch.tensor([ref["ids"] + ref["greedy"][:-1]])
    steps = model(path_ids).logits[0, len(ref["ids"]) - 1 :].double()
    return {"ids": ids, "greedy": greedy, "steps": steps}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe", "olmoe"])
def test_fp32_gguf_logits_and_greedy_tokens_match_llama_cpp(family, tmp_path):
    gguf_path = _convert(_save_hf(family, tmp_path / "hf"), "f32", tmp_path / "model-f32.gguf")
    ref = _llama_cpp(gguf_path)
    ours = _moekit(gguf_path, ref)
    assert ours["ids"] == ref["ids"]
    steps = torch.tensor(ref["steps"], dtype=torch.float64)
    torch.testing.assert_close(ours["steps"][0], steps[0], atol=FP32_ATOL, rtol=FP32_RTOL)  # the first step
    torch.testing.assert_close(ours["steps"], steps, atol=FP32_ATOL, rtol=FP32_RTOL)  # and along the path
    assert ours["greedy"] == ref["greedy"]


@pytest.mark.parametrize("outtype", ["q8_0", "bf16"])
def test_quantised_gguf_logits_match_llama_cpp(outtype, tmp_path):
    gguf_path = _convert(_save_hf("qwen3_moe", tmp_path / "hf"), outtype, tmp_path / f"model-{outtype}.gguf")
    ref = _llama_cpp(gguf_path)
    ours = _moekit(gguf_path, ref, dtype="float32")
    assert ours["ids"] == ref["ids"]
    # moekit computes with the stored weights in fp32; llama.cpp rounds activations too (to int8 blocks for Q8_0,
    # to bf16 for BF16), so logits agree to ~1e-2 (measured: 2.6e-2 for Q8_0, 1.1e-2 for BF16), and a greedy
    # choice may flip where llama.cpp's top two are that close; so: logits along llama.cpp's greedy path (teacher
    # forcing, so one near-tie does not derail the rest), which makes the greedy tokens equal wherever llama.cpp's
    # top-2 margin exceeds twice the tolerance (asserted too).
    _assert_close_along_path(ours, ref, QUANT_ATOL[outtype])


def _assert_close_along_path(ours: dict, ref: dict, atol: float) -> None:
    steps = torch.tensor(ref["steps"], dtype=torch.float64)
    torch.testing.assert_close(ours["steps"], steps, atol=atol, rtol=0)
    top2 = steps.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * atol
    assert torch.equal(ours["steps"].argmax(-1)[clear], steps.argmax(-1)[clear])


_QUANTIZE = """
import sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
params.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


def test_q4_k_m_quantised_by_llama_cpp_matches_llama_cpp(tmp_path):
    # K-quants work on rows of 256 values: a model that wide, so that llama.cpp's quantiser really writes Q4_K.
    wide = dict(hidden_size=256, head_dim=64, moe_intermediate_size=256, intermediate_size=256)
    f32 = _convert(_save_hf("qwen3_moe", tmp_path / "hf", **wide), "f32", tmp_path / "model-f32.gguf")
    q4 = tmp_path / "model-q4_k_m.gguf"
    cmd = [_required_env("MOEKIT_LLAMA_PYTHON"), "-c", _QUANTIZE, str(f32), str(q4)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    gg = GGUFFile(q4)
    types = {gg.type_name(n) for n in gg.tensor_names()}
    assert "Q4_K" in types and gg.type_name("blk.0.ffn_gate_exps.weight") == "Q4_K", types
    ref = _llama_cpp(q4)
    ours = _moekit(q4, ref, dtype="float32")
    assert ours["ids"] == ref["ids"]
    # Q4_K moves this model's logits (scale ~7) by up to ~4 from the fp32 ones; llama.cpp also rounds activations
    # to 8-bit blocks (Q8_K), which moves them by ~0.1-0.4 (measured 0.36 at most). So: close at 0.5, and at least
    # 5x closer to llama.cpp's Q4_K_M than the unquantised model is (the quantised weights are what was read).
    _assert_close_along_path(ours, ref, QUANT_ATOL["q4_k_m"])
    unquantised = _moekit(f32, ref)["steps"]
    steps = torch.tensor(ref["steps"], dtype=torch.float64)
    assert (ours["steps"] - steps).abs().max() * 5 < (unquantised - steps).abs().max()


def test_tokenizer_ids_match_llama_cpp_on_harder_text(tmp_path):
    gguf_path = _convert(_save_hf("qwen3_moe", tmp_path / "hf"), "f32", tmp_path / "tok.gguf")
    texts = ["  two  spaces\nand lines\n\n", "émigré café 東京 12345 3.14", "don't we'll THE Fox!! ...", "a\tb  \n c"]
    script = (
        "import json, sys\nfrom llama_cpp import Llama\n"
        "llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)\n"
        "print(json.dumps([llm.tokenize(t.encode(), add_bos=False, special=False) for t in json.loads(sys.argv[2])]))"
    )
    cmd = [_required_env("MOEKIT_LLAMA_PYTHON"), "-c", script, str(gguf_path), json.dumps(texts)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _, tok = load_gguf(gguf_path)
    assert [tok.encode(t) for t in texts] == json.loads(done.stdout.strip().splitlines()[-1])
