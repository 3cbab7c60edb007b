"""Streaming engine: device memory bound, the module is never materialized, traces."""

import json

import pytest
import torch

from megatrain_lightning import schedule as S
from tests.helpers import make_batches, make_model, megatrain_run

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")


@pytest.mark.parametrize("k,depth", [(1, 1), (1, 2), (2, 2), (3, 1), (3, 3)])
def test_device_holds_at_most_depth_plus_k_layers(k, depth):
    model = make_model("tiny", n_layer=6)
    _, _, _, strategy = megatrain_run(model, make_batches(model.config, 2), 1, 2, 1.0,
                                      checkpoint_interval=k, prefetch_depth=depth)
    engine = strategy.engine
    layer_bytes = strategy.store.units[0].stream.nbytes
    assert engine.peak_resident_layers <= depth + k
    assert engine.slot_bytes <= (depth + k) * layer_bytes
    # the pool is really used: backward needs a whole block resident
    assert engine.peak_resident_layers >= k
    # the LightningModule never holds the blocks' weights: they live in the store
    trunk = strategy.lightning_module.model.model.layers
    assert all(p.is_meta for p in trunk.parameters())


def test_plan_orders():
    plan = S.Plan(5, 2)
    assert plan.blocks == [(0, 2), (2, 4), (4, 5)]
    assert plan.backward_loads() == [4, 2, 3, 0, 1]
    with pytest.raises(ValueError, match="checkpoint_interval"):
        S.Plan(4, 0)


def _trace(tmp_path, device):
    model = make_model("tiny")
    megatrain_run(model, make_batches(model.config, 3), 3, 1, 1.0, device=device,
                  trace_dir=str(tmp_path), trace_step=1)
    return json.loads((tmp_path / "step1.json").read_text())


def test_trace_records_every_layer_on_every_lane(tmp_path):
    trace = _trace(tmp_path, "cpu")
    events = trace["events"]
    n = trace["meta"]["n_layers"]
    # one micro-batch per step: gradients land in fp32 directly (no host accumulate); the host updates every
    # layer and the resident unit in two parts (embedding, then final norm + head)
    for lane, kind in [(S.COMPUTE, S.FORWARD), (S.COMPUTE, S.RECOMPUTE), (S.COMPUTE, S.BACKWARD),
                       (S.H2D, S.LOAD), (S.D2H, S.GRAD), (S.CPU, S.OPTIMIZER)]:
        layers = sorted(e["layer"] for e in events if e["lane"] == lane and e["kind"] == kind)
        expected = {S.LOAD: sorted(list(range(n)) * 2), S.GRAD: list(range(n + 1)),
                    S.OPTIMIZER: [*range(n), n, n]}.get(kind, list(range(n)))
        assert layers == expected, (lane, kind)
    assert not any(e["kind"] == S.ACCUMULATE for e in events)
    assert all(0 <= e["start"] <= e["end"] <= trace["step_time_s"] for e in events)


@CUDA
def test_cuda_weight_loads_overlap_compute(tmp_path):
    """The stream structure: layer i+1's weights copy in while layer i computes."""
    events = _trace(tmp_path, "cuda")["events"]
    fwd = {e["layer"]: e for e in events if e["kind"] == S.FORWARD}
    loads = [e for e in events if e["kind"] == S.LOAD]
    overlapped = 0
    for i in range(len(fwd) - 1):
        nxt = min((e for e in loads if e["layer"] == i + 1), key=lambda e: e["start"])
        overlapped += nxt["start"] < fwd[i]["end"]
    assert overlapped == len(fwd) - 1


def test_block_inputs_stay_on_the_device_when_ram_has_no_room(monkeypatch, caplog):
    """offload_checkpoints=None (the CUDA default): block inputs go to pinned host memory only while the RAM the OS
    still has leaves a margin beside them; otherwise the pass keeps them on the device and says so once."""
    from megatrain_lightning.engine import block_inputs as E
    from megatrain_lightning.engine.lanes import Lanes

    host = E.HostCheckpoints(Lanes(torch.device("cpu")), S.Plan(8, 1), auto=True)
    x = torch.zeros(4, 1024, 64)  # 8 block inputs of 1 MiB
    monkeypatch.setattr(E, "available_ram_bytes", lambda: host.RAM_MARGIN + 4 * 2**20)
    with caplog.at_level("WARNING"):
        assert not host.begin(x) and not host.begin(x)
    assert not host.active and host._host is None
    assert sum("stay on the device" in r.message for r in caplog.records) == 1
    monkeypatch.setattr(E, "available_ram_bytes", lambda: host.RAM_MARGIN + 16 * 2**20)
    monkeypatch.setattr(E, "pinned_empty", lambda n, dtype, pin: torch.empty(n, dtype=dtype))  # no CUDA here
    assert host.begin(x) and host.active and host._host.numel() == 8 * x.numel()


def test_locking_a_whole_tile_unlocks_its_gradient_first(monkeypatch):
    """stream=copy page-locks only a unit's gradient; kept units need the whole tile for their write-through. The
    gradient and v may share a page, which CUDA registers only once: the gradient's lock goes first."""
    import weakref

    from megatrain_lightning.storage import store as st

    calls = []

    def fake_register(t):  # no CUDA here: record what would be (un)registered
        calls.append(("register", t.data_ptr(), t.nbytes))
        return weakref.finalize(t.untyped_storage(), lambda p=t.data_ptr(): calls.append(("unregister", p)))

    monkeypatch.setattr(st, "_register", fake_register)
    layout = st.Layout([("w", torch.Size([3, 5]))])
    unit = st.Unit(layout, copy=torch.empty(15, dtype=torch.bfloat16), pin=True)
    assert calls == [("register", unit.grad.data_ptr(), unit.grad.nbytes)]
    unit.lock_tile()
    unit.lock_tile()  # once is enough
    assert calls[1:] == [("unregister", unit.grad.data_ptr()), ("register", unit.tile.data_ptr(), unit.tile.nbytes)]
