"""Handles and their tags: a row-wise copy of a placeholder names its store and rows."""

import pytest
import torch
from kvpass.runtime import REGISTRY, KVStore
from kvpass.runtime.registry import read_tags


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_copied_rows_name_their_store_and_rows(dtype):
    store = KVStore(2, 8, batch=5, dtype=dtype)
    h = REGISTRY.new_handle(store)
    assert torch.isnan(h).all()  # still NaN everywhere: a read that bypasses kvpass sees no number
    placeholder = h.expand(5, 2, 40, 8)
    rows = torch.tensor([4, 4, 0, 2, 1])
    copied = placeholder.index_select(0, rows)
    found, got = REGISTRY.by_tags(copied)
    assert found is store and torch.equal(got, rows)
    assert read_tags(placeholder.float() if dtype != torch.float32 else placeholder.half()) is None  # payloads cut
    assert read_tags(torch.full((5, 2, 3, 8), float("nan"), dtype=dtype)) is None  # a plain NaN is no tag
    mixed = torch.cat([copied[:2], REGISTRY.new_handle(KVStore(2, 8, batch=3, dtype=dtype)).expand(3, 2, 40, 8)])
    assert read_tags(mixed) is None  # rows of two stores


def test_handles_too_small_for_a_tag_are_not_tagged():
    store = KVStore(1, 8, batch=1)  # 8 elements per row < 16 nibbles
    h = REGISTRY.new_handle(store)
    assert torch.isnan(h).all() and REGISTRY.by_tags(h.expand(1, 1, 4, 8).clone()) is None
