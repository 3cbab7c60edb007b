"""Several ranks (data parallel, gloo on the CPU; Lightning starts the second process): two ranks at one micro-batch
equal one rank at two (losses, weights and Adam moments after clipped, accumulated AdamW steps), each rank holds about
half of the host state, and a checkpoint saved with 2 ranks resumes with 1 and one saved with 1 resumes with 2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from megatrain_lightning import MegatrainStrategy
from megatrain_lightning import hf, placement
from megatrain_lightning.checkpointing import directories as ckpt
from megatrain_lightning.errors import UserError
from megatrain_lightning.parallel.ranks import Ranks, assign
from tests import resume_run
from tests.helpers import assert_adam_state_close, kept_budget_GiB, lm_kwargs
from megatrain_lightning.config import Config

ROOT = Path(__file__).resolve().parents[1]
STEPS = resume_run.TOTAL_STEPS
# fp32 sums in another order (the mean over ranks of per-rank means; the global norm of per-rank squares): the
# relative error of each tensor after 6 AdamW steps, measured at 3e-6 (masters) and 8e-6 (moments)
TOL = 5e-5
# ram: clipped (deferred updates); eager: no clipping (each unit's update starts as its gradient lands); kept: the
# first units' state on the "device"; nvme: a RAM budget that leaves layers of each rank to files (one rank: layers 0
# and 1; two ranks, each with half of it: 0 and 2 of rank 0 (which also holds the embedding/head), 1 of rank 1);
# cached: the step cache (weights and gradient sums on the "device" for a step) beside units kept whole
NVME_BUDGET_GiB = 2.2 / 1024
MODES = {"ram": {}, "eager": dict(clip=0.0),
         "kept": dict(device_state_GiB=kept_budget_GiB(Config.from_name("tiny"), 2)),
         "nvme": dict(storage="nvme", ram_budget_GiB=NVME_BUDGET_GiB),
         "cached": dict(step_cache_GiB=1.0, device_state_GiB=kept_budget_GiB(Config.from_name("tiny"), 0)),
         "keep_activations": dict(keep_activations=2)}  # the last 2 layers' loads skipped in backward on every rank


def _two_ranks(args: dict, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "tests.resume_run", json.dumps({**args, "devices": 2,
                                                                                 "micro_batch": 1})],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert run.returncode == 0, run.stderr[-3000:]
    return run


def _one_rank(data: str, out: Path, max_steps: int, **kw) -> None:  # in this process
    resume_run.run(data, str(out), max_steps, **kw)


def _result(out: Path, ranks: int) -> tuple[list[float], dict[str, torch.Tensor], list[dict]]:
    """Losses (the mean over ranks, per micro-batch), the whole store's state, each rank's store facts (bytes in RAM,
    the file tier's window, the file-backed units)."""
    tags = [f".rank{r}" for r in range(ranks)] if ranks > 1 else [""]
    metas = [json.loads((out / f"losses{t}.json").read_text()) for t in tags]
    losses = [sum(x) / ranks for x in zip(*(m["losses"] for m in metas))]
    state: dict[str, torch.Tensor] = {}
    for t in tags:
        part = load_file(out / f"state{t}.safetensors")
        assert not state.keys() & part.keys()  # each unit on one rank
        state.update(part)
    return losses, state, metas


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert_adam_state_close(got, want, TOL, lm_kwargs(1)["lr"])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(resume_run.token_file(tmp_path_factory.mktemp("data") / "tokens.npy"))


@pytest.fixture(scope="module")
def one(data, tmp_path_factory) -> dict[str, tuple]:
    """One rank, two sequences per micro-batch, six steps, per mode."""
    out = {}
    for name, kw in MODES.items():
        d = tmp_path_factory.mktemp(f"one-{name}")
        _one_rank(data, d, STEPS, **kw)
        out[name] = _result(d, 1)
    return out


def test_units_are_dealt_by_bytes_and_consecutive_layers_alternate():
    # the resident 25 and one layer on rank 0, three layers on rank 1, spread over the depth
    assert assign([10, 10, 10, 10, 25], 2) == [1, 0, 1, 1, 0]
    assert assign([10] * 6 + [10], 2) == [0, 1, 0, 1, 0, 1, 0]
    assert assign([1, 1, 1, 1], 3) == [0, 1, 2, 0]
    assert assign([5, 5], 1) == [0, 0]


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_equal_one_at_the_same_global_batch(mode, data, one, tmp_path):
    _two_ranks(dict(data=data, out_dir=str(tmp_path), max_steps=STEPS, **MODES[mode]))
    losses, state, metas = _result(tmp_path, 2)
    want_losses, want_state, (want,) = one[mode]
    assert len(losses) == STEPS * resume_run.ACCUMULATE
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
    _assert_close(state, want_state)
    if mode == "cached":  # every rank caches the same units: all but those any rank keeps whole
        kept = set().union(*(m["kept"] for m in metas))
        units = range(Config.from_name("tiny").n_layer + 1)
        assert kept and metas[0]["cached"] == metas[1]["cached"] == [i for i in units if i not in kept]
    if mode == "keep_activations":  # every rank kept them (the same plan: the same broadcasts)
        assert [m["kept_blocks"] for m in metas] == [2, 2] and want["kept_blocks"] == 2
    if mode == "nvme":  # each rank keeps its RAM state within its half of the budget, and files the rest
        assert want["on_disk"] == [0, 1] and [m["on_disk"] for m in metas] == [[0, 2], [1]]
        assert all(m["store_bytes"] - m["window_bytes"] <= NVME_BUDGET_GiB * 2**30 / 2 for m in metas)
        return
    # the host state is held once: the two ranks' stores add up to one rank's, split about evenly
    nbytes = [m["store_bytes"] for m in metas]
    assert sum(nbytes) == want["store_bytes"] and max(nbytes) < 0.6 * want["store_bytes"]


def test_two_ranks_with_a_bf16_frozen_base_equal_one(data, tmp_path):
    """The frozen base held in bf16 alone (no master; store.Unit.frozen), every projection of every layer: two ranks
    at one sequence each train as one rank at two (bf16-mixed: the batch's shape changes the bf16 rounding, so within
    bf16 tolerance), the frozen weights stay bit for bit, and the two stores hold the state once."""
    kw = dict(precision="bf16-mixed", freeze_bf16=r"layers\.\d+\..*proj\.weight$")
    _one_rank(data, tmp_path / "one", STEPS, **kw)
    _two_ranks(dict(data=data, out_dir=str(tmp_path / "two"), max_steps=STEPS, **kw))
    want_losses, want_state, (want,) = _result(tmp_path / "one", 1)
    losses, state, metas = _result(tmp_path / "two", 2)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=2e-3, atol=0)  # seen: 2e-4
    frozen = [k for k, v in want_state.items() if v.dtype == torch.bfloat16]
    assert frozen and all(k.startswith("master/") and k.endswith("proj.weight") for k in frozen)
    assert state.keys() == want_state.keys()
    for k, v in want_state.items():
        if k in frozen:
            assert state[k].dtype == torch.bfloat16 and torch.equal(state[k], v), k
        elif not k.startswith("exp_avg_sq"):
            # Adam turns bf16 rounding of small gradients into visible steps: seen up to 3.5e-2 (a moment)
            assert (state[k].double() - v.double()).norm() <= 5e-2 * v.double().norm() + 1e-6, k
    assert sum(m["store_bytes"] for m in metas) == want["store_bytes"]


def _two_nodes(args: dict, devices: int = 1) -> None:
    """Two "nodes" of `devices` ranks each on this machine, started as Lightning's multi-node run is: the same
    command on every node with its NODE_RANK, one MASTER_ADDR / MASTER_PORT (Lightning starts a node's other
    ranks), one sequence a rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tests.resume_run", json.dumps({**args, "devices": devices, "num_nodes": 2,
                                                                 "micro_batch": 1})]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "NODE_RANK": str(node), "WORLD_SIZE": "2"})
             for node in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]


@pytest.mark.parametrize("mode", ["ram", "nvme"])
def test_two_nodes_of_one_rank_equal_one_rank(mode, data, one, tmp_path):
    _two_nodes(dict(data=data, out_dir=str(tmp_path), max_steps=STEPS, **MODES[mode]))
    losses, state, metas = _result(tmp_path, 2)
    want_losses, want_state, _ = one[mode]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
    _assert_close(state, want_state)
    if mode == "nvme":  # one rank a node: each has its node's whole budget, which holds its half of the layers
        # (two ranks on one node, half of it each, file layers 0, 2 and 1)
        assert all(m["store_bytes"] - m["window_bytes"] <= NVME_BUDGET_GiB * 2**30 for m in metas)
        assert [m["on_disk"] for m in metas] == [[], []]


def test_replicated_nodes_of_one_rank_each_hold_the_whole_state_train_like_one_rank_and_save_once(data, one,
                                                                                                     tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    _two_nodes(dict(data=data, out_dir=str(tmp_path), max_steps=STEPS, replicate_nodes=True, ckpt_dir=str(ckpt_dir),
                    save_every=3))
    want_losses, want_state, (want,) = one["ram"]
    metas = [json.loads((tmp_path / f"losses.rank{r}.json").read_text()) for r in range(2)]
    losses = [sum(x) / 2 for x in zip(*(m["losses"] for m in metas))]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
    for r in range(2):  # each node's rank holds every unit, updated alike
        assert metas[r]["store_bytes"] == want["store_bytes"]
        _assert_close(load_file(tmp_path / f"state.rank{r}.safetensors"), want_state)
    # one checkpoint (the first node's files), which one rank resumes
    _one_rank(data, tmp_path / "resumed", STEPS, resume=str(ckpt_dir / "epoch=0-step=3.ckpt"))
    losses, state, _ = _result(tmp_path / "resumed", 1)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses[3 * resume_run.ACCUMULATE:]),
                               rtol=1e-5, atol=0)
    _assert_close(state, want_state)


def test_replicated_nodes_of_two_ranks_equal_one_rank_at_the_same_global_batch(data, tmp_path):
    """2 nodes x 2 ranks, each node's ranks sharing its replica (broadcasts and reductions in the node's group,
    gradients summed across the nodes in each unit's peer group, the clipping norm over one replica)."""
    _one_rank(data, tmp_path / "one", STEPS, micro_batch=4)
    _two_nodes(dict(data=data, out_dir=str(tmp_path / "four"), max_steps=STEPS, replicate_nodes=True), devices=2)
    want_losses, want_state, (want,) = _result(tmp_path / "one", 1)
    metas = [json.loads((tmp_path / "four" / f"losses.rank{r}.json").read_text()) for r in range(4)]
    losses = [sum(x) / 4 for x in zip(*(m["losses"] for m in metas))]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
    for node in range(2):  # each node's two ranks hold its replica between them, about half each
        state = {}
        for r in (2 * node, 2 * node + 1):
            part = load_file(tmp_path / "four" / f"state.rank{r}.safetensors")
            assert not state.keys() & part.keys() and metas[r]["store_bytes"] < 0.6 * want["store_bytes"]
            state.update(part)
        _assert_close(state, want_state)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("mode", MODES)
def test_two_cuda_ranks_equal_one_cuda_rank(mode, data, tmp_path):
    """The same on 2 GPUs (NCCL: broadcasts on the copy stream, reductions on the compute stream) against 1 GPU."""
    kw = dict(MODES[mode], accelerator="gpu")
    _one_rank(data, tmp_path / "one", STEPS, **kw)
    _two_ranks(dict(data=data, out_dir=str(tmp_path / "two"), max_steps=STEPS, **kw))
    want_losses, want_state, _ = _result(tmp_path / "one", 1)
    losses, state, _ = _result(tmp_path / "two", 2)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
    _assert_close(state, want_state)


@pytest.mark.parametrize("mode", ["ram", "nvme"])
def test_two_ranks_save_and_one_resumes(mode, data, one, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    _two_ranks(dict(data=data, out_dir=str(tmp_path / "first"), max_steps=3, ckpt_dir=str(ckpt_dir), save_every=3,
                    **MODES[mode]))
    saved = json.loads((ckpt_dir / "epoch=0-step=3.ckpt" / "manifest.json").read_text())
    assert len(saved["units"]) == Config.from_name("tiny").n_layer + 1  # both ranks' units in one checkpoint
    _one_rank(data, tmp_path / "second", STEPS, resume=str(ckpt_dir), **MODES[mode])
    losses, state, _ = _result(tmp_path / "second", 1)
    want_losses, want_state, _ = one[mode]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses[3 * resume_run.ACCUMULATE:]),
                               rtol=1e-5, atol=0)
    _assert_close(state, want_state)
    if mode == "ram":  # `hf export` takes it like any checkpoint: the weights one rank had after the same steps
        _one_rank(data, tmp_path / "ref", 3, ckpt_dir=str(tmp_path / "ref-ckpt"), save_every=3)
        got, want = ({k: v for f in hf.export(d / "epoch=0-step=3.ckpt", tmp_path / f"hf-{d.name}",
                                              dtype="float32").glob("*.safetensors") for k, v in load_file(f).items()}
                     for d in (ckpt_dir, tmp_path / "ref-ckpt"))
        assert len(want) == sum(k.startswith("master/") for k in want_state)  # every trained tensor
        _assert_close(got, want)


def test_one_rank_saves_and_two_resume(data, one, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    _one_rank(data, tmp_path / "first", 3, ckpt_dir=str(ckpt_dir), save_every=3)
    _two_ranks(dict(data=data, out_dir=str(tmp_path / "second"), max_steps=STEPS, resume=str(ckpt_dir)))
    losses, state, _ = _result(tmp_path / "second", 2)
    want_losses, want_state, _ = one["ram"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses[3 * resume_run.ACCUMULATE:]),
                               rtol=1e-5, atol=0)
    _assert_close(state, want_state)


def test_a_node_budget_whose_share_cannot_hold_the_embedding_state_is_named():
    from megatrain_lightning.storage.store import Layout
    # 4 layers of 256 MiB of fp32 state, an embedding of 4 GiB (shapes only: nothing is allocated)
    layouts = [Layout([("w", (4096, 4096))]) for _ in range(4)] + [Layout([("emb", (65536, 4096))])]
    owners = assign([4 * lay.tile_numel for lay in layouts], 2)
    resident_rank = owners[-1]
    with pytest.raises(ValueError, match=r"storage.ram_budget_GiB: 6 GiB \(a rank's share: 3 GiB\) cannot hold even "
                                         r"the state that stays in RAM with every layer on disk \(4 GiB: the "
                                         r"embedding/head state\)"):
        placement.nvme_units(layouts, torch.float32, 6.0, owners, resident_rank, ranks_per_node=2)
    # the other rank holds the layers: its share keeps them in RAM
    assert placement.nvme_units(layouts, torch.float32, 6.0, owners, 1 - resident_rank, ranks_per_node=2) == []


def test_fewer_layers_than_ranks_is_refused():
    with pytest.raises(ValueError, match="the model streams 2 layers, fewer than the 4 ranks that would share them "
                                         r"\(devices x num_nodes\): use at most 2 ranks"):
        Ranks.from_sizes([10, 10, 30], world=4, rank=0)
    # replicated nodes: a node's ranks share the layers (checked before any process group is made)
    with pytest.raises(ValueError, match="the model streams 2 layers, fewer than the 4 ranks that would share them "
                                         r"\(devices\): use at most 2 ranks"):
        Ranks.from_sizes([10, 10, 30], world=8, rank=0, ranks_per_node=4, replicate_nodes=True)


def test_replicate_nodes_must_be_a_bool():
    with pytest.raises(UserError) as e:
        MegatrainStrategy(replicate_nodes="yes")
    assert str(e.value) == "replicate_nodes must be true or false, got 'yes'"


def test_one_cpu_thread_per_rank_on_a_node_with_more_cores_is_warned_of():
    from megatrain_lightning.parallel.data_parallel import thread_advice
    assert thread_advice(1, 16, "1") == (
        "each rank runs PyTorch on 1 CPU thread (OMP_NUM_THREADS=1; torchrun sets it to 1): the host's optimizer and "
        "gradient adds then use one core per rank; set OMP_NUM_THREADS=16 (this node's cores per rank)")
    assert thread_advice(16, 16, "16") is None  # Lightning's launcher: each rank its share of the cores
    assert thread_advice(1, 1, None) is None  # one core per rank is all there is


def test_a_rank_that_fails_ends_the_run_named_and_the_last_checkpoint_is_intact(data, one, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    run = _two_ranks(dict(data=data, out_dir=str(tmp_path / "first"), max_steps=STEPS, ckpt_dir=str(ckpt_dir),
                          save_every=2, fail_at_batch=6), ok=False)  # rank 1 raises in step 3
    assert run.returncode != 0
    assert "[rank1]: RuntimeError: rank 1 failed on purpose at batch 6" in run.stderr
    assert [p.name for p in ckpt.candidates(ckpt_dir)] == ["epoch=0-step=2.ckpt"]
    _one_rank(data, tmp_path / "second", STEPS, resume=str(ckpt_dir))  # resumes from it, equal to the straight run
    _, state, _ = _result(tmp_path / "second", 1)
    _assert_close(state, one["ram"][1])


def test_ranks_with_other_settings_are_named(data, tmp_path):
    run = _two_ranks(dict(data=data, out_dir=str(tmp_path), max_steps=1,
                          last_rank_kwargs=dict(prefetch_depth=3, ram_budget_GiB=4.0)), ok=False)
    assert run.returncode != 0
    assert ("the ranks differ in prefetch_depth (rank 0: 2, rank 1: 3), ram_budget_GiB (rank 0: None, rank 1: 4.0): "
            "every rank must run the same strategy settings on the same model") in run.stderr


def test_a_signal_to_one_rank_saves_on_every_rank_after_the_same_step(data, one, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    run = _two_ranks(dict(data=data, out_dir=str(tmp_path / "first"), max_steps=STEPS, ckpt_dir=str(ckpt_dir),
                          signal_at_batch=5), ok=False)  # SIGTERM to rank 1 alone, mid-step 3
    assert run.returncode == 143, run.stderr[-3000:]
    assert [p.name for p in ckpt.candidates(ckpt_dir)] == ["interrupted-step=3.ckpt"]
    _one_rank(data, tmp_path / "second", STEPS, resume=str(ckpt_dir))
    losses, state, _ = _result(tmp_path / "second", 1)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one["ram"][0][3 * resume_run.ACCUMULATE:]),
                               rtol=1e-5, atol=0)
    _assert_close(state, one["ram"][1])


def test_ranks_agree_on_the_newest_intact_checkpoint(data, one, tmp_path):
    """The newest checkpoint's data is damaged in a unit only rank 1 owns (and verifies): both ranks resume from the
    older one, and the run equals the straight one."""
    ckpt_dir = tmp_path / "ckpt"
    _two_ranks(dict(data=data, out_dir=str(tmp_path / "first"), max_steps=4, ckpt_dir=str(ckpt_dir), save_every=2))
    c = Config.from_name("tiny")
    owners = assign([c.layer_params] * c.n_layer + [c.embedding_params], 2)
    unit = ckpt_dir / "epoch=0-step=4.ckpt" / ckpt.unit_file(owners.index(1))
    raw = bytearray(unit.read_bytes())
    raw[-5] ^= 0xFF  # a bit of the last tensor's data: the header and size stay right, the hash does not
    unit.write_bytes(bytes(raw))
    run = _two_ranks(dict(data=data, out_dir=str(tmp_path / "second"), max_steps=STEPS, resume=str(ckpt_dir)))
    assert "resuming from the next older checkpoint instead" in run.stderr
    losses, state, _ = _result(tmp_path / "second", 2)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one["ram"][0][2 * resume_run.ACCUMULATE:]),
                               rtol=1e-5, atol=0)
    _assert_close(state, one["ram"][1])
