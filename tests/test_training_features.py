"""What a training step does beyond the loss: the aux-loss-free router bias, gradient clipping
and the ACT ponder cost, each checked against the step's own forward pass."""

import pytest
import torch

from openmythos.training import Trainer
from openmythos.training.config import load_config
from tests.test_training import _restore_threads, tiny_overrides  # noqa: F401  (a fixture)


def trainer_for(tmp_path, **overrides) -> Trainer:
    overrides = {"run.head_dtype": "fp32", "train.grad_accum": 1, **overrides}
    return Trainer(load_config(None, tiny_overrides(tmp_path, **overrides)))


def record_forward(trainer: Trainer, hook=None) -> list:
    """The model's outputs of each training forward pass, after hook(out) has seen each."""
    forward, outs = trainer.model.forward, []

    def recorded(*args, **kwargs):
        out = forward(*args, **kwargs)
        if hook is not None:
            hook(out)
        outs.append(out)
        return out

    trainer.model.forward = recorded
    return outs


def grads_at_step(trainer: Trainer) -> list:
    """The gradients the optimizer sees at each step, after clipping: a list per step (zeros
    for a parameter the step did not reach, such as the halting head without halting)."""
    seen = []

    def pre_hook(optimizer, args, kwargs):
        seen.append([torch.zeros_like(p) if p.grad is None else p.grad.clone()
                     for group in optimizer.param_groups for p in group["params"]])

    trainer.optimizer.register_step_pre_hook(pre_hook)
    return seen


def norm(tensors: list) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])))


def test_each_step_moves_the_router_bias_by_the_steps_expert_load(tmp_path):
    trainer = trainer_for(tmp_path)
    moe = trainer.model.moe
    outs = record_forward(trainer)
    assert (moe.router_bias == 0).all() and moe.bias_rate > 0
    expected = torch.zeros_like(moe.router_bias)
    for _ in range(3):
        trainer.train_step()
        load = outs[-1].expert_load.float()
        expected += moe.bias_rate * torch.sign(load.mean() - load)
        torch.testing.assert_close(moe.router_bias, expected, atol=0, rtol=0)
    assert (moe.router_bias != 0).any()  # the tiny model's load is not balanced
    trainer.close()


@pytest.mark.parametrize("clip", [0.01, 0.0], ids=["clipped", "no_clip"])
def test_the_optimizer_steps_on_clipped_gradients_and_the_log_keeps_the_norm(tmp_path, clip):
    trainer = trainer_for(tmp_path, **{"train.grad_clip": clip})
    seen = grads_at_step(trainer)
    for step in range(2):
        record = trainer.train_step()
        assert record["grad_norm"] > 0.1  # the norm before clipping, well above the clip
        want = clip or record["grad_norm"]  # 0 disables clipping
        assert norm(seen[step]) == pytest.approx(want, rel=1e-4)
    trainer.close()


def test_the_ponder_cost_is_in_the_gradient_by_its_weight(tmp_path):
    # the gradients the optimizer gets are those of ce + ponder_weight * ponder + aux, each
    # part's taken from the step's own graph
    weight = 0.5
    trainer = trainer_for(tmp_path, **{"model.halting": "act", "train.ponder_weight": weight,
                                       "train.grad_clip": 0.0})
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    parts = []

    def grads_of_each_part(out):
        def grad(loss):
            got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            return [torch.zeros_like(p) if g is None else g for p, g in zip(params, got, strict=True)]
        parts.append((grad(out.loss + out.aux_loss), grad(out.ponder_loss)))

    record_forward(trainer, grads_of_each_part)
    seen = grads_at_step(trainer)
    trainer.train_step()
    (rest, ponder), = parts
    assert norm(ponder) > 1e-3 * norm(rest)  # the ponder cost has a gradient worth seeing
    for got, r, p in zip(seen[0], rest, ponder, strict=True):
        torch.testing.assert_close(got, r + weight * p, atol=1e-7, rtol=1e-5)
    trainer.close()


def test_gradient_accumulation_steps_on_the_mean_of_the_micro_batches(tmp_path):
    """With train.grad_accum micro-batches the optimizer sees the mean of their gradients (not the
    sum), and the step's record holds the means of their loss, depth and state norm and counts
    every micro-batch's tokens."""
    trainer = trainer_for(tmp_path, **{"train.grad_accum": 2, "train.grad_clip": 0.0})
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    parts = []

    def grads_of_the_loss(out):
        loss = out.loss + trainer.cfg.train.ponder_weight * out.ponder_loss + out.aux_loss
        got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        parts.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, got, strict=True)])

    outs = record_forward(trainer, grads_of_the_loss)
    seen = grads_at_step(trainer)
    record = trainer.train_step()
    assert len(outs) == 2
    for got, a, b in zip(seen[0], *parts, strict=True):
        torch.testing.assert_close(got, (a + b) / 2, atol=1e-7, rtol=1e-5)
    assert record["loss"] == pytest.approx(sum(float(o.loss.detach()) for o in outs) / 2, rel=1e-6)
    assert record["loops"] == 2.0  # the fixed sampler's depth, not the state norm
    assert record["state_norm"] == pytest.approx(sum(float(o.state_norm.detach()) for o in outs) / 2, rel=1e-6)
    assert record["token_corr"] == pytest.approx(sum(float(o.token_corr) for o in outs) / 2, rel=1e-6)
    B, T = trainer.cfg.train.batch_size, trainer.cfg.data.seq_len
    assert record["tokens"] == trainer.tokens_seen == 2 * B * T
    trainer.close()


def test_each_step_runs_at_its_scheduled_learning_rate(tmp_path):
    """Step s (counted from 0) trains at lr_at(s): warm-up reaches the peak at the step after it,
    and every parameter group gets the rate."""
    from openmythos.training.optim import lr_at

    trainer = trainer_for(tmp_path)
    rates = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: rates.append({g["lr"] for g in opt.param_groups}))
    records = [trainer.train_step() for _ in range(4)]
    want = [lr_at(s, trainer.cfg.train) for s in range(4)]
    assert want[:3] == pytest.approx([1.5e-3, 3e-3, 3e-3], rel=1e-3)  # 2 warm-up steps to 3e-3
    assert [r["lr"] for r in records] == want
    assert rates == [{lr} for lr in want]
    trainer.close()


def test_a_skipped_step_changes_nothing_and_a_good_step_resets_the_count(tmp_path):
    """A non-finite step moves neither the weights nor the router bias, and only non-finite
    steps *in a row* abort the run: the count starts again after a good one."""
    trainer = trainer_for(tmp_path, **{"train.max_bad_steps": 2})
    calls = [0]

    def nan_on_odd_calls(out):
        calls[0] += 1
        if calls[0] % 2:
            out.loss = out.loss * float("nan")

    record_forward(trainer, nan_on_odd_calls)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step()  # skipped
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    for _ in range(3):  # good, skipped, good: never 2 in a row
        trainer.train_step()
    assert (trainer.skipped, trainer.bad_in_row, trainer.step) == (2, 0, 4)
    trainer.close()


def test_dropout_draws_new_masks_each_step_and_the_same_ones_on_a_rerun(tmp_path):
    """Dropout's generator is seeded from (seed, step, rank) at every step: a mask drawn once
    and repeated at every step would regularise nothing, and a rerun (or a resume) must draw the
    same masks."""
    def seeds(folder):
        trainer = trainer_for(tmp_path / folder, **{"model.dropout": 0.1})
        drawn = []
        record_forward(trainer, lambda out: drawn.append(torch.initial_seed()))
        for _ in range(3):
            trainer.train_step()
        trainer.close()
        return drawn

    first = seeds("a")
    assert len(set(first)) == 3 and seeds("b") == first
