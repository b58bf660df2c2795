"""The KV age policy: which bits each block of a sequence is held at, validated, and the capacity it buys."""

import re

import pytest
import torch

from engine.kv.age_policy import BASE, KVAgePolicy


def test_blocks_age_from_base_to_bits_to_low_bits():
    policy = KVAgePolicy(bits=4, sinks=16, window=32, horizon=64, low_bits=2)
    # 8 blocks of 16 (128 tokens): the sink block, then ages 96, 80, 64 (low bits), 48, 32 (bits), 16, 0
    assert policy.block_bits(128, 16) == [BASE, 2, 2, 2, 4, 4, BASE, BASE]
    # a partial last block is never coded; with fewer tokens, everything is still recent
    assert policy.block_bits(40, 16) == [BASE, BASE, BASE]
    assert KVAgePolicy(bits=3, sinks=0, window=16).block_bits(48, 16) == [3, 3, BASE]


def test_bits_seen_by_each_query_position():
    policy = KVAgePolicy(bits=2, sinks=0, window=4)
    seen = policy.bits_seen(12, 4)
    assert seen.shape == (12, 12) and (seen.triu(1) == 0).all()  # nothing in a query's future
    # block 0 (positions 0-3) is 4 tokens old, so coded, from query position 7 on; block 1 from 11 on
    assert seen[6, :4].tolist() == [0] * 4
    assert seen[7, :8].tolist() == [2] * 4 + [0] * 4
    assert seen[10, :8].tolist() == [2] * 4 + [0] * 4 and seen[11, :8].tolist() == [2] * 8
    assert torch.equal(seen[-1], torch.tensor(policy.block_bits(12, 4)).repeat_interleave(4))


def test_mean_bits_counts_the_norms():
    policy = KVAgePolicy(bits=4, sinks=16, window=64)
    # 1024 tokens at head_dim 128: 80 tokens in 16 bits, 944 at 4 + 32/128 bits
    assert policy.mean_bits(1024, 16, 128) == pytest.approx((80 * 16 + 944 * 4.25) / 1024)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 5}, "kv_age_policy.bits: got 5"),
        ({"sinks": -1}, "kv_age_policy.sinks: got -1"),
        ({"window": 0}, "kv_age_policy.window: got 0"),
        ({"horizon": 1024}, "give both or neither"),
        ({"horizon": 256, "low_bits": 2}, "kv_age_policy.horizon: got 256, allowed > window (512)"),
        ({"horizon": 1024, "low_bits": 4}, "kv_age_policy.low_bits: got 4"),
    ],
)
def test_bad_policies_are_named(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        KVAgePolicy(**kwargs)


def test_sinks_and_window_are_whole_blocks():
    with pytest.raises(
        ValueError, match=re.escape("window: got 40, allowed a multiple of the block size (16)")
    ):
        KVAgePolicy(window=40).check_block_size(16)
    KVAgePolicy(sinks=32, window=64).check_block_size(16)
