"""Translation end to end: training learns, checkpoints round-trip, the CLI trains and translates, bad files
stop with the file and line, and the offline demo runs."""

import io
import json

import pytest
import torch

from moekit.cli import main
from moekit.data.bpe import SubwordTokenizer
from moekit.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from moekit.tasks.decoding import corpus_bleu, translate
from moekit.tasks.translate import load_translator, save_translator, train_translator

PAIRS = [
    ("A dog runs.", "Ein Hund läuft."),
    ("Two cats sleep in the snow.", "Zwei Katzen schlafen im Schnee."),
    ("The old man reads a book.", "Der alte Mann liest ein Buch."),
    ("A girl in a red dress is jumping.", "Ein Mädchen in einem roten Kleid springt."),
    ("Three children play on the beach.", "Drei Kinder spielen am Strand."),
    ("A woman holds a flower.", "Eine Frau hält eine Blume."),
]
TINY = {
    "model.hidden_size": 32,
    "model.encoder_layers": 1,
    "model.decoder_layers": 1,
    "model.num_attention_heads": 2,
    "model.intermediate_size": 64,
    "model.moe.num_experts": 4,
    "model.dropout": 0.0,
    "threads": 1,
    "progress": False,
}


def _write(tmp_path, pairs, name="train"):
    (tmp_path / f"{name}.en").write_text("".join(en + "\n" for en, _ in pairs), encoding="utf-8")
    (tmp_path / f"{name}.de").write_text("".join(de + "\n" for _, de in pairs), encoding="utf-8")
    return tmp_path / f"{name}.en", tmp_path / f"{name}.de"


def test_a_tiny_model_learns_a_handful_of_pairs_by_heart(tmp_path):
    src, tgt = _write(tmp_path, PAIRS)
    result = train_translator(
        source=str(src),
        target=str(tgt),
        valid_source=str(src),
        valid_target=str(tgt),
        out_dir=str(tmp_path / "run"),
        max_steps=200,
        lr=1e-2,
        warmup_steps=10,
        label_smoothing=0.0,
        eval_interval=50,
        **TINY,
    )
    assert result.step == 200 and [r["step"] for r in result.history] == [50, 100, 150, 200]
    assert result.history[-1]["valid_loss"] < 0.05 < result.history[0]["valid_loss"]
    assert result.bleu > 99  # greedy, on the training pairs themselves
    model, tokenizer = load_translator(tmp_path / "run")
    sources = [en for en, _ in PAIRS]
    assert translate(model, tokenizer, sources, beam=3) == [de for _, de in PAIRS]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "valid_loss" in r] == [50, 100, 150, 200]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["valid_bleu_greedy"] == result.bleu


def test_save_and_load_give_identical_translations(tmp_path):
    tokenizer = SubwordTokenizer.train([s for pair in PAIRS for s in pair], vocab_size=300)
    torch.manual_seed(0)
    config = Seq2SeqConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
        intermediate_size=64, moe={"num_experts": 4}, initializer_range=0.3,
    )  # fmt: skip
    model = Seq2SeqTransformer(config).eval()
    save_translator(tmp_path, model, tokenizer)
    loaded, loaded_tokenizer = load_translator(tmp_path)
    sources = [en for en, _ in PAIRS]
    expected = translate(model, tokenizer, sources, beam=2, max_new_tokens=8)
    assert translate(loaded, loaded_tokenizer, sources, beam=2, max_new_tokens=8) == expected
    assert any(expected)  # a random model still says something
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_cli_trains_and_translates_a_file_with_bleu(tmp_path, capsys):
    src, tgt = _write(tmp_path, PAIRS * 3)
    run = tmp_path / "run"
    argv = ["train", "--task", "translate", "--source", str(src), "--target", str(tgt), "--out", str(run)]
    argv += ["--max-steps", "40", "--lr", "1e-2", "--warmup-steps", "5", "--eval-interval", "20"]
    for key, value in TINY.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    assert main(argv) == 0
    assert "valid BLEU" in capsys.readouterr().out
    assert {"model.safetensors", "model.json", "tokenizer.json", "run.json"} <= {p.name for p in run.iterdir()}
    (tmp_path / "in.en").write_text("A dog runs.\n\nA woman holds a flower.\n")
    out = tmp_path / "out.de"
    code = main(["translate", "--checkpoint", str(run), "--input", str(tmp_path / "in.en"), "--output", str(out)])
    assert code == 0
    lines = out.read_text().split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == "" and lines[0]  # blank line kept, in order
    (tmp_path / "ref.de").write_text("Ein Hund läuft.\n\nEine Frau hält eine Blume.\n")
    argv = ["translate", "--checkpoint", str(run), "--input", str(tmp_path / "in.en")]
    assert main([*argv, "--reference", str(tmp_path / "ref.de"), "--beam", "2"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 3 and "BLEU" in captured.err
    assert main(["translate", "--checkpoint", str(run), "--text", "A dog runs.", "--beam", "3"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["predict", "--checkpoint", str(run), "--data", str(tmp_path / "in.en")]) != 0
    assert "holds a translation model: use `moekit translate" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("source", "target", "message"),
    [
        ("train.en", "short.de", r"train\.en has 6 lines but .*short\.de has 5; parallel files must be line-aligned"),
        ("train.en", "blank.de", r"blank\.de:3: empty line"),
        ("train.en", "empty.de", r"empty\.de: the file is empty"),
        ("missing.en", "train.de", r"missing\.en: no such file"),
    ],
)
def test_bad_parallel_files_stop_with_file_and_line(tmp_path, capsys, source, target, message):
    _write(tmp_path, PAIRS)
    (tmp_path / "short.de").write_text("".join(de + "\n" for _, de in PAIRS[:5]))
    (tmp_path / "blank.de").write_text("".join(("" if i == 2 else de) + "\n" for i, (_, de) in enumerate(PAIRS)))
    (tmp_path / "empty.de").write_text("")
    argv = ["train", "--task", "translate", "--source", str(tmp_path / source), "--target", str(tmp_path / target)]
    assert main([*argv, "--out", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit train: error: ")
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_options_are_checked_before_any_work(tmp_path, capsys):
    assert main(["train", "--task", "translate", "--model.moe.num_expert", "4", "--out", str(tmp_path / "r")]) == 2
    assert "did you mean 'num_experts'" in capsys.readouterr().err
    assert main(["train", "--task", "translate", "--source", "a.en", "--out", str(tmp_path / "r")]) == 2
    assert "give both source and target" in capsys.readouterr().err
    assert main(["translate", "--checkpoint", str(tmp_path), "--text", "hello"]) == 2
    assert "holds no translation model" in capsys.readouterr().err


def test_bleu_is_sacrebleus_corpus_score():
    refs = ["Ein Hund läuft im Park.", "Zwei Katzen schlafen."]
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)
    assert corpus_bleu(["Ein Hund läuft.", "Katzen."], refs) < 60


def test_demo_translate_runs_offline_on_builtin_pairs(tmp_path):
    from rich.console import Console

    from moekit.commands.demo import translate_demo

    console = Console(file=io.StringIO(), width=200)
    result = translate_demo(time_budget="3s", out=str(tmp_path / "demo"), console=console)
    text = console.file.getvalue()
    assert "validation BLEU" in text and "encoder.1" in text and "decoder.1" in text  # expert load rows
    assert 0.0 <= result["bleu"]["greedy"] <= 100.0 and len(result["translations"]) == len(result["valid"])
    assert (tmp_path / "demo" / "model.safetensors").is_file()


def test_resume_from_the_cli_continues_a_killed_run(tmp_path, capsys):
    """A run killed after its step-8 checkpoint, resumed with ``--resume``, ends where the uninterrupted one does."""
    import shutil

    src, tgt = _write(tmp_path, PAIRS)
    options = ["--source", str(src), "--target", str(tgt), "--max-steps", "12", "--checkpoint-interval", "4"]
    options += ["--bleu-sentences", "0"] + [f"--{k}={str(v).lower()}" for k, v in TINY.items()]
    assert main(["train", "--task", "translate", "--out", str(tmp_path / "full"), *options]) == 0
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "full", killed)
    shutil.rmtree(killed / "checkpoints" / "step-000012")
    capsys.readouterr()
    assert main(["train", "--task", "translate", "--out", str(killed), "--resume", *options]) == 0
    assert "step 12:" in capsys.readouterr().out
    full, _ = load_translator(tmp_path / "full")
    again, _ = load_translator(killed)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), again.state_dict().values()))
    assert main(["train", "--task", "translate", "--out", str(killed), "--resume", *options, "--lr", "0.1"]) == 2
    assert "--resume: lr=0.1 differs" in capsys.readouterr().err
