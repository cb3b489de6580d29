"""The LongCat-Flash causal language model: embeddings, ScMoE layers, final norm, LM head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from longcat_sim.model.block import LongcatDecoderLayer
from longcat_sim.model.config import ConfigError, ModelConfig
from longcat_sim.model.experts import encode_checksums
from longcat_sim.model.kernels.batch_invariant import linear_class
from longcat_sim.model.kv_cache import LatentKVCache
from longcat_sim.model.layers import RMSNorm, RotaryEmbedding
from longcat_sim.model.mtp import MultiTokenPredictor
from longcat_sim.model.router import RouterOutput

DEFAULT_INIT_SEED = 0


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, V]
    hidden_pre_norm: torch.Tensor  # [B, T, H] last layer output before the final norm
    router: list[RouterOutput]  # one per layer, tokens flattened B*T
    mtp_logits: torch.Tensor | None  # [B, T, V] predicting token t+2, when cfg.mtp_layers == 1


def require_runnable(cfg: ModelConfig) -> None:
    """Raise ConfigError naming every feature of ``cfg`` the PyTorch model does not implement."""
    reasons = []
    if cfg.layer_type != "scmoe":
        reasons.append(f"layer_type={cfg.layer_type!r} (only 'scmoe' runs)")
    if cfg.attention != "mla":
        reasons.append(f"attention={cfg.attention!r} (only 'mla' runs)")
    if cfg.n_shared_experts:
        reasons.append(f"n_shared_experts={cfg.n_shared_experts} (must be 0)")
    if cfg.first_k_dense_layers:
        reasons.append(f"first_k_dense_layers={cfg.first_k_dense_layers} (must be 0)")
    if reasons or not cfg.runnable:
        detail = "; ".join(reasons) or "ModelConfig.runnable is False"
        raise ConfigError(
            f"model {cfg.name!r} is analytic-only and cannot be instantiated: {detail}"
        )


class LongcatFlashModel(nn.Module):
    """Token embedding, the ScMoE layers, the final norm and (optionally) the MTP head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LongcatDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta)
        self.mtp = MultiTokenPredictor(cfg) if cfg.mtp_layers else None


class LongcatFlashForCausalLM(nn.Module):
    """LongCat-Flash with an LM head; ``state_dict`` keys follow the Hugging Face names.

    Parameters are drawn only from ``generator`` (a fresh one seeded with
    ``DEFAULT_INIT_SEED`` when omitted): linear, embedding and expert weights from
    ``N(0, initializer_range^2)``, norm weights set to one, buffers (the router bias) to zero.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        """``device="meta"``: the module tree and shapes only, no memory and no draws."""
        super().__init__()
        require_runnable(cfg)
        self.config = cfg
        with torch.device("meta"):
            self.model = LongcatFlashModel(cfg)
            self.lm_head = linear_class(cfg.deterministic)(
                cfg.hidden_size, cfg.vocab_size, bias=False
            )
        materialise = torch.device(device).type != "meta"
        if materialise:
            self.to_empty(device=device)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not materialise:
            return
        if generator is None:
            generator = torch.Generator().manual_seed(DEFAULT_INIT_SEED)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Redraw every parameter from ``generator`` in ``named_parameters`` order (buffers zeroed,
        expert checksums encoded from the new weights)."""
        norm_weights = {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm)}
        std = self.config.initializer_range
        for _, param in self.named_parameters():
            if id(param) in norm_weights:
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)
        for _, buf in self.named_buffers():
            buf.zero_()
        encode_checksums(self)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` for ``input_ids`` ``[B, T]``."""
        return self.forward_detailed(input_ids, compute_mtp=False).logits

    def forward_detailed(
        self,
        input_ids: torch.Tensor,
        *,
        cache: LatentKVCache | None = None,
        compute_mtp: bool = True,
    ) -> ModelOutput:
        """Logits, pre-norm hidden states, routing per layer and (without a cache) MTP logits.

        With ``cache`` the tokens continue the cached sequence (absorbed MLA) and the cache is
        advanced past them. ``mtp_logits[:, t]`` reads token t+1; the last position reads a
        placeholder token 0 and has no target.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        seq = input_ids.shape[1]
        start = 0 if cache is None else cache.length
        limit = self.config.max_position_embeddings
        if start + seq > limit:
            raise ValueError(
                f"sequence reaches position {start + seq} but max_position_embeddings is {limit}; "
                f"shorten the input or raise max_position_embeddings"
            )
        if cache is not None:
            cache.reserve(seq)
        positions = torch.arange(start, start + seq, device=input_ids.device)
        cos, sin = self.model.rotary_emb(positions)

        hidden = self.model.embed_tokens(input_ids)
        routing = []
        for layer in self.model.layers:
            hidden, layer_routing = layer(hidden, cos, sin, cache)
            routing.append(layer_routing)
        if cache is not None:
            cache.advance(seq)
        logits = self.lm_head(self.model.norm(hidden))

        mtp_logits = None
        if compute_mtp and cache is None and self.model.mtp is not None:
            next_ids = torch.cat((input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])), dim=1)
            mtp_logits = self.lm_head(self.model.mtp(next_ids, hidden, cos, sin))
        return ModelOutput(
            logits=logits, hidden_pre_norm=hidden, router=routing, mtp_logits=mtp_logits
        )

    # -- decoding ----------------------------------------------------------------------------
    def new_cache(self, batch_size: int, capacity: int) -> LatentKVCache:
        """An empty latent KV cache for this model's attention blocks."""
        weight = self.lm_head.weight
        return LatentKVCache(
            self.config, batch_size, capacity, dtype=weight.dtype, device=weight.device
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        eos_token_id: int | None = None,
    ) -> torch.Tensor:
        """Extend ``input_ids`` ``[B, T]`` by up to ``max_new_tokens`` tokens.

        Greedy (argmax) by default; ``do_sample=True`` draws from ``softmax(logits /
        temperature)`` with the given ``generator``. With ``eos_token_id`` a row that emitted it
        is padded with it, and decoding stops once every row has. Returns ``[B, T + n]``.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and generator is None:
            raise ValueError("sampling needs an explicit torch.Generator: pass generator=...")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be positive when sampling, got {temperature}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must be a non-empty [batch, seq] prompt, got {tuple(input_ids.shape)}"
            )
        batch, prompt = input_ids.shape
        tokens = [input_ids]
        if max_new_tokens == 0:
            return input_ids
        cache = self.new_cache(batch, prompt + max_new_tokens)
        logits_BV = self.forward_detailed(input_ids, cache=cache, compute_mtp=False).logits[:, -1]
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            if do_sample:
                probs = torch.softmax(logits_BV.float() / temperature, dim=-1)
                next_B = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                next_B = logits_BV.argmax(dim=-1)
            if eos_token_id is not None:
                next_B = next_B.masked_fill(finished, eos_token_id)
                finished |= next_B == eos_token_id
            tokens.append(next_B[:, None])
            if bool(finished.all()) or step + 1 == max_new_tokens:
                break
            step_out = self.forward_detailed(next_B[:, None], cache=cache, compute_mtp=False)
            logits_BV = step_out.logits[:, -1]
        return torch.cat(tokens, dim=1)
