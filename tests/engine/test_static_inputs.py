"""Steps of a captured shape are staged straight into the graphs' static inputs (one copy per dtype, no
second copy on the device). The layout is exercised on the CPU by giving the runner StaticInputs of its
own: the eager forward then reads the static views, and outputs must not change, under async scheduling,
padded verify steps and placeholders filled from the step in flight."""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.cuda_graphs import InputLayout, StaticInputs

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(4, 300, (k,), generator=gen).tolist() for k in (3, 17, 40, 9)] + [[5, 6, 7] * 6]


def _tokens(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


def _staged(llm: LLM, sizes: dict[int, list[int]]) -> list[tuple[int, int, int]]:
    """Gives the runner static inputs with these captured sizes; -> (batch, tokens a sequence, padded
    batch) of every step staged in them."""
    engine = llm.engine
    max_blocks = -(-engine.max_model_len // engine.config.cache.block_size)
    runner = engine.runner
    runner.static_inputs = StaticInputs(sizes, max_blocks, torch.device("cpu"))
    seen = []
    prepare = runner.prepare

    def spy(sched):
        inputs = prepare(sched)
        if inputs.graph_batch:
            assert inputs.input_ids.data_ptr() == runner.static_inputs.input_ids.data_ptr()
            seen.append((inputs.attn.num_seqs, inputs.attn.uniform_query_len, inputs.graph_batch))
        return inputs

    runner.prepare = spy
    return seen


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_decode_steps_staged_in_static_inputs_keep_outputs(llama, async_scheduling):
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=12, n=2, logprobs=2)
    want = LLM(llama, num_blocks=96, async_scheduling=async_scheduling).generate(
        _prompts(), [GREEDY, params, GREEDY, params, GREEDY]
    )
    llm = LLM(llama, num_blocks=96, async_scheduling=async_scheduling)
    seen = _staged(llm, {1: [1, 2, 4, 8]})
    got = llm.generate(_prompts(), [GREEDY, params, GREEDY, params, GREEDY])
    assert _tokens(got) == _tokens(want)
    assert [c.logprobs for o in got for c in o.outputs] == [c.logprobs for o in want for c in o.outputs]
    assert any(b < bs for b, _, bs in seen)  # some batches padded up to a captured size
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_padded_verify_steps_staged_in_static_inputs_keep_outputs(llama):
    want = _tokens(LLM(llama, num_blocks=128).generate(_prompts(), GREEDY))
    llm = LLM(llama, num_blocks=128, speculative_method="ngram", num_speculative_tokens=3)
    llm.engine.runner.pad_verify_steps = True
    seen = _staged(llm, {1: [1, 2, 4, 8], 2: [1, 2, 4], 3: [1, 2, 4], 4: [1, 2, 4]})
    assert _tokens(llm.generate(_prompts(), GREEDY)) == want
    assert any(q > 1 for _, q, _ in seen)  # verify steps went through the static layout


def test_layouts():
    packed = InputLayout.packed(num_tokens=5, num_seqs=2, width=3)
    assert (packed.positions, packed.slots, packed.extras, packed.seq_lens, packed.tables) == (
        5,
        10,
        15,
        3,
        5,
    )
    static = StaticInputs({1: [1, 2, 4], 3: [1, 2]}, max_blocks=7, device=torch.device("cpu"))
    assert (static.max_tokens, static.max_seqs) == (6, 4)  # 3 tokens x 2 sequences; 4 sequences
    assert static.batch_size_for(3, 1) == 4 and static.batch_size_for(2, 3) == 2
    assert static.batch_size_for(3, 3) == 0 and static.batch_size_for(1, 2) == 0  # not captured
    assert static.block_tables.shape == (4, 7) and static.slot_mapping.eq(-1).all()
