import torch

from mlm.data.masking import IGNORE_INDEX, MaskingSpec, mask_tokens, masked_count

CLS, SEP, MASK, VOCAB = 0, 2, 4, 1000
SPECIALS = (0, 1, 2, 3, 4)


def batch(rows=512, length=130):
    ids = torch.randint(5, VOCAB, (rows, length), generator=torch.Generator().manual_seed(1))
    ids[:, 0], ids[:, -1] = CLS, SEP
    return ids


def test_fixed_count_per_sequence_and_80_10_10():
    ids = batch()
    spec = MaskingSpec(0.15, MASK, VOCAB, SPECIALS)
    masked, positions, labels = mask_tokens(ids, spec, torch.Generator().manual_seed(0))
    k = masked_count(130, 0.15)
    assert k == 19 and positions.shape == labels.shape == (512, k)
    assert (labels != IGNORE_INDEX).all()  # every chosen position is predicted
    assert all(len(set(row.tolist())) == k for row in positions)  # distinct positions
    assert not ((positions == 0) | (positions == 129)).any()  # special tokens never chosen
    assert torch.equal(labels, ids.gather(1, positions))
    # Outside the chosen positions nothing changes.
    untouched = torch.ones_like(ids, dtype=torch.bool).scatter(1, positions, False)
    assert torch.equal(masked[untouched], ids[untouched])
    new = masked.gather(1, positions)
    n = new.numel()
    frac_mask = (new == MASK).sum().item() / n
    frac_same = (new == labels).sum().item() / n
    frac_random = 1 - frac_mask - frac_same
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_same - 0.1) < 0.02 and abs(frac_random - 0.1) < 0.02
    assert not torch.isin(new[(new != MASK) & (new != labels)], torch.tensor(SPECIALS)).any()


def test_per_token_bernoulli_rate_and_specials():
    ids = batch()
    spec = MaskingSpec(0.15, MASK, VOCAB, SPECIALS, per_token=True)
    masked, positions, labels = mask_tokens(ids, spec, torch.Generator().manual_seed(0))
    assert positions.shape == ids.shape
    chosen = labels != IGNORE_INDEX
    assert abs(chosen[:, 1:-1].float().mean().item() - 0.15) < 0.01
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_same_seed_same_masks_other_seed_other_masks():
    ids = batch(8, 40)
    spec = MaskingSpec(0.15, MASK, VOCAB, SPECIALS)
    a = mask_tokens(ids, spec, torch.Generator().manual_seed(5))
    b = mask_tokens(ids, spec, torch.Generator().manual_seed(5))
    c = mask_tokens(ids, spec, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])


def test_special_tokens_inside_the_sequence_are_never_masked():
    ids = batch(64, 40)
    ids[:, 10] = SEP  # document separators inside a window
    spec = MaskingSpec(0.5, MASK, VOCAB, SPECIALS)
    _, positions, labels = mask_tokens(ids, spec, torch.Generator().manual_seed(0))
    assert not (positions == 10).any()


def test_a_slice_of_the_global_batch_is_masked_as_in_the_whole():
    ids = batch(16, 40)
    spec = MaskingSpec(0.15, MASK, VOCAB, SPECIALS)
    whole = mask_tokens(ids, spec, torch.Generator().manual_seed(3))
    for rank in range(4):
        part = mask_tokens(ids[rank * 4 : (rank + 1) * 4], spec, torch.Generator().manual_seed(3), rank * 4, 16)
        assert all(torch.equal(w[rank * 4 : (rank + 1) * 4], p) for w, p in zip(whole, part))
