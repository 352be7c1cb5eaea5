import math

import pytest
import torch

from engine.sampling import SamplingParams, TalkerLogitsProcessor, apply_repetition_penalty, warp


@pytest.mark.parametrize("bad", [dict(temperature=math.nan), dict(top_p=math.inf), dict(repetition_penalty=-math.inf),
                                 dict(temperature=0.0), dict(top_k=-1), dict(top_k=2**31), dict(top_p=0.0)])
def test_validate_refuses_values_that_would_poison_the_logits(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad).validate()


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_warp_keeps_top_k_ties_and_top_p_mass():
    logits = torch.tensor([3.0, 2.0, 2.0, 1.0, 0.0])
    kept = torch.isfinite(warp(logits, 1.0, 2, 1.0))
    assert kept.tolist() == [True, True, True, False, False]  # the tie with the 2nd is kept, as HF does
    kept = torch.isfinite(warp(logits, 1.0, 0, 0.5))
    assert kept.tolist() == [True, False, False, False, False]


def test_talker_processor_forbids_eos_early_and_control_ids_always():
    proc = TalkerLogitsProcessor(vocab_size=1088, eos_id=166)
    logits = torch.zeros(1088)
    early = proc(logits, torch.tensor([], dtype=torch.long), 0, SamplingParams())
    late = proc(logits, torch.tensor([], dtype=torch.long), 2, SamplingParams())
    assert early[166] == -math.inf and late[166] == 0
    assert torch.isinf(late[64:166]).all() and torch.isinf(late[167:]).all() and torch.isfinite(late[:64]).all()
