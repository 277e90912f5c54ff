import pytest
import torch

import dinm
from dinm import twin
from dinm.errors import ConfigError
from dinm.config import DISTANCES


def test_twin_distances_by_hand():
    # layers=1, pairs=1, tokens=3, hidden=2; a is row 0, b is row 1.
    a = torch.tensor([[9.0, 9.0], [1.0, 0.0], [3.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    hidden = torch.stack([a, b])[None]
    mask_a = torch.tensor([[False, True, True]])
    mask_b = torch.tensor([[False, True, False]])
    # masked means: a -> (2, 0), b -> (0, 1). Small integers: every sum, mean and product is exact in fp32, and
    # only the final square root rounds (U = 2^-24 relative; rel=2U allows for a norm computed with a rescaling)
    U = 2.0 ** -24
    assert twin.layer_distances(hidden, mask_a, mask_b, "l2").item() == pytest.approx(5 ** 0.5, rel=2 * U)
    assert twin.layer_distances(hidden, mask_a, mask_b, "cosine").item() == 1.0  # 1 - 0 / (2 * 1)
    # position-wise over positions both keep (only t=1): |(1,0) - (0,1)|
    assert twin.layer_distances(hidden, mask_a, mask_b, "l2_tokens").item() == pytest.approx(2 ** 0.5, rel=2 * U)


@pytest.mark.parametrize("kind", twin.DISTANCE_KINDS)
def test_masked_positions_do_not_count(kind):
    torch.manual_seed(0)
    hidden = torch.randn(4, 2, 6, 8)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    base = twin.layer_distances(hidden, mask, mask, kind)
    hidden[:, :, 4:] = 1e6  # padding garbage
    # a masked position adds exactly 0 (1e6 * 0) to sums of the same shape and order: every bit stays
    assert torch.equal(twin.layer_distances(hidden, mask, mask, kind), base)


def test_locate_returns_argmax_of_every_layer(tiny, instance):
    model, tok = tiny
    for distance in DISTANCES:
        result = dinm.locate(model, tok, instance, distance)
        assert len(result.distances) == 3
        allowed = [1] if DISTANCES[distance][2] == "inner" else range(3)
        assert result.layer == max(allowed, key=lambda i: result.distances[i])
        assert all(d >= 0 for d in result.distances)


def test_inner_rule_chooses_neither_the_first_nor_the_last_layer(llama, instance, monkeypatch):
    """Same distances as "cosine"; only the layers it may choose differ."""
    from dinm import ops

    model, tok = llama
    assert dinm.locate(model, tok, instance, "cosine_inner").distances == dinm.locate(model, tok, instance,
                                                                                        "cosine").distances
    for planted, everywhere, inner in (([5.0, 1.0, 9.0], 2, 1), ([9.0, 1.0, 5.0], 0, 1)):
        monkeypatch.setattr(ops, "layer_distances", lambda *_a, planted=planted: torch.tensor(planted)[:, None])
        assert dinm.locate(model, tok, instance, "cosine").layer == everywhere
        assert dinm.locate(model, tok, instance, "cosine_inner").layer == inner


def test_locate_is_per_instance(llama, instance, other_instance):
    model, tok = llama
    a = dinm.locate(model, tok, instance).distances
    b = dinm.locate(model, tok, other_instance).distances
    assert a != b
    assert dinm.locate(model, tok, instance).distances == a  # and deterministic


def test_masks_cover_exactly_the_response_tokens(llama, instance):
    from dinm.locating import _encode
    from dinm.text import encode_pair

    _, tok = llama
    ids, attn, mask_a, mask_b = _encode(tok, instance, "prompt", True, 1024, 256)
    for mask, response, row in ((mask_a, instance.safe, 0), (mask_b, instance.unsafe, 1)):
        enc = encode_pair(tok, instance.prompt, response, add_end=False)
        assert mask[0].nonzero().flatten().tolist() == list(range(enc.n_prompt, len(enc.ids)))
        assert ids[row, :len(enc.ids)].tolist() == enc.ids
    assert (attn == 0).any()  # the two responses differ in length: there is padding, and it is masked
    # The paper's rule counts every position, padding and the first token included.
    ids, attn, mask_a, mask_b = _encode(tok, instance, "paper", True, 1024, 256)
    assert mask_a.all() and mask_b.all() and (attn == 0).any()


def test_unknown_distance():
    with pytest.raises(ConfigError, match="distance 'x' is not one of"):
        dinm.locate(None, None, None, "x")


def test_hooks_are_removed(llama, instance):
    model, tok = llama
    dinm.locate(model, tok, instance)
    assert all(not m._forward_hooks for m in model.modules())
