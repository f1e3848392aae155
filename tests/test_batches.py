import torch

from sae_circuits.batches import from_rows, scored_positions, split_batch, trace_inputs


def test_bare_ids_have_every_position_real():
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    got, mask = split_batch(ids)
    assert got is ids
    assert mask.dtype == torch.bool and bool(mask.all())


def test_pairs_give_a_boolean_mask():
    ids = torch.tensor([[0, 6, 7]])
    got, mask = split_batch((ids, torch.tensor([[0, 1, 1]])))
    assert got is ids and mask.tolist() == [[False, True, True]]
    inputs = trace_inputs(got, mask)
    assert inputs["attention_mask"].dtype == torch.long
    assert inputs["attention_mask"].tolist() == [[0, 1, 1]]


def test_each_rows_first_real_token_is_skipped_under_left_padding():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]).bool()
    assert torch.equal(scored_positions(mask, skip_first=False), mask)
    expected = [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert scored_positions(mask, skip_first=True).long().tolist() == expected


def test_rows_with_pad_marks_back_to_a_batch():
    ids, mask = from_rows(torch.tensor([[-1, -1, 3, 4], [1, 2, 3, 4]]), pad_id=9)
    assert ids.tolist() == [[9, 9, 3, 4], [1, 2, 3, 4]]
    assert mask.tolist() == [[False, False, True, True], [True, True, True, True]]
