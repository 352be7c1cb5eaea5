import math

import pytest
import torch

from engine.sampling import SamplingParams, TalkerLogitsProcessor, apply_repetition_penalty, draw_rows, warp


@pytest.mark.parametrize("bad", [dict(temperature=math.nan), dict(top_p=math.inf), dict(repetition_penalty=-math.inf),
                                 dict(temperature=0.0), dict(top_k=-1), dict(top_k=2**31), dict(top_p=0.0)])
def test_validate_refuses_values_that_would_poison_the_logits(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad).validate()


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores():
    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, [[0, 1, 1], [], [2]], [2.0, 2.0, 1.0])
    assert out.tolist() == [[1.0, -4.0, 1.0], [2.0, -2.0, 1.0], [2.0, -2.0, 1.0]]
    assert logits[0, 0] == 2.0  # the input is left alone


def test_warp_keeps_top_k_ties_and_top_p_mass():
    logits = torch.tensor([3.0, 2.0, 2.0, 1.0, 0.0])
    kept = torch.isfinite(warp(logits, 1.0, 2, 1.0))
    assert kept.tolist() == [True, True, True, False, False]  # the tie with the 2nd is kept, as HF does
    kept = torch.isfinite(warp(logits, 1.0, 0, 0.5))
    assert kept.tolist() == [True, False, False, False, False]


def test_talker_processor_forbids_eos_early_and_control_ids_always():
    proc = TalkerLogitsProcessor(vocab_size=1088, eos_id=166)
    out = proc(torch.zeros(2, 1088), [[], [5, 7]], [SamplingParams(), SamplingParams()])
    early, late = out
    assert early[166] == -math.inf and late[166] == 0
    assert torch.isinf(late[64:166]).all() and torch.isinf(late[167:]).all() and torch.isfinite(late[:64]).all()


def test_draw_rows_gives_each_row_what_it_would_get_alone():
    """Batching the draw changes no row's token: rules are grouped, each row keeps its own generator."""
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0))
    rules = [(True, 0.9, 50, 1.0), (False, 1.0, 0, 1.0), (True, 0.9, 50, 1.0), (True, 0.7, 0, 0.8),
             (True, 0.9, 50, 1.0), (False, 1.0, 0, 1.0)]

    def gens():
        return [torch.Generator().manual_seed(10 + i) for i in range(6)]

    together = draw_rows(logits, rules, gens()).tolist()
    alone = [int(draw_rows(logits[i:i + 1], [rule], [g])[0])
             for i, (rule, g) in enumerate(zip(rules, gens(), strict=True))]
    assert together == alone
    assert together[1] == int(logits[1].argmax()) and together[5] == int(logits[5].argmax())
    # Another seed for one row changes that row only.
    other = gens()
    other[2] = torch.Generator().manual_seed(999)
    changed = draw_rows(logits, rules, other).tolist()
    assert changed[:2] + changed[3:] == together[:2] + together[3:]


@pytest.mark.parametrize("vocab", [7, 2048, 3072])
def test_draw_rows_draws_what_torch_multinomial_draws(vocab):
    """The official code samples with torch.multinomial; our batched draw must give the same tokens
    from the same generator state, call after call."""
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(vocab)) * 3
    logits[:, 1::3] = float("-inf")
    rule = (True, 1.0, 0, 1.0)
    for row in range(4):
        ours, theirs = torch.Generator().manual_seed(row), torch.Generator().manual_seed(row)
        probs = logits[row].softmax(dim=-1)
        got = [int(draw_rows(logits[row:row + 1], [rule], [ours])[0]) for _ in range(20)]
        want = [int(torch.multinomial(probs, 1, generator=theirs)) for _ in range(20)]
        assert got == want


def test_draw_rows_refuses_non_finite_logits():
    logits = torch.zeros(2, 10)
    logits[1, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        draw_rows(logits, [(True, 1.0, 0, 1.0)] * 2, [None, None])
