"""``--expert-memory`` on generate and eval: the same output as without it, the cache's summary, one-line errors."""

from __future__ import annotations

import pytest

from moekit.cli import main
from tests.analysis.helpers import save_tiny_checkpoint


def test_generate_with_expert_memory_prints_the_same_text_and_the_cache_summary(tmp_path, capsys):
    save_tiny_checkpoint(tmp_path / "run")
    argv = ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "ab", "--temperature", "0"]
    argv += ["--max-new-tokens", "20"]
    assert main(argv) == 0
    resident = capsys.readouterr()
    assert main([*argv, "--expert-memory", "64KiB"]) == 0
    offloaded = capsys.readouterr()
    assert offloaded.out == resident.out
    assert "expert cache: hit rate" in offloaded.err and "per token" in offloaded.err
    assert "expert cache" not in resident.err


def test_eval_with_expert_memory_gives_the_same_loss(tmp_path, capsys):
    save_tiny_checkpoint(tmp_path / "run")
    data = tmp_path / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    argv = ["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(data), "--block-size", "16"]
    assert main(argv) == 0
    resident = capsys.readouterr().out.splitlines()
    assert main([*argv, "--expert-memory", "1MiB"]) == 0
    offloaded = capsys.readouterr().out.splitlines()
    assert offloaded[0] == resident[0] and offloaded[1].startswith("expert cache: hit rate")


@pytest.mark.parametrize(("size", "message"), [("lots", "is not a size"), ("1", "at least")])
def test_bad_expert_memory_is_a_one_line_error(tmp_path, capsys, size, message):
    save_tiny_checkpoint(tmp_path / "run")
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--expert-memory", size]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moekit generate: error:") and message in err


def test_generate_on_a_per_expert_hf_folder_with_expert_memory(tmp_path, capsys):
    hf_models = pytest.importorskip("tests.interop.hf_models")
    folder = hf_models.save_hf_model("qwen3_moe", tmp_path / "hf")  # save_pretrained: one tensor per expert
    hf_models.write_tokenizer(folder)
    argv = ["generate", "--model", str(folder), "--prompt", "the cat sat", "--temperature", "0"]
    argv += ["--max-new-tokens", "12"]
    assert main(argv) == 0
    resident = capsys.readouterr()
    assert main([*argv, "--expert-memory", "64KiB"]) == 0
    offloaded = capsys.readouterr()
    assert offloaded.out == resident.out
    assert "expert cache: hit rate" in offloaded.err and "expert cache" not in resident.err


def test_eval_on_a_per_expert_hf_folder_gives_the_same_loss(tmp_path, capsys):
    hf_models = pytest.importorskip("tests.interop.hf_models")
    folder = hf_models.save_hf_model("qwen3_moe", tmp_path / "hf")
    hf_models.write_tokenizer(folder)
    data = tmp_path / "text.txt"
    data.write_text(hf_models.corpus(2000))
    argv = ["eval", "--model", str(folder), "--data", str(data), "--block-size", "32"]
    assert main(argv) == 0
    resident = capsys.readouterr().out.splitlines()
    assert main([*argv, "--expert-memory", "16KiB"]) == 0  # 2 of the 6 experts: batched calls through the cache
    offloaded = capsys.readouterr().out.splitlines()
    assert offloaded[0] == resident[0] and offloaded[1].startswith("expert cache: hit rate")
