"""The training loop: bias-controller convergence, bitwise resume, growth, checkpoints, hashing."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_sim.errors import UserError
from longcat_sim.model.checkpoint import load_pretrained
from longcat_sim.model.config import get_preset
from longcat_sim.model.growth import grow_state_dict, source_name
from longcat_sim.model.hashing import hash_named_tensors, parameter_hash, tensor_hash
from longcat_sim.model.optim import build_adamw
from longcat_sim.train import checkpoint as ckpt
from longcat_sim.train import config as train_config
from longcat_sim.train.config import TrainConfig
from longcat_sim.train.data import build_corpus_data
from longcat_sim.train.losses import slice_loss
from longcat_sim.train.metrics import TrainSummary
from longcat_sim.train.training import Trainer

TINY = get_preset("tiny")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Training on one thread, as the command line does by default."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """The tiny preset's default corpus (full byte budget), tokenizer cached in a temp folder."""
    tc = train_config.default_train_config(TINY)
    cache = tmp_path_factory.mktemp("data-cache")
    return build_corpus_data(
        TINY.vocab_size, tc.seq_len, byte_budget=tc.byte_budget, cache_dir=cache
    )


def quiet(tc: TrainConfig, **changes) -> TrainConfig:
    """``tc`` without periodic evaluation or checkpoints (the final ones still happen), the
    batch in one slice (one forward and backward per step, for speed)."""
    settings = dict(eval_every=10**6, checkpoint_every=10**6, slice_size=tc.batch_size)
    return tc.replace(**{**settings, **changes})


def relative_errors(summary: TrainSummary) -> list[float]:
    target = summary.target_ffn_experts
    return [abs(avg - target) / target for avg in summary.avg_ffn_experts_per_token]


# -- bias controller: convergence and its negative control -------------------------------------

# K_e = 1.5 of K = 3: the routing at initialisation gives about K·N/(N+Z) = 2 FFN experts per
# token, so the controller has to move every layer a quarter of the way to reach the target.
TARGET = 1.5


@pytest.fixture(scope="module")
def controlled_run(tiny_data, tmp_path_factory):
    cfg = TINY.replace(target_ffn_experts=TARGET)
    tc = quiet(train_config.default_train_config(TINY))
    assert tc.steps == 300 and tc.bias_rate > 0
    trainer = Trainer(cfg, tc, tmp_path_factory.mktemp("controlled"), data=tiny_data)
    return trainer, trainer.train()


def test_tiny_defaults_reach_the_ffn_expert_target_in_every_layer(controlled_run) -> None:
    _, summary = controlled_run
    assert summary.step == 300 and summary.stats_window == 50
    assert max(relative_errors(summary)) < 0.05, summary.avg_ffn_experts_per_token
    # the allocation still differs between tokens: dynamic computation, not a fixed budget
    assert min(summary.ffn_experts_std_per_token) > 0.2
    assert math.isfinite(summary.val_loss) and summary.val_loss < summary.val_unigram_entropy
    assert summary.val_unigram_cross_entropy > summary.val_unigram_entropy  # Gibbs' inequality


def test_without_the_controller_the_average_drifts_from_the_target(tiny_data, tmp_path) -> None:
    cfg = TINY.replace(target_ffn_experts=TARGET)
    tc = quiet(train_config.default_train_config(TINY), bias_rate=0.0, steps=100)
    summary = Trainer(cfg, tc, tmp_path, data=tiny_data).train()
    assert max(relative_errors(summary)) > 0.15, summary.avg_ffn_experts_per_token
    for router in Trainer(cfg, tc, tmp_path / "fresh", data=tiny_data).routers:
        assert not router.e_score_correction_bias.any()


def test_metrics_have_one_record_per_step_with_every_term(controlled_run) -> None:
    trainer, summary = controlled_run
    records = trainer.read_metrics()
    assert [r["step"] for r in records] == list(range(300))
    layers = TINY.num_layers
    for r in records:
        assert len(r["ffn_experts_mean"]) == len(r["ffn_experts_std"]) == layers
        assert len(r["bias_ffn_mean"]) == layers and r["tokens"] == 8 * 64
        assert r["tokens_per_s"] > 0 and r["lr"] > 0
        expected = r["lm_loss"] + r["balance_loss"] + r["z_loss"]
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
    assert records[-1]["val_loss"] == summary.val_loss
    window = records[-50:]
    for layer, avg in enumerate(summary.avg_ffn_experts_per_token):
        assert avg == pytest.approx(np.mean([r["ffn_experts_mean"][layer] for r in window]))
    # the LR follows warmup then cosine decay to min_lr_ratio
    tc = trainer.tc
    assert records[0]["lr"] == pytest.approx(tc.lr / tc.warmup_steps)
    assert records[tc.warmup_steps]["lr"] == pytest.approx(tc.lr)
    assert records[-1]["lr"] == pytest.approx(tc.lr * tc.min_lr_ratio, rel=0.01)


def test_the_loss_is_the_sum_of_its_terms(tiny_data, tmp_path) -> None:
    cfg = TINY.replace(mtp_layers=1)
    tc = train_config.default_train_config(TINY).replace(balance_alpha=0.01, z_loss=1e-3)
    trainer = Trainer(cfg, tc, tmp_path, data=tiny_data)
    inputs, targets = (torch.from_numpy(a) for a in tiny_data.dataset.batch_at(0, 2, 0))
    out = trainer.model.forward_detailed(inputs)
    total, term_tensors = slice_loss(out, targets, trainer.model_cfg, tc)
    terms = {name: value.item() for name, value in term_tensors.items()}
    logits = out.logits.reshape(-1, cfg.vocab_size)
    lm = -torch.log_softmax(logits, -1).gather(1, targets.reshape(-1, 1)).mean()
    mtp_logits = out.mtp_logits[:, :-1].reshape(-1, cfg.vocab_size)
    mtp = -torch.log_softmax(mtp_logits, -1).gather(1, targets[:, 1:].reshape(-1, 1)).mean()
    assert terms["lm_loss"] == pytest.approx(lm.item(), rel=1e-5)
    assert terms["mtp_loss"] == pytest.approx(mtp.item(), rel=1e-5)
    expected = lm + 0.3 * mtp + terms["balance_loss"] + terms["z_loss"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["balance_loss"] > 0 and terms["z_loss"] > 0


# -- resume ------------------------------------------------------------------------------------


def short_run(**changes) -> TrainConfig:
    tc = train_config.default_train_config(TINY)
    settings = dict(steps=8, warmup_steps=2, eval_every=4, checkpoint_every=100)
    return tc.replace(**{**settings, **changes})


def optimizer_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return {
        f"{names[id(p)]}/{k}": v
        for p, state in trainer.optimizer.state.items()
        for k, v in state.items()
    }


def without_timing(records: list[dict]) -> list[dict]:
    drop = {"step_seconds", "tokens_per_s", "slices_seconds", "exchange_seconds"}
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def test_resume_gives_bitwise_identical_parameters(tiny_data, tmp_path) -> None:
    tc = short_run()
    whole = Trainer(TINY, tc, tmp_path / "whole", data=tiny_data)
    whole_summary = whole.train()

    first = Trainer(TINY, tc, tmp_path / "split", data=tiny_data)
    half = first.train(stop_after=4)
    assert half.step == 4 and half.param_hash != whole_summary.param_hash
    second = Trainer(TINY, tc, tmp_path / "split", data=tiny_data)
    second.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "split"))
    assert second.step == 4
    resumed = second.train()

    assert resumed.param_hash == whole_summary.param_hash
    assert parameter_hash(second.model, include_buffers=True) == parameter_hash(
        whole.model, include_buffers=True
    )
    assert hash_named_tensors(optimizer_tensors(second)) == hash_named_tensors(
        optimizer_tensors(whole)
    )
    assert without_timing(second.read_metrics()) == without_timing(whole.read_metrics())
    assert resumed.val_loss == whole_summary.val_loss

    # control: a checkpoint without the optimizer state does not resume the same run
    partial = Trainer(TINY, tc, tmp_path / "partial", data=tiny_data)
    partial.model.load_state_dict(first.model.state_dict())
    partial.step = 4
    assert partial.train().param_hash != whole_summary.param_hash


def test_resume_refuses_changed_settings_but_allows_a_longer_schedule(tiny_data, tmp_path) -> None:
    tc = short_run()
    Trainer(TINY, tc, tmp_path, data=tiny_data).train(stop_after=2)
    checkpoint = ckpt.latest_checkpoint(tmp_path)
    with pytest.raises(UserError, match="lr"):
        Trainer(TINY, tc.replace(lr=1e-4), tmp_path, data=tiny_data).load_checkpoint(checkpoint)
    with pytest.raises(UserError, match="model config"):
        other = TINY.replace(target_ffn_experts=1.5)
        Trainer(other, tc, tmp_path, data=tiny_data).load_checkpoint(checkpoint)
    longer = Trainer(TINY, tc.replace(steps=10), tmp_path, data=tiny_data)
    longer.load_checkpoint(checkpoint)
    assert longer.step == 2


def test_checkpoints_are_complete_or_invisible(tiny_data, tmp_path) -> None:
    tc = short_run(checkpoint_every=2, keep_checkpoints=2)
    trainer = Trainer(TINY, tc, tmp_path, data=tiny_data)
    trainer.train(stop_after=6)
    steps = [int(p.name.removeprefix("step-")) for p in ckpt.checkpoint_dirs(tmp_path)]
    assert steps == [4, 6]  # step 2 was pruned; only complete checkpoints are listed
    latest = ckpt.latest_checkpoint(tmp_path)
    marker = json.loads((latest / ckpt.MARKER_NAME).read_text())
    assert marker == {
        "step": 6,
        "param_hash": parameter_hash(trainer.model),
        "files": ckpt.file_digests(latest),
    }
    assert parameter_hash(load_pretrained(latest)) == marker["param_hash"]
    # a checkpoint folder whose marker was never written (a crash mid-save) is ignored
    torn = tmp_path / ckpt.CHECKPOINTS_DIR / "step-00000008"
    shutil.copytree(latest, torn)
    (torn / ckpt.MARKER_NAME).unlink()
    assert ckpt.latest_checkpoint(tmp_path) == latest
    state = ckpt.read_checkpoint_state(latest)
    assert state["step"] == 6 and state["train_config"] == tc and state["model_config"] == TINY
    assert state["data"]["next_step"] == 6 and state["rng"] is None


def test_an_interrupted_run_leaves_no_metrics_past_its_checkpoint(tiny_data, tmp_path) -> None:
    tc = short_run()
    trainer = Trainer(TINY, tc, tmp_path, data=tiny_data)
    trainer.train(stop_after=3)
    with trainer.metrics_path.open("a") as handle:  # records of steps lost in a crash
        handle.write(json.dumps({"step": 3}) + "\n" + json.dumps({"step": 4}) + "\n")
    resumed = Trainer(TINY, tc, tmp_path, data=tiny_data)
    resumed.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    resumed.train()
    assert [r["step"] for r in resumed.read_metrics()] == list(range(8))


# -- model growth ------------------------------------------------------------------------------


def test_training_continues_from_a_grown_checkpoint(tiny_data, tmp_path) -> None:
    half_cfg = TINY.replace(num_layers=1)
    Trainer(half_cfg, short_run(steps=4), tmp_path / "half", data=tiny_data).train()
    half_checkpoint = ckpt.latest_checkpoint(tmp_path / "half")
    half = load_pretrained(half_checkpoint)

    grown = Trainer(TINY, short_run(steps=8), tmp_path / "grown", data=tiny_data)
    grown.grow_from(tmp_path / "half")
    assert grown.step == 4 and grown.grown_from == str(half_checkpoint)
    stacked = grow_state_dict(half.state_dict(), small_layers=1, factor=2)
    state = grown.model.state_dict()
    assert sorted(state) == sorted(stacked)
    assert all(torch.equal(state[k], stacked[k]) for k in stacked)
    assert torch.equal(
        state["model.layers.1.mlp.router.e_score_correction_bias"],
        half.state_dict()["model.layers.0.mlp.router.e_score_correction_bias"],
    )
    half_optimizer = build_adamw(half, 1.0)
    half_optimizer.load_state_dict(ckpt.read_checkpoint_state(half_checkpoint)["optimizer"])
    half_params = dict(half.named_parameters())
    for name, param in grown.model.named_parameters():
        want = half_optimizer.state[half_params[source_name(name, 1)]]
        assert torch.equal(grown.optimizer.state[param]["exp_avg_sq"], want["exp_avg_sq"])

    summary = grown.train()
    records = grown.read_metrics()
    assert [r["step"] for r in records] == [4, 5, 6, 7]
    assert all(math.isfinite(r["loss"]) for r in records) and math.isfinite(summary.val_loss)
    assert summary.grown_from == str(half_checkpoint)
    assert not torch.equal(  # the two copies of the layer now train apart
        grown.model.model.layers[0].mlp.experts.down_proj,
        grown.model.model.layers[1].mlp.experts.down_proj,
    )


def test_growth_needs_a_whole_multiple_of_the_depth(tiny_data, tmp_path) -> None:
    Trainer(TINY, short_run(steps=2), tmp_path / "two", data=tiny_data).train()
    three = TINY.replace(num_layers=3)
    with pytest.raises(UserError, match="whole multiple"):
        Trainer(three, short_run(), tmp_path / "three", data=tiny_data).grow_from(tmp_path / "two")
    wider = TINY.replace(num_layers=4, ffn_hidden_size=64)
    with pytest.raises(UserError, match="ffn_hidden_size"):
        Trainer(wider, short_run(), tmp_path / "four", data=tiny_data).grow_from(tmp_path / "two")


# -- settings ----------------------------------------------------------------------------------


def test_overrides_are_typed_and_routed_to_model_or_train() -> None:
    train, model = train_config.parse_overrides(
        ["balance_alpha=0", "model.num_layers=1", "steps=5"]
    )
    assert train == {"balance_alpha": 0.0, "steps": 5} and model == {"num_layers": 1}
    assert isinstance(train["balance_alpha"], float)
    for bad, message in [
        ("nope=1", "unknown train setting"),
        ("model.nope=1", "unknown model field"),
        ("steps=many", "needs a int"),
        ("steps", "KEY=VALUE"),
    ]:
        with pytest.raises(UserError, match=message):
            train_config.parse_overrides([bad])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 0}, "steps"),
        ({"warmup_steps": 500}, "warmup_steps"),
        ({"lr": 0.0}, "lr"),
        ({"bias_rate": -1.0}, "bias_rate"),
        ({"beta2": 1.5}, "beta2"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"bias_rate_kind": "linear"}, "constant, cosine or exponential"),
    ],
)
def test_bad_train_settings_are_one_line_errors(changes, message) -> None:
    with pytest.raises(UserError, match=message) as info:
        TrainConfig(**changes).rate_schedule()
    assert "\n" not in str(info.value)


def test_target_ffn_experts_range() -> None:
    assert train_config.with_target_ffn_experts(TINY, 2.5, 0.0).target_ffn_experts == 2.5
    assert train_config.with_target_ffn_experts(TINY, 3, 0.0).target_ffn_experts == 3.0
    for bad, alpha in [(0.0, 0.0), (3.0, 1e-3), (3.5, 0.0), (-1.0, 0.0), (math.nan, 0.0)]:
        with pytest.raises(UserError, match=r"out of range .* must lie in"):
            train_config.with_target_ffn_experts(TINY, bad, alpha)


def test_seed_streams_are_distinct_and_stable() -> None:
    seeds = train_config.derive_seeds(0)
    assert seeds == train_config.derive_seeds(0) and set(seeds) == {"init", "data"}
    assert seeds["init"] != seeds["data"] and seeds != train_config.derive_seeds(1)
    assert all(0 <= s < 2**63 for s in seeds.values())


def test_the_model_is_drawn_from_the_seed_only(tiny_data, tmp_path) -> None:
    tc = short_run()
    global_state = torch.random.get_rng_state()
    a = Trainer(TINY, tc, tmp_path / "a", data=tiny_data)
    torch.manual_seed(1234)  # global RNG must not matter
    b = Trainer(TINY, tc, tmp_path / "b", data=tiny_data)
    c = Trainer(TINY, tc.replace(seed=1), tmp_path / "c", data=tiny_data)
    torch.random.set_rng_state(global_state)
    assert parameter_hash(a.model) == parameter_hash(b.model) != parameter_hash(c.model)


def test_trainer_rejects_inconsistent_inputs(tiny_data, tmp_path) -> None:
    with pytest.raises(UserError, match="balance_groups"):
        Trainer(TINY, short_run(balance_groups=3), tmp_path, data=tiny_data)
    with pytest.raises(UserError, match="seq_len"):
        Trainer(TINY, short_run(seq_len=32), tmp_path, data=tiny_data)
    with pytest.raises(UserError, match="vocab_size"):
        Trainer(TINY.replace(vocab_size=600), short_run(), tmp_path, data=tiny_data)
    with pytest.raises(UserError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path)


# -- parameter hashing ---------------------------------------------------------------------------

floats = st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=16)


@settings(max_examples=40)
@given(values=floats, index=st.integers(min_value=0), bit=st.integers(0, 31))
def test_hash_changes_with_any_single_bit(values, index, bit) -> None:
    tensor = torch.tensor(values, dtype=torch.float32)
    flipped = tensor.clone()
    flipped.view(torch.int32)[index % len(values)] ^= 1 << bit if bit < 31 else -(2**31)
    assert tensor_hash(tensor) == tensor_hash(tensor.clone())
    assert tensor_hash(tensor) != tensor_hash(flipped)


def test_hash_covers_name_dtype_shape_and_ignores_insertion_order() -> None:
    x = torch.arange(6, dtype=torch.float32)
    assert tensor_hash(x) != tensor_hash(x.reshape(2, 3))
    assert tensor_hash(x) != tensor_hash(x.view(torch.int32))  # same bytes, other dtype
    assert tensor_hash(x, "a") != tensor_hash(x, "b")
    assert tensor_hash(torch.tensor([0.0])) != tensor_hash(torch.tensor([-0.0]))
    assert tensor_hash(x.reshape(2, 3).T) == tensor_hash(x.reshape(2, 3).T.contiguous())
    a, b = torch.ones(2), torch.zeros(3)
    assert hash_named_tensors({"a": a, "b": b}) == hash_named_tensors([("b", b), ("a", a)])
    assert hash_named_tensors({"a": a, "b": b}) != hash_named_tensors({"a": b, "b": a})
    with pytest.raises(ValueError, match="unique"):
        hash_named_tensors([("a", a), ("a", b)])


def test_parameter_hash_sees_every_parameter_and_optionally_buffers() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    before = parameter_hash(model)
    with_buffers = parameter_hash(model, include_buffers=True)
    with torch.no_grad():
        model[1].running_mean += 1
    assert parameter_hash(model) == before
    assert parameter_hash(model, include_buffers=True) != with_buffers
    for param in model.parameters():
        with torch.no_grad():
            param.view(-1)[0] = param.view(-1)[0] + 1
        assert parameter_hash(model) != before
        before = parameter_hash(model)
