import pytest
import torch

from openmythos.generation import sample
from tests.conftest import small_model


def greedy_reference(model, ids, steps, n_loops):
    """Greedy decoding without any cache: a full forward pass per new token."""
    for _ in range(steps):
        nxt = model(ids, n_loops=n_loops).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_greedy_generate_matches_uncached_reference(attn_type):
    model = small_model(attn_type=attn_type)
    ids = torch.randint(0, 64, (2, 5))
    out = model.generate(ids, 8, temperature=0, n_loops=2)
    assert torch.equal(out, greedy_reference(model, ids, 8, 2))


def test_prompts_of_different_lengths():
    model = small_model()
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10]]
    out = model.generate(prompts, 5, temperature=0)
    for row, p in zip(out, prompts, strict=True):
        alone = model.generate([p], 5, temperature=0)[0]
        assert torch.equal(row[-5:], alone[-5:])
    assert out.shape == (2, 6 + 5)


def test_each_sequence_stops_at_its_own_eos():
    model = small_model()
    ids = torch.randint(0, 64, (3, 4))
    free = model.generate(ids, 6, temperature=0)
    eos = int(free[0, 5])  # the second token sequence 0 produces
    out = model.generate(ids, 6, temperature=0, eos_token_id=eos)
    for row, ref in zip(out, free, strict=True):
        new, ref_new = row[4:].tolist(), ref[4:].tolist()
        if eos in ref_new:
            k = ref_new.index(eos)
            assert new[:k + 1] == ref_new[:k + 1] and all(t == eos for t in new[k:])
        else:
            assert new == ref_new


def test_stream_yields_what_generate_returns():
    model = small_model()
    ids = torch.randint(0, 64, (2, 3))
    g = torch.Generator().manual_seed(1)
    streamed = torch.stack(list(model.stream(ids, 6, temperature=0.8, generator=g)), 1)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(model.generate(ids, 6, temperature=0.8, generator=g)[:, 3:], streamed)


def test_default_depth_is_the_config_depth():
    model = small_model()
    ids = torch.randint(0, 64, (1, 4))
    assert torch.equal(model.generate(ids, 4, temperature=0),
                       model.generate(ids, 4, temperature=0, n_loops=model.cfg.max_loop_iters))


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # probabilities ~ (0.665, 0.245, 0.09, 0): mass before token 2 is 0.91 >= 0.9, so it is cut
    assert set(sample(logits, 1.0, top_p=0.9, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, 1.0, top_k=1000, generator=g).tolist()) <= {0, 1, 2}
    assert (sample(logits, 0.0) == 0).all()
    # a temperature too small to divide by samples the argmax, its limit, instead of NaN
    assert (sample(logits, 1e-45, generator=g) == 0).all()
    # a top_p that rounds to 0 in fp32 keeps the best token, as any top_p does
    assert (sample(logits, 1.0, top_p=1e-46, generator=g) == 0).all()


@pytest.mark.parametrize("kwargs,needle", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(n_loops=2.0), "n_loops must be a positive integer, got 2.0"),
    (dict(n_loops=torch.tensor(2)), r"n_loops as a tensor must be \(1,\)"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(input_ids=[[5, 6]], attention_mask=torch.ones(1, 2)), "attention_mask goes with a tensor"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=100), "max_seq_len"),
    (dict(pad_token_id=999), r"pad_token_id must be a token id in \[0, 64\), got 999"),
    (dict(eos_token_id=-1), r"eos_token_id must be a token id in \[0, 64\), got -1"),
    (dict(input_ids=[[5, 6], [7]], pad_token_id=64), "pad_token_id"),
    (dict(input_ids=["hello"]), "integer token ids, got 'h'"),
    (dict(input_ids=torch.tensor([[7, 8, 0]]), attention_mask=torch.tensor([[1, 1, 0]])), "left padding"),
])
def test_bad_sampling_arguments(kwargs, needle):
    model = small_model()
    args = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=needle):
        model.generate(**args)


def test_the_model_methods_take_the_generation_arguments_by_name_and_position():
    import inspect

    model = small_model()
    assert "temperature" in inspect.signature(model.generate).parameters
    ids = torch.randint(0, 64, (1, 4))
    assert torch.equal(model.generate(ids, 3, 2, 0.0), model.generate(ids, 3, n_loops=2, temperature=0.0))
    # prompts as lists of numpy integers
    import numpy as np

    assert torch.equal(model.generate([list(np.array([5, 6, 7]))], 2, temperature=0, eos_token_id=np.int64(3)),
                       model.generate([[5, 6, 7]], 2, temperature=0, eos_token_id=3))
