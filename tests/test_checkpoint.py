"""Checkpoints: round trip, atomic writes, pruning, and clear errors for damaged directories."""

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import small_model
from torch.distributed.tensor import DTensor

from openmythos.data import ByteTokenizer
from openmythos.training import TrainConfig, find_checkpoint, load_model, save_checkpoint
from openmythos.training import checkpoint as checkpoint_mod
from openmythos.training.checkpoint import (
    CHECKPOINTS,
    MANIFEST,
    STATE,
    WEIGHTS,
    CheckpointWriteError,
    open_checkpoint,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: OpenMP threads waiting on each other at every op only cost time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# small_model's context is 64 tokens: a TrainConfig that reads windows it can hold
CFG = TrainConfig().override({"data.seq_len": 32})


def save(run_dir: Path, step: int, keep: int = 3, seed: int = 0):
    model = small_model(seed, vocab_size=ByteTokenizer().vocab_size)
    model.moe.router_bias.fill_(0.25)  # a buffer, not a parameter: it must travel too
    state = {"step": step, "rng": torch.Generator().manual_seed(step).get_state()}
    path = save_checkpoint(run_dir, step, model, CFG, ByteTokenizer(), state, keep)
    return model, path


def test_round_trip(tmp_path):
    model, path = save(tmp_path, 5)
    assert path == tmp_path / CHECKPOINTS / "step_00000005"
    loaded, tokenizer, cfg = load_model(tmp_path)
    assert cfg == CFG and tokenizer.vocab_size == 258 and not loaded.training
    assert loaded.cfg == model.cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    ids = torch.randint(0, 258, (2, 9))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    ckpt = open_checkpoint(path)
    assert ckpt.step == 5
    assert torch.equal(ckpt.trainer_state["rng"], torch.Generator().manual_seed(5).get_state())


def test_keeps_the_newest_k_and_sweeps_crashed_writes(tmp_path):
    stale = tmp_path / CHECKPOINTS / ".tmp-step_00000001-123"
    stale.mkdir(parents=True)
    (stale / WEIGHTS).write_bytes(b"half a file")
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep=2)
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir()) == ["step_00000003",
                                                                          "step_00000004"]


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / MANIFEST).unlink(), "incomplete: it has no manifest.json"),
    (lambda p: (p / WEIGHTS).write_bytes((p / WEIGHTS).read_bytes()[:100]), "truncated"),
    (lambda p: (p / STATE).unlink(), "missing trainer_state.pt"),
    (lambda p: (p / MANIFEST).write_text("{not json"), "manifest .* is corrupt"),
    # valid JSON of the wrong shape, and bytes that are not UTF-8
    (lambda p: (p / MANIFEST).write_text('{"format": 1, "step": 2, "files": []}'), "manifest .* is corrupt"),
    (lambda p: (p / MANIFEST).write_text('{"files": {"config.json": 5}}'), "manifest .* is corrupt"),
    (lambda p: (p / MANIFEST).write_bytes(b"\xff\xfe{"), "manifest .* is corrupt"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage, message):
    save(tmp_path, 1)
    _, newest = save(tmp_path, 2)
    damage(newest)
    with pytest.warns(UserWarning, match=message):
        assert find_checkpoint(tmp_path) == tmp_path / CHECKPOINTS / "step_00000001"
    with pytest.raises(ValueError, match=message):  # asked for by name: no silent substitute
        find_checkpoint(newest)


def test_flipped_bytes_fail_the_checksum(tmp_path, monkeypatch):
    _, path = save(tmp_path, 1)
    hashed = []
    real = checkpoint_mod._sha256
    monkeypatch.setattr(checkpoint_mod, "_sha256", lambda p: hashed.append(p.name) or real(p))
    load_model(path)
    load_model(path)  # a resume opens a checkpoint twice: its files are hashed once
    assert sorted(hashed) == sorted(set(hashed)) and WEIGHTS in hashed
    data = bytearray((path / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="fails its sha256 check"):
        load_model(path)


@pytest.mark.parametrize("failure, hint", [
    (OSError(28, "No space left on device"), "is the disk full"),
    (RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos"), "is the disk full"),
    # a peer that died mid-save breaks the collective: not the disk's doing
    (torch.distributed.DistBackendError("[../gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"),
     "did another rank fail"),
    # either sign of a broken collective is enough: the error's type, or NCCL's words in a plain one
    (torch.distributed.DistNetworkError("Broken pipe"), "did another rank fail"),
    (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error"), "did another rank fail"),
])
def test_an_interrupted_write_never_replaces_the_last_good_checkpoint(tmp_path, monkeypatch, failure, hint):
    save(tmp_path, 1)

    def disk_full(*args, **kwargs):  # torch.save reports a full disk either way
        raise failure

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint step 2 in .*"
                                                   + re.escape(hint) + r".*"
                                                   r"the newest checkpoint is still step_00000001"):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert find_checkpoint(tmp_path).name == "step_00000001"
    # nothing half-written is left to keep a full disk full
    assert [p.name for p in (tmp_path / CHECKPOINTS).iterdir()] == ["step_00000001"]


def test_a_failed_save_names_the_newest_checkpoint_kept(tmp_path, monkeypatch):
    """The error names the checkpoint a resume would start from: the newest one, not the oldest
    still on disk."""
    for step in (1, 2):
        save(tmp_path, step)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError, match="the newest checkpoint is still step_00000002$"):
        save(tmp_path, 3)


def test_resaving_a_step_replaces_it(tmp_path):
    save(tmp_path, 3, seed=0)
    model, _ = save(tmp_path, 3, seed=1)
    loaded, _, _ = load_model(tmp_path)
    torch.testing.assert_close(loaded.embed.weight, model.embed.weight, rtol=0, atol=0)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nowhere", "does not exist"),
    (lambda p: p, "no checkpoint found in"),
])
def test_missing_checkpoints_give_clear_errors(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        load_model(make(tmp_path))


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path):
    _, path = save(tmp_path, 1)
    (path / WEIGHTS).unlink()
    # said once, in the error: no warning about skipping it as well
    with pytest.raises(ValueError, match=r"no complete checkpoint .* missing model.safetensors"), \
            warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(tmp_path)


def test_weights_that_do_not_fit_the_config_are_rejected(tmp_path):
    _, path = save(tmp_path, 1)
    meta = json.loads((path / "config.json").read_text())
    meta["model"]["dim"] = 128
    other = tmp_path / "other" / "step_00000001"
    shutil.copytree(path, other)
    (other / "config.json").write_text(json.dumps(meta))
    manifest = json.loads((other / MANIFEST).read_text())
    del manifest["files"]["config.json"]  # a hand-edited config that still passes verification
    (other / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not match its model config"):
        load_model(other)


@pytest.fixture
def world_of_one():
    """A one-process gloo group, in this process: FSDP2 and DCP code paths without torchrun."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def sharded_model(seed: int = 0):
    from conftest import small_config

    from openmythos.model import OpenMythos
    from openmythos.training.config import DistConfig
    from openmythos.training.distributed import broadcast_full_weights, parallelize

    cfg = small_config(vocab_size=ByteTokenizer().vocab_size)
    with torch.device("meta"):
        model = OpenMythos(cfg)
    parallelize(model, DistConfig(strategy="fsdp"), device=torch.device("cpu"))
    reference = small_model(seed, vocab_size=cfg.vocab_size)
    reference.moe.router_bias.fill_(0.25)
    broadcast_full_weights(model, reference.state_dict())
    return model, reference


@pytest.mark.parametrize("where", ["shards", "the rest"])
def test_a_sharded_checkpoint_that_cannot_be_written_leaves_nothing(tmp_path, world_of_one, monkeypatch, where):
    import torch.distributed.checkpoint.filesystem as dcp_files

    from openmythos.training import checkpoint
    from openmythos.training.checkpoint import save_sharded

    model, _ = sharded_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_sharded(tmp_path, 1, model, optimizer, TrainConfig(), ByteTokenizer(), {"step": 1}, keep=2)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # DCP's own writer (its failure is a CheckpointException, not an OSError), or the files after it
    monkeypatch.setattr(*((dcp_files, "_write_item") if where == "shards" else (checkpoint, "_fsync")), disk_full)
    message = "could not write checkpoint step 2 in .*No space left on device.* still step_00000001$"
    with pytest.raises(CheckpointWriteError, match=message):
        save_sharded(tmp_path, 2, model, optimizer, TrainConfig(), ByteTokenizer(), {"step": 2}, keep=2)
    assert [p.name for p in (tmp_path / CHECKPOINTS).iterdir()] == ["step_00000001"]


def test_a_failed_prune_after_the_save_is_a_warning(tmp_path, monkeypatch):
    from openmythos.training import checkpoint

    save(tmp_path, 1)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint, "_prune", denied)
    with pytest.warns(UserWarning, match="step_00000002 is written, but pruning older ones failed"):
        save(tmp_path, 2)
    assert find_checkpoint(tmp_path).name == "step_00000002"


def test_sharded_checkpoints_round_trip_prune_and_verify(tmp_path, world_of_one):
    from openmythos.training.checkpoint import SHARDED, save_sharded

    model, reference = sharded_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in (1, 2, 3):
        path = save_sharded(tmp_path, step, model, optimizer, TrainConfig(), ByteTokenizer(),
                            {"step": step}, keep=2, consolidate=step == 3)
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir()) == ["step_00000002",
                                                                          "step_00000003"]
    files = json.loads((path / MANIFEST).read_text())["files"]
    assert f"{SHARDED}/.metadata" in files and WEIGHTS in files
    assert not (tmp_path / CHECKPOINTS / "step_00000002" / WEIGHTS).exists()
    # the consolidated weights and the shards, read without a sharded model, are the reference
    for ckpt in (path, tmp_path / CHECKPOINTS / "step_00000002"):
        loaded, _, _ = load_model(ckpt)
        for (name, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items(),
                                     strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # a damaged shard fails the manifest, and the run falls back to the previous checkpoint
    shard = next((path / SHARDED).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.warns(UserWarning, match="truncated"):
        assert find_checkpoint(tmp_path) == tmp_path / CHECKPOINTS / "step_00000002"


def test_shards_of_another_model_are_refused(tmp_path, world_of_one):
    from conftest import small_config

    from openmythos.model import OpenMythos
    from openmythos.training.checkpoint import save_sharded

    model, _ = sharded_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = save_sharded(tmp_path, 1, model, optimizer, TrainConfig(), ByteTokenizer(), {}, keep=1)
    deeper = OpenMythos(small_config(vocab_size=ByteTokenizer().vocab_size, coda_layers=2))
    with pytest.raises(ValueError, match=r"does not match its model config: its shards lack "
                                         r"\['coda.1"):
        open_checkpoint(path).load_weights(deeper)


def test_a_compiled_model_saves_as_its_module(tmp_path):
    """torch.compile(model)'s state dict prefixes every key with _orig_mod.: the save succeeded
    and the load failed ("Missing key(s)")."""
    model = small_model(0, vocab_size=ByteTokenizer().vocab_size)
    path = save_checkpoint(tmp_path, 1, torch.compile(model), CFG, ByteTokenizer(), {"step": 1}, 2)
    loaded = load_model(path)[0].state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)


def test_a_checkpoint_that_could_not_be_used_is_refused_at_save(tmp_path):
    """A hand-trained model saved with a TrainConfig for another model saved fine and failed in
    `mythos eval` ("sequence length 256 ... exceeds max_seq_len=64")."""
    model = small_model(0, vocab_size=ByteTokenizer().vocab_size, max_seq_len=64)
    with pytest.raises(ValueError, match="train_cfg.data.seq_len=256 exceeds the model's max_seq_len=64"):
        save_checkpoint(tmp_path, 1, model, TrainConfig(), ByteTokenizer(), {"step": 1}, 2)
    with pytest.raises(ValueError, match="tokenizer's vocab_size 258 exceeds the model's 64"):
        save_checkpoint(tmp_path, 1, small_model(0, vocab_size=64), CFG, ByteTokenizer(), {"step": 1}, 2)
    assert not (tmp_path / CHECKPOINTS).exists()


def test_a_window_as_long_as_the_models_context_saves(tmp_path):
    """data.seq_len == max_seq_len, the usual full-context setting, fits the model: only a
    longer window is refused at save."""
    model = small_model(0, vocab_size=ByteTokenizer().vocab_size, max_seq_len=64)
    cfg = TrainConfig().override({"data.seq_len": 64})
    path = save_checkpoint(tmp_path, 1, model, cfg, ByteTokenizer(), {"step": 1}, 2)
    assert load_model(path)[2].data.seq_len == 64


def test_model_weights_are_as_readable_as_the_rest_of_the_checkpoint(tmp_path):
    """safetensors writes its file owner-only (0600): a colleague could read a run's config
    and tokenizer but not its weights."""
    _, path = save(tmp_path, 1)
    assert (path / WEIGHTS).stat().st_mode & 0o777 == (path / "config.json").stat().st_mode & 0o777


def test_pruning_keeps_the_checkpoint_just_written_beside_a_later_one(tmp_path):
    """A later checkpoint (a resume from an earlier step, after a save that crashed) waits to be
    replaced at its step: it does not count against `keep`, and pruning never deletes the
    checkpoint just written in its favour."""
    save(tmp_path, 1)
    save(tmp_path, 5)
    _, path = save(tmp_path, 2, keep=1)
    assert path.is_dir()
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir()) == ["step_00000002", "step_00000005"]


def test_folders_named_like_steps_but_not_numbered_are_ignored(tmp_path):
    """A folder such as checkpoints/step_best (a copy a user kept) is no checkpoint of the run:
    it was taken for one, and int('best') crashed every resume and load."""
    save(tmp_path, 1)
    (tmp_path / CHECKPOINTS / "step_best").mkdir()
    _, path = save(tmp_path, 2, keep=1)
    assert find_checkpoint(tmp_path) == path
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir()) == ["step_00000002", "step_best"]


def test_the_run_folder_of_a_checkpoint(tmp_path):
    """<run>/checkpoints/step_N belongs to <run>; a checkpoint copied out on its own belongs
    to the folder that holds it (not that folder's parent)."""
    from openmythos.training.checkpoint import run_dir_of

    _, path = save(tmp_path / "run", 1)
    loose = shutil.copytree(path, tmp_path / "kept" / path.name)
    assert run_dir_of(open_checkpoint(path)) == tmp_path / "run"
    assert run_dir_of(open_checkpoint(loose)) == tmp_path / "kept"


def test_a_checkpoint_without_split_digests_reports_no_changed_split(tmp_path):
    """Checkpoints from before the data record hold no split digests: nothing to compare, so no
    split is reported changed; a recorded one that differs is."""
    from types import SimpleNamespace

    _, path = save(tmp_path, 1)  # its state holds no "data"
    ckpt = open_checkpoint(path)
    train, val = SimpleNamespace(digest="aaaa"), SimpleNamespace(digest="bbbb")
    assert ckpt.data == {} and ckpt.changed_splits(train, val) == []
    ckpt.data = {"train": "aaaa", "val": "cccc"}
    assert ckpt.changed_splits(train, val) == ["val"]


def loss_and_grads(model, ids):
    """The mean loss over `ids` and every parameter's gradient, whole (a shard's gathered),
    recording the warnings the forward and backward raise."""
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        loss = model(ids, targets=ids).loss
        loss.backward()
    grads = {name: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
             for name, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, [str(w.message) for w in raised]


def test_a_sharded_model_has_the_plain_models_loss_and_gradients(world_of_one):
    """In one process, sharded and plain give the same loss and gradients, and no warning:
    parallelize clones the looped block's output, its (N, D) rows viewed as (B, T, D), as FSDP2
    warns of wrong gradients when a sharded module returns a view."""
    model, reference = sharded_model()
    ids = torch.randint(0, 258, (2, 16), generator=torch.Generator().manual_seed(0))
    loss, grads, raised = loss_and_grads(model, ids)
    want, want_grads, _ = loss_and_grads(reference.train(), ids)
    assert not [w for w in raised if "returned a view" in w]
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.multiprocess
def test_two_shards_of_a_batch_have_the_whole_batchs_loss_and_gradients(tmp_path):
    """Two FSDP2 ranks, each on half the batch: the mean of their losses and the gradients they
    reduce-scatter are the one-process loss and gradients of the whole batch."""
    from tests.test_distributed import run_ranks

    ids = torch.randint(0, 258, (4, 16), generator=torch.Generator().manual_seed(0))

    def half(rank):
        model, _ = sharded_model()
        loss, grads, raised = loss_and_grads(model, ids[2 * rank:2 * rank + 2])
        return loss, {name: g.numpy() for name, g in grads.items()}, raised

    got = run_ranks(tmp_path, half)
    reference = small_model(0, vocab_size=ByteTokenizer().vocab_size).train()
    reference.moe.router_bias.fill_(0.25)  # as sharded_model's
    want, want_grads, _ = loss_and_grads(reference, ids)
    torch.testing.assert_close((got[0][0] + got[1][0]) / 2, want, rtol=1e-6, atol=0)
    for _, grads, raised in got.values():
        assert not [w for w in raised if "returned a view" in w]
        assert grads.keys() == want_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(torch.from_numpy(grad), want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
