import pytest
import torch

from openmythos.data.tasks import KHopTask


def decode(task, ids):
    """Read one left-padded example back into (head, relation chain)."""
    toks = [t for t in ids.tolist() if t != task.PAD]
    assert toks[-1] == task.QUERY
    return toks[0] - 2, [t - 2 - task.n_entities for t in toks[1:-1]]


def test_every_target_follows_its_chain():
    task = KHopTask(n_entities=20, n_relations=4, seed=3)
    table = task.relations
    ids, targets = task.sample(200, hops=3, generator=torch.Generator().manual_seed(0), width=6)
    for row, target in zip(ids, targets, strict=True):
        e, chain = decode(task, row)
        assert 0 <= e < 20 and len(chain) == 3
        for r in chain:
            e = int(table[r, e])
        assert target == task.entity_token(e)


def test_relations_are_permutations():
    table = KHopTask(n_entities=50, n_relations=5).relations
    assert all(sorted(row.tolist()) == list(range(50)) for row in table)


def test_deterministic_under_a_seed():
    task = KHopTask(seed=1)
    a = task.batch(64, 4, torch.Generator().manual_seed(5), width=8)
    b = task.batch(64, 4, torch.Generator().manual_seed(5), width=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(KHopTask(seed=2).relations, task.relations)


@pytest.mark.parametrize("hops", [1, 2, 5])
def test_train_and_test_splits_are_disjoint(hops):
    task = KHopTask(n_entities=30, n_relations=3)
    g = torch.Generator().manual_seed(0)
    train = {tuple(r.tolist()) for r in task.sample(500, hops, g, split="train")[0]}
    test = {tuple(r.tolist()) for r in task.sample(200, hops, g, split="test")[0]}
    assert train and test and not train & test


def test_bad_arguments():
    task = KHopTask()
    g = torch.Generator()
    with pytest.raises(ValueError, match="hops"):
        task.sample(4, 0, g)
    with pytest.raises(ValueError, match="width=3"):
        task.sample(4, 2, g, width=3)
    with pytest.raises(ValueError, match="split"):
        task.sample(4, 2, g, split="dev")
    with pytest.raises(ValueError, match="n_entities"):
        KHopTask(n_entities=0)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        task.sample(0, 2, g)
    with pytest.raises(ValueError, match="max_hops must be >= 1, got 0"):
        task.batch(4, 0, g, width=6)


def test_an_empty_split_is_refused_not_sampled_forever():
    # 6 entities x 2 relations: none of the twelve 1-hop queries falls in the test split
    task, g = KHopTask(n_entities=6, n_relations=2), torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="the test split holds no 1-hop query"):
        task.sample(4, 1, g, split="test")
    assert task.sample(4, 1, g)[0].shape == (4, 3) and task.sample(4, 2, g, split="test")[0].shape == (4, 4)


# from a mutation review: the vocabulary, the split's size and batch's hop counts and split

def test_tokens_fill_the_vocabulary_exactly():
    """[PAD, QUERY, entities..., relations...]: the last relation is the last id of vocab_size,
    and no entity shares an id with a relation."""
    task = KHopTask(n_entities=20, n_relations=4)
    assert task.vocab_size == 26
    assert task.entity_token(0) == 2 and task.entity_token(19) == 21
    assert task.relation_token(0) == 22 and task.relation_token(3) == task.vocab_size - 1


def test_about_one_query_in_test_every_is_held_out():
    task = KHopTask(n_entities=30, n_relations=3)
    chains = torch.cartesian_prod(*[torch.arange(3)] * 3)
    heads = torch.arange(30).repeat_interleave(len(chains))
    held_out = task.is_test(heads, chains.repeat(30, 1)).float().mean().item()
    assert abs(held_out - 1 / task.TEST_EVERY) < 0.03, held_out


def test_batch_draws_every_hop_count_from_the_split_asked_for():
    """Hop counts are uniform in 1..max_hops, max_hops included, and split="test" batches hold
    test queries only."""
    task = KHopTask(n_entities=30, n_relations=3)
    for split in ("train", "test"):
        ids, targets, hops = task.batch(200, 4, torch.Generator().manual_seed(0), width=8, split=split)
        assert set(hops.tolist()) == {1, 2, 3, 4}
        for row, target, k in zip(ids, targets, hops.tolist(), strict=True):
            head, chain = decode(task, row)
            assert len(chain) == k and target == task.entity_token(task.follow(torch.tensor([head]), torch.tensor([chain]))[0])
            assert bool(task.is_test(torch.tensor([head]), torch.tensor([chain]))) == (split == "test")


def test_draws_reach_every_entity_and_every_relation():
    """A draw off by one (randint's exclusive end) never asks about the last entity or relation."""
    task = KHopTask(n_entities=7, n_relations=3)
    ids, _ = task.sample(2000, 2, torch.Generator().manual_seed(0))
    heads = {decode(task, row)[0] for row in ids}
    relations = {r for row in ids for r in decode(task, row)[1]}
    assert heads == set(range(7)) and relations == set(range(3))
