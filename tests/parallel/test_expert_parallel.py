"""Expert parallelism over gloo: equal to the single-process model, bitwise equal across world
sizes 1, 2 and 4 (forward, backward and a short deterministic training run).

Spawning processes is slow, so one launch per world size runs every check and the tests read
its results.
"""

from __future__ import annotations

import pytest
import torch

from longcat_sim.errors import UserError
from longcat_sim.model.config import get_preset
from longcat_sim.model.determinism import DeterministicMode
from longcat_sim.model.parallel import ExpertParallelModel, ExpertShard
from longcat_sim.model.transformer import LongcatFlashForCausalLM
from longcat_sim.train.config import TrainConfig, default_train_config
from longcat_sim.train.data import build_corpus_data
from longcat_sim.train.distributed import ep_train, launch
from longcat_sim.train.world import check_nproc

WORLDS = (1, 2, 4)
BATCH, SEQ = 4, 32
BYTE_BUDGET = 2**18
CFG = get_preset("tiny").replace(mtp_layers=1, deterministic=True)


def _model() -> LongcatFlashForCausalLM:
    return LongcatFlashForCausalLM(CFG, generator=torch.Generator().manual_seed(3))


def _ids() -> torch.Tensor:
    return torch.randint(
        0, CFG.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1)
    )


def _loss(out) -> torch.Tensor:
    """A loss that is a sum over rows, so per-rank gradients add up to the full batch's."""
    return (out.logits.square().sum() + out.mtp_logits.square().sum()) / (BATCH * SEQ)


def _train_config(cache: str) -> TrainConfig:
    return default_train_config(CFG).replace(
        steps=2,
        batch_size=BATCH,
        seq_len=SEQ,
        warmup_steps=1,
        byte_budget=BYTE_BUDGET,
        deterministic=True,
        eval_every=10**6,
        checkpoint_every=10**6,
    )


def _rank_checks(rank: int, world: int, cache: str) -> dict:
    """Everything one rank checks: EP forward/backward (overlap on and off) and training."""
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    out: dict = {}
    with DeterministicMode(threads=1):
        for overlap in (True, False):
            model = _model()
            ep = ExpertParallelModel(model, overlap=overlap)
            result = ep.forward_detailed(_ids()[rows])
            _loss(result).backward()
            out[overlap] = {
                "logits": result.logits.detach(),
                "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            }
    base = get_preset("tiny")
    out["train"] = ep_train(rank, world, base, _train_config(cache), cache)
    # ScMoE overlap on and off step by step (calibrate's paired timings): no bit may change
    out["train_alternating"] = ep_train(
        rank, world, base, _train_config(cache), cache, (True, False)
    )
    out["train_conventional"] = ep_train(
        rank,
        world,
        base.replace(topology="conventional"),
        _train_config(cache).replace(steps=1),
        cache,
    )
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("data-cache")
    build_corpus_data(CFG.vocab_size, SEQ, byte_budget=BYTE_BUDGET, cache_dir=folder)
    return str(folder)


@pytest.fixture(scope="module")
def runs(cache) -> dict[int, list[dict]]:
    return {world: launch(_rank_checks, world, cache) for world in WORLDS}


@pytest.fixture(scope="module")
def reference() -> dict:
    """The plain single-process model on the whole batch."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        result = model.forward_detailed(_ids())
        _loss(result).backward()
    finally:
        torch.set_num_threads(previous)
    return {
        "logits": result.logits.detach(),
        "grads": {n: p.grad for n, p in model.named_parameters()},
    }


def _summed_grads(ranks: list[dict], overlap: bool = True) -> dict[str, torch.Tensor]:
    names = ranks[0][overlap]["grads"].keys()
    return {n: sum(r[overlap]["grads"][n] for r in ranks) for n in names}


@pytest.mark.parametrize("world", WORLDS)
def test_forward_backward_match_single_process(runs, reference, world):
    ranks = runs[world]
    logits = torch.cat([r[True]["logits"] for r in ranks])
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-5, atol=1e-5)
    grads = _summed_grads(ranks)
    assert set(grads) == set(reference["grads"])
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference["grads"][name], rtol=1e-4, atol=1e-6)


def test_every_expert_gets_gradient_only_from_its_owner(runs):
    for world in (2, 4):
        for rank, result in enumerate(runs[world]):
            block = ExpertShard(rank, world, CFG.n_routed_experts).block()
            grad = result[True]["grads"]["model.layers.0.mlp.experts.gate_proj"]
            outside = torch.ones(CFG.n_routed_experts, dtype=torch.bool)
            outside[block] = False
            assert grad[outside].abs().max() == 0
            assert grad[block].abs().max() > 0


def test_forward_backward_bitwise_across_world_sizes(runs):
    base_logits = torch.cat([r[True]["logits"] for r in runs[1]])
    for world in WORLDS[1:]:
        assert torch.equal(torch.cat([r[True]["logits"] for r in runs[world]]), base_logits)


def test_overlap_changes_no_bit(runs):
    for ranks in runs.values():
        for result in ranks:
            assert torch.equal(result[True]["logits"], result[False]["logits"])
            for name, grad in result[True]["grads"].items():
                assert torch.equal(grad, result[False]["grads"][name]), name


@pytest.mark.parametrize("key", ["train", "train_conventional", "train_alternating"])
def test_training_bitwise_equal_for_world_sizes_1_2_4(runs, key):
    hashes = {world: {r[key]["state_hash"] for r in ranks} for world, ranks in runs.items()}
    assert all(len(h) == 1 for h in hashes.values()), "ranks disagree"
    assert hashes[1] == hashes[2] == hashes[4]
    param_hashes = {r[key]["param_hash"] for ranks in runs.values() for r in ranks}
    assert len(param_hashes) == 1
    assert runs[1][0][key]["losses"] == runs[4][0][key]["losses"]


def test_training_moves_the_parameters(runs):
    """Negative control for the hash comparison: a different number of steps changes it."""
    assert runs[1][0]["train"]["param_hash"] != runs[1][0]["train_conventional"]["param_hash"]


def test_sum_order_matters_for_float_gradients():
    """Why gradients are summed in global slice order: float addition is not associative, so
    a rank-grouped reduction ((g0 + g1) + (g2 + g3)) differs from the slice order."""
    gen = torch.Generator().manual_seed(0)
    g = [torch.randn(4096, generator=gen) * 10.0**k for k in range(4)]
    ordered = ((g[0] + g[1]) + g[2]) + g[3]
    grouped = (g[0] + g[1]) + (g[2] + g[3])
    assert not torch.equal(ordered, grouped)


def test_bad_world_sizes_are_refused():
    with pytest.raises(ValueError, match="cannot be split evenly"):
        ExpertShard(0, 3, 8)
    with pytest.raises(UserError, match="must divide the 8 FFN experts"):
        check_nproc(3, get_preset("tiny"), 6)
    with pytest.raises(UserError, match="must divide the batch size"):
        check_nproc(2, get_preset("tiny"), 3)


def test_train_command_refuses_a_world_size_that_does_not_divide_the_experts(tmp_path, capsys):
    from longcat_sim.cli import main

    code = main(["train", "--nproc", "3", "--batch-size", "6", "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert "--nproc 3 must divide the 8 FFN experts" in capsys.readouterr().err


def test_alternating_overlap_changes_timing_only(runs):
    for ranks in runs.values():
        for result in ranks:
            alternating = result["train_alternating"]
            assert alternating["step_overlap"] == [True, False]
            assert alternating["state_hash"] == result["train"]["state_hash"]
            assert len(alternating["slices_seconds"]) == 2
            assert all(
                0 < part <= whole
                for part, whole in zip(
                    alternating["slices_seconds"], alternating["step_seconds"], strict=True
                )
            )
            # the time in MoE exchanges is part of the micro-steps, never all of them
            assert all(
                0 < exchange < slices
                for exchange, slices in zip(
                    alternating["exchange_seconds"], alternating["slices_seconds"], strict=True
                )
            )


def _count_collectives(rank: int, world: int, cache: str) -> dict[str, int]:
    """One training step of ``ep_train`` with every collective it issues counted."""
    import torch.distributed as dist

    counts = {"all_to_all_single": 0, "all_gather": 0, "all_reduce": 0}
    for name in counts:
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    ep_train(rank, world, get_preset("tiny"), _train_config(cache).replace(steps=1), cache)
    return counts


def test_the_host_step_model_issues_the_collectives_ep_train_does(cache):
    """cluster.hoststep's task list has one link task per collective of the real step."""
    from longcat_sim.cluster.hoststep import (
        LINK,
        EpModelTerms,
        EpStep,
        HostProfile,
        WorldTerms,
        step_tasks,
    )

    measured = launch(_count_collectives, 2, cache)[0]
    cfg = get_preset("tiny")
    model = EpModelTerms(SEQ, cfg.hidden_size, cfg.num_layers, cfg.n_routed_experts, 2.0,
                         0.01, 0.0, 0.0, 0.0, 1, 1)  # fmt: skip
    terms = WorldTerms(1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    tasks = step_tasks(HostProfile({2: terms}, model), EpStep(2, BATCH, True))
    link = [t.name for t in tasks if t.stream == LINK]
    gathers = sum(name.startswith("gather") for name in link)
    reduces = sum(name.startswith("all-reduce") for name in link)
    assert measured == {
        "all_to_all_single": len(link) - gathers - reduces,
        "all_gather": gathers,
        "all_reduce": reduces,
    }


def _schedule(overlap: bool, topology: str = "shortcut") -> list[str]:
    """The order in which one layer's forward reaches its dense blocks and its MoE phases."""
    from longcat_sim.model.parallel import ExpertParallelMoE

    cfg = CFG.replace(topology=topology)
    core = LongcatFlashForCausalLM(cfg, generator=torch.Generator().manual_seed(3)).model
    layer = core.layers[0]
    events: list[str] = []
    for name, block in (("FFN_0", layer.mlps[0]), ("MLA_1", layer.self_attn[1]),
                        ("FFN_1", layer.mlps[1])):  # fmt: skip
        block.register_forward_pre_hook(lambda *_, name=name: events.append(name))
    ep = ExpertParallelMoE(layer.mlp, overlap=overlap)
    for phase in ("start", "compute", "finish"):
        original = getattr(ep, phase)

        def traced(*args, phase=phase, original=original):
            events.append(phase)
            return original(*args)

        setattr(ep, phase, traced)
    x = torch.randn(1, 8, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = core.rotary_emb(torch.arange(8))
    layer.mlp = ep
    layer(x, cos, sin)
    return events


def test_scmoe_overlap_keeps_each_exchange_in_flight_over_its_dense_blocks():
    # dispatch issued before FFN_0 and MLA_1 and waited for after them; combine over FFN_1
    assert _schedule(True) == ["start", "FFN_0", "MLA_1", "compute", "FFN_1", "finish"]
    # negative controls: without overlap each MoE call runs its phases back to back; in the
    # conventional topology the MoE starts after MLA_1 and only FFN_1 is left to overlap
    assert _schedule(False) == ["start", "compute", "finish", "FFN_0", "MLA_1", "FFN_1"]
    assert _schedule(True, "conventional") == [
        "FFN_0", "MLA_1", "start", "FFN_1", "compute", "finish"]  # fmt: skip


def _clocked_exchanges(rank: int, world: int) -> list[tuple[str, str]]:
    """(phase, call) of every exchange an EP forward and backward puts on the clock."""
    from dataclasses import dataclass, field

    from longcat_sim.model.parallel import ExchangeClock

    @dataclass
    class CountingClock(ExchangeClock):
        phase: str = "fwd"
        calls: list = field(default_factory=list)

        def run(self, fn, *args, **kwargs):
            self.calls.append((self.phase, fn.__name__))
            return super().run(fn, *args, **kwargs)

    clock = CountingClock()
    model = LongcatFlashForCausalLM(get_preset("tiny"), generator=torch.Generator().manual_seed(3))
    out = ExpertParallelModel(model, clock=clock).forward_detailed(_ids()[rank : rank + 1])
    clock.phase = "bwd"
    out.logits.square().mean().backward()
    assert clock.seconds > 0
    return clock.calls


def test_exchange_clock_times_every_exchange_forward_and_backward():
    layers = get_preset("tiny").num_layers
    # per layer: counts, dispatch issued, dispatch waited, combine issued, combine waited
    forward = [("fwd", n) for n in ("_exchange", "_exchange", "wait", "_exchange", "wait")]
    backward = [("bwd", "_exchange")] * 2  # the two reverse exchanges, synchronous
    for calls in launch(_clocked_exchanges, 2):
        assert calls == forward * layers + backward * layers
