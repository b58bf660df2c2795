"""The block checksum kernel equals its torch reference bit for bit (int64 wraparound included)."""

import pytest
import torch

from kernels.block_checksum import block_checksum, block_checksum_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("W, tile", [(64, 16), (1000, 256), (4096, 4096)])
def test_kernel_equals_reference(W, tile):
    gen = torch.Generator().manual_seed(W)
    words = torch.randint(-(2**31), 2**31 - 1, (9, W), generator=gen, dtype=torch.int32).to(DEVICE)
    ids = torch.tensor([8, 0, 3, 3], device=DEVICE)
    assert torch.equal(block_checksum(words, ids, tile=tile), block_checksum_ref(words, ids))


def test_one_changed_word_changes_only_its_block():
    words = torch.zeros(3, 256, dtype=torch.int32, device=DEVICE)
    ids = torch.arange(3, device=DEVICE)
    before = block_checksum(words, ids, tile=64)
    words[1, 200] = 7
    after = block_checksum(words, ids, tile=64)
    assert (before != after).tolist() == [False, True, False]


def test_rejects_bad_views():
    with pytest.raises(ValueError, match="words"):
        block_checksum(torch.zeros(2, 4, dtype=torch.float32), torch.tensor([0]))
    with pytest.raises(ValueError, match="block_ids"):
        block_checksum(torch.zeros(2, 4, dtype=torch.int32), torch.tensor([[0]]))
