"""Training loader resume state, un-padded evaluation sharding, RNG capture (weights_only-loadable)."""

import io
import random

import numpy as np
import pytest
import torch

from lightning_backdoor.data.loaders import ResumableDataLoader, capture_rng, eval_sampler, restore_rng


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_pass_continues_the_same_order(workers):
    data = list(range(23))
    loader = ResumableDataLoader(data, seed=5, batch_size=4, num_workers=workers, persistent_workers=workers > 0)
    loader.sampler.set_epoch(3)
    full = [b.tolist() for b in loader]
    it = iter(loader)
    seen = [next(it).tolist() for _ in range(2)]
    state = loader.state_dict()
    assert state == {"epoch": 3, "batches": 2, "seed": 5} and seen == full[:2]
    fresh = ResumableDataLoader(data, seed=5, batch_size=4, num_workers=workers, persistent_workers=workers > 0)
    fresh.load_state_dict(state)
    assert [b.tolist() for b in fresh] == full[2:]
    assert len(fresh) == len(full)  # the length Lightning sees is the full pass


def test_order_depends_only_on_seed_and_epoch_and_a_finished_pass_moves_on():
    a, b = ResumableDataLoader(list(range(10)), seed=1, batch_size=3), ResumableDataLoader(list(range(10)), seed=1, batch_size=3)
    torch.manual_seed(0)
    first = [x.tolist() for x in a]
    torch.manual_seed(99)  # the global RNG does not matter
    assert [x.tolist() for x in b] == first
    b.load_state_dict(b.state_dict())  # a complete pass: the next one is epoch + 1
    b.sampler.set_epoch(0)
    nxt = [x.tolist() for x in b]
    a.sampler.set_epoch(1)
    assert nxt == [x.tolist() for x in a] != first


def test_resume_state_with_another_seed_is_refused():
    with pytest.raises(ValueError, match="seed=1 but this loader has seed=2"):
        ResumableDataLoader(list(range(4)), seed=2, batch_size=2).load_state_dict({"epoch": 0, "batches": 1, "seed": 1})


def test_eval_sampler_is_sequential_in_one_process():
    assert list(eval_sampler(list(range(5)))) == [0, 1, 2, 3, 4]


def test_rng_state_round_trips_through_weights_only_load():
    state = capture_rng()
    expected = (torch.rand(3), random.random(), np.random.rand())
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restore_rng(torch.load(buf, weights_only=True))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]
