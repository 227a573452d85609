"""Weights moved onto huge pages keep their values, layouts and ties, and read mapped files without touching
the map."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moekit.io import huge_pages
from moekit.io.huge_pages import HUGE_PAGE, is_huge, move_to_huge_pages
from moekit.io.mapped import map_tensors, mapped_source
from moekit.io.safe_io import save_tensors


@pytest.fixture(autouse=True)
def switched_on(monkeypatch):
    monkeypatch.setenv("MOEKIT_HUGE_PAGES", "1")  # off by default


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(300, 128)
        self.head = nn.Linear(128, 300, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.experts = nn.Parameter(torch.randn(4, 256, 64).transpose(1, 2))  # a transposed layout
        self.register_buffer("table", torch.randn(200, 100))
        self.norm = nn.Parameter(torch.ones(128))  # small: stays


def test_moving_keeps_values_layouts_and_ties():
    torch.manual_seed(0)
    m = Tied()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    strides = {k: v.stride() for k, v in m.state_dict().items()}
    moved = move_to_huge_pages(m, skip=lambda name: name == "table")
    assert moved >= (300 * 128 + 4 * 256 * 64) * 4
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]) and v.stride() == strides[k]
    assert m.head.weight is m.embed.weight and is_huge(m.embed.weight) and is_huge(m.experts)
    assert min(t.data_ptr() for t in (m.embed.weight, m.experts)) % HUGE_PAGE == 0  # the arena's first byte
    assert not is_huge(m.table) and not is_huge(m.norm)
    assert move_to_huge_pages(m, skip=lambda name: name == "table") == 0  # already there


def test_mapped_tensors_are_read_from_their_file(tmp_path):
    save_tensors({"w": torch.randn(512, 256), "v": torch.randn(256, 512)}, tmp_path / "w.safetensors")
    mapped = map_tensors(tmp_path / "w.safetensors")
    m = nn.Module()
    m.w = nn.Parameter(mapped["w"], requires_grad=False)
    m.register_buffer("v", mapped["v"].t())  # transposed view of a mapped tensor
    assert mapped_source(m.w) is not None
    move_to_huge_pages(m)
    assert mapped_source(m.w) is None and is_huge(m.w) and is_huge(m.v)
    assert torch.equal(m.w, mapped["w"]) and torch.equal(m.v, mapped["v"].t())


def test_off_by_default_the_weights_stay_in_place(monkeypatch):
    monkeypatch.delenv("MOEKIT_HUGE_PAGES")
    m = Tied()
    assert huge_pages.move_to_huge_pages(m) == 0 and not is_huge(m.embed.weight)
