"""The whole model: shapes, seeded init, absorbed-cache decoding, generate, ScMoE topology, MTP."""

from __future__ import annotations

import pytest
import torch

from longcat_sim.model.config import ConfigError, get_preset
from longcat_sim.model.kv_cache import LatentKVCache
from longcat_sim.model.layers import RMSNorm
from longcat_sim.model.transformer import LongcatFlashForCausalLM

TINY = get_preset("tiny")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(cfg=TINY, seed: int = 0) -> LongcatFlashForCausalLM:
    return LongcatFlashForCausalLM(cfg, generator=_gen(seed))


def _ids(cfg, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=_gen(seed))


def _spread_logits(model: LongcatFlashForCausalLM, seed: int = 5) -> None:
    """Redraw the LM head with a larger std so greedy choices are not near-ties."""
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0, generator=_gen(seed))


# -- construction ----------------------------------------------------------------------------


def test_forward_shapes_and_detailed_output() -> None:
    cfg = TINY.replace(mtp_layers=1)
    model = _model(cfg)
    ids = _ids(cfg, 2, 7)
    logits = model(ids)
    assert logits.shape == (2, 7, cfg.vocab_size) and logits.dtype == torch.float32
    out = model.forward_detailed(ids)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=0)
    assert out.hidden_pre_norm.shape == (2, 7, cfg.hidden_size)
    assert out.mtp_logits is not None and out.mtp_logits.shape == (2, 7, cfg.vocab_size)
    assert len(out.router) == cfg.num_layers
    for routing in out.router:
        assert routing.topk_idx_TK.shape == (14, cfg.moe_topk)
        assert routing.scores_TE.shape == (14, cfg.num_experts_total)
    normed = model.model.norm(out.hidden_pre_norm)
    torch.testing.assert_close(model.lm_head(normed), logits, rtol=0, atol=0)


def test_same_generator_seed_gives_bitwise_identical_parameters() -> None:
    cfg = TINY.replace(mtp_layers=1)
    global_state = torch.get_rng_state()
    a, b, c = _model(cfg, 3).state_dict(), _model(cfg, 3).state_dict(), _model(cfg, 4).state_dict()
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is never touched
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    weights = [k for k in a if k.endswith("proj.weight") or "embed" in k]
    assert all(not torch.equal(a[k], c[k]) for k in weights)


def test_initialisation_statistics() -> None:
    cfg = TINY.replace(initializer_range=0.05)
    model = _model(cfg)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
    for layer in model.model.layers:
        assert torch.count_nonzero(layer.mlp.router.e_score_correction_bias) == 0
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    drawn = torch.cat([p.detach().flatten() for p in model.parameters() if id(p) not in norms])
    assert drawn.mean().abs() < 5 * 0.05 / drawn.numel() ** 0.5  # five standard errors
    assert drawn.std().item() == pytest.approx(0.05, rel=0.02)


def test_state_dict_uses_hugging_face_names() -> None:
    cfg = TINY.replace(mtp_layers=1)
    keys = set(_model(cfg).state_dict())
    expected = {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.1.input_layernorm.0.weight",
        "model.layers.1.post_attention_layernorm.1.weight",
        "model.layers.0.self_attn.1.q_a_proj.weight",
        "model.layers.0.self_attn.1.q_a_layernorm.weight",
        "model.layers.0.self_attn.1.q_b_proj.weight",
        "model.layers.0.self_attn.0.kv_a_proj_with_mqa.weight",
        "model.layers.0.self_attn.0.kv_a_layernorm.weight",
        "model.layers.0.self_attn.0.kv_b_proj.weight",
        "model.layers.0.self_attn.0.o_proj.weight",
        "model.layers.0.mlps.1.down_proj.weight",
        "model.layers.0.mlp.router.classifier.weight",
        "model.layers.0.mlp.router.e_score_correction_bias",
        "model.mtp.embed_tokens.weight",
        "model.mtp.enorm.weight",
        "model.mtp.hnorm.weight",
        "model.mtp.eh_proj.weight",
        "model.mtp.layers.0.input_layernorm.weight",
        "model.mtp.layers.0.self_attn.kv_b_proj.weight",
        "model.mtp.layers.0.post_attention_layernorm.weight",
        "model.mtp.layers.0.mlp.gate_proj.weight",
        "model.mtp.norm.weight",
    }
    assert expected <= keys
    assert not any(k.startswith("model.mtp.") for k in _model(TINY).state_dict())


def test_tied_embeddings_share_one_tensor() -> None:
    model = _model(TINY.replace(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" in model.state_dict()
    untied = _model(TINY)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


@pytest.mark.parametrize(
    ("preset", "reason"),
    [("deepseek-v3", "layer_type='standard'"), ("qwen3-235b-a22b", "attention='gqa'")],
)
def test_non_runnable_configs_are_refused(preset: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        LongcatFlashForCausalLM(get_preset(preset))


def test_query_without_compression_runs() -> None:
    cfg = TINY.replace(q_lora_rank=0)
    model = _model(cfg)
    attn = model.model.layers[0].self_attn[0]
    assert hasattr(attn, "q_proj") and not hasattr(attn, "q_a_proj")
    assert model(_ids(cfg, 1, 4)).shape == (1, 4, cfg.vocab_size)


def test_input_validation_messages() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, TINY.max_position_embeddings + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="Generator"):
        model.generate(_ids(TINY, 1, 3), 2, do_sample=True)


# -- absorbed-cache decoding -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunks", "changes"),
    [([1] * 12, {}), ([5, 1, 1, 4, 1], {}), ([3, 1, 1], {"q_lora_rank": 0, "mtp_layers": 1})],
)
def test_cached_decoding_matches_full_forward(chunks: list[int], changes: dict) -> None:
    """float32; rtol 1e-5 and atol 1e-5 x max|logit| against the full-sequence logits."""
    cfg = TINY.replace(**changes)
    model = _model(cfg)
    _spread_logits(model)
    seq = sum(chunks)
    ids = _ids(cfg, 2, seq)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2, capacity=seq)
        parts, start = [], 0
        for n in chunks:
            parts.append(model.forward_detailed(ids[:, start : start + n], cache=cache).logits)
            start += n
    cached = torch.cat(parts, dim=1)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5 * full.abs().max().item())
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    blocks = 2 * cfg.num_layers
    assert cache.length == seq
    assert cache.data_NBSC.shape == (blocks, 2, seq, per_token)
    assert cache.stored_values() == blocks * 2 * seq * per_token


def test_cache_that_grows_gives_the_same_logits() -> None:
    model = _model()
    ids = _ids(TINY, 1, 10)
    with torch.no_grad():
        roomy, tight = model.new_cache(1, 10), LatentKVCache(TINY, 1, capacity=1)
        a = [model.forward_detailed(ids[:, t : t + 1], cache=roomy).logits for t in range(10)]
        b = [model.forward_detailed(ids[:, t : t + 1], cache=tight).logits for t in range(10)]
    torch.testing.assert_close(torch.cat(a, 1), torch.cat(b, 1), rtol=0, atol=0)
    assert tight.capacity == 16


def test_generate_greedy_equals_argmax_of_full_forwards() -> None:
    cfg = TINY
    model = _model(cfg)
    _spread_logits(model)
    prompt = _ids(cfg, 2, 4)
    out = model.generate(prompt, max_new_tokens=8)
    assert out.shape == (2, 12)
    assert torch.equal(out[:, :4], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat((seq, model(seq)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, seq)


def test_generate_pads_finished_rows_and_stops_when_all_finish() -> None:
    cfg = TINY
    model = _model(cfg)
    _spread_logits(model)
    prompt_len, new = 3, 6
    a, b = _ids(cfg, 2, prompt_len, seed=0)
    free = model.generate(torch.stack((a, b)), max_new_tokens=new)
    eos = int(free[0, prompt_len + 2])  # the third token row a generates
    assert eos not in free[1, prompt_len:].tolist()
    assert eos not in free[0, prompt_len : prompt_len + 2].tolist()

    # row a finishes and is padded with eos, row b runs to max_new_tokens
    out = model.generate(torch.stack((a, b)), max_new_tokens=new, eos_token_id=eos)
    assert out.shape == (2, prompt_len + new)
    assert torch.equal(out[0, : prompt_len + 3], free[0, : prompt_len + 3])
    assert out[0, prompt_len + 2 :].tolist() == [eos] * (new - 2)
    assert torch.equal(out[1], free[1])

    # once every row has emitted eos, decoding stops
    out = model.generate(torch.stack((a, a)), max_new_tokens=new, eos_token_id=eos)
    assert torch.equal(out, free[[0, 0], : prompt_len + 3])


def test_generate_single_row_ends_at_eos() -> None:
    model = _model()
    _spread_logits(model)
    prompt = _ids(TINY, 1, 3, seed=2)
    free = model.generate(prompt, max_new_tokens=5)
    eos = int(free[0, 4])
    out = model.generate(prompt, max_new_tokens=5, eos_token_id=eos)
    first = int((free[0, 3:] == eos).int().argmax())
    assert torch.equal(out, free[:, : 3 + first + 1])


def test_seeded_sampling_is_reproducible_and_follows_softmax() -> None:
    cfg = TINY
    model = _model(cfg)
    prompt = _ids(cfg, 2, 3)
    a = model.generate(prompt, 6, do_sample=True, temperature=0.7, generator=_gen(11))
    b = model.generate(prompt, 6, do_sample=True, temperature=0.7, generator=_gen(11))
    c = model.generate(prompt, 6, do_sample=True, temperature=0.7, generator=_gen(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with torch.no_grad():
        probs = torch.softmax(model(prompt)[:, -1] / 0.7, dim=-1)
    first = torch.multinomial(probs, 1, generator=_gen(11)).squeeze(1)
    assert torch.equal(a[:, 3], first)


# -- ScMoE topology --------------------------------------------------------------------------


def _capture(model, names: list[str]) -> tuple[dict[str, torch.Tensor], list]:
    """Forward hooks recording the output (and the MoE's input) of the named submodules."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    modules = dict(model.named_modules())
    for name in names:

        def hook(_mod, args, out, name=name):
            seen[name] = out[0] if isinstance(out, tuple) else out
            seen[name + ":in"] = args[0]

        handles.append(modules[name].register_forward_hook(hook))
    return seen, handles


LAYER0 = [
    "model.layers.0.self_attn.0",
    "model.layers.0.post_attention_layernorm.0",
    "model.layers.0.mlps.0",
    "model.layers.0.self_attn.1",
    "model.layers.0.post_attention_layernorm.1",
    "model.layers.0.mlp",
    "model.layers.0",
]


def _run_both(shortcut, conventional, ids):
    seen_s, hs = _capture(shortcut, LAYER0)
    seen_c, hc = _capture(conventional, LAYER0)
    with torch.no_grad():
        logits_s, logits_c = shortcut(ids), conventional(ids)
    for h in hs + hc:
        h.remove()
    return seen_s, seen_c, logits_s, logits_c


def test_shortcut_and_conventional_topologies() -> None:
    shortcut = _model(TINY, seed=21)
    conventional = _model(TINY.replace(topology="conventional"), seed=21)
    for key, value in shortcut.state_dict().items():
        assert torch.equal(value, conventional.state_dict()[key]), key
    ids = _ids(TINY, 2, 6)
    seen_s, seen_c, logits_s, logits_c = _run_both(shortcut, conventional, ids)

    # everything before the MoE's contribution is the same in both topologies
    for name in LAYER0[:5]:
        assert torch.equal(seen_s[name], seen_c[name]), name
    # the MoE reads RMSNorm_post0(a) with the shortcut and RMSNorm_post1(c) without
    moe_in_s = seen_s["model.layers.0.mlp:in"]
    moe_in_c = seen_c["model.layers.0.mlp:in"]
    assert torch.equal(moe_in_s, seen_s["model.layers.0.post_attention_layernorm.0"])
    assert torch.equal(moe_in_c, seen_c["model.layers.0.post_attention_layernorm.1"])
    assert not torch.equal(moe_in_s, moe_in_c)
    # so the layer outputs and the logits differ
    assert (seen_s["model.layers.0"] - seen_c["model.layers.0"]).abs().max() > 1e-6
    assert not torch.equal(logits_s, logits_c)

    # when the MoE contributes nothing (every token picks FFN experts, whose down_proj is zero)
    # the two topologies compute the same function, bit for bit
    for model in (shortcut, conventional):
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.router.e_score_correction_bias[: TINY.n_routed_experts] = 1.0
                layer.mlp.experts.down_proj.zero_()
    seen_s, seen_c, logits_s, logits_c = _run_both(shortcut, conventional, ids)
    assert bool((seen_s["model.layers.0.mlp"] == 0).all())
    assert torch.equal(seen_s["model.layers.0"], seen_c["model.layers.0"])
    assert torch.equal(logits_s, logits_c)


def test_identity_experts_alone_make_the_topologies_differ() -> None:
    """Negative control: zeroing FFN experts is not enough while identity experts carry gate*x."""
    shortcut = _model(TINY, seed=22)
    conventional = _model(TINY.replace(topology="conventional"), seed=22)
    for model in (shortcut, conventional):
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.router.e_score_correction_bias[TINY.n_routed_experts :] = 1.0
                layer.mlp.experts.down_proj.zero_()
    ids = _ids(TINY, 1, 5)
    with torch.no_grad():
        assert not torch.equal(shortcut(ids), conventional(ids))


# -- MTP -------------------------------------------------------------------------------------


def test_mtp_logits_read_the_next_token() -> None:
    cfg = TINY.replace(mtp_layers=1)
    model = _model(cfg)
    ids = _ids(cfg, 1, 8)
    t = 3
    changed = ids.clone()
    changed[0, t + 1] = (ids[0, t + 1] + 1) % cfg.vocab_size
    with torch.no_grad():
        base, moved = model.forward_detailed(ids), model.forward_detailed(changed)
    assert base.mtp_logits is not None and moved.mtp_logits is not None
    # main-model logits at t do not see token t+1, the MTP logits at t do. Earlier positions
    # can still move by rounding: the changed token regroups the expert GEMM rows.
    tol = {"rtol": 1e-5, "atol": 1e-5 * base.logits.abs().max().item()}
    torch.testing.assert_close(moved.logits[:, : t + 1], base.logits[:, : t + 1], **tol)
    torch.testing.assert_close(moved.mtp_logits[:, :t], base.mtp_logits[:, :t], **tol)
    change = (moved.mtp_logits[0, t] - base.mtp_logits[0, t]).abs().max().item()
    assert change > 100 * tol["atol"]


def test_mtp_is_absent_unless_configured() -> None:
    model = _model(TINY)
    assert model.model.mtp is None
    assert model.forward_detailed(_ids(TINY, 1, 4)).mtp_logits is None


# -- training --------------------------------------------------------------------------------


def test_training_step_reaches_every_dense_parameter() -> None:
    cfg = TINY.replace(mtp_layers=1)
    model = _model(cfg)
    ids = _ids(cfg, 2, 16)
    out = model.forward_detailed(ids)
    assert out.mtp_logits is not None
    vocab = cfg.vocab_size
    loss = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1)
    ) + torch.nn.functional.cross_entropy(
        out.mtp_logits[:, :-2].reshape(-1, vocab), ids[:, 2:].reshape(-1)
    )
    loss.backward()
    for name, param in model.named_parameters():
        if ".experts." in name:
            continue  # an expert that received no token has no gradient signal
        assert param.grad is not None and param.grad.abs().sum() > 0, name
