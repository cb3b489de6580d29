"""Named assumption sets: how close real kernels and links get to the hardware's peak.

Every term that turns a peak figure into an achieved one is named here, so a prediction can be
traced to the assumption behind it.

- ``table7``: the LongCat-Flash paper's theoretical decode (arXiv 2509.01322, Table 7):
  attention at FlashMLA's 660 TFLOPS on H800, MoE at the 1979 TFLOPS FP8 dense peak, DeepEP at
  a pure 40 GB/s with no latency, no kernel overheads, perfectly balanced routing.
- ``default``: a realistic decode on Hopper-class hardware. Achieved fractions below 1, a few
  microseconds per kernel, an EP dispatch/combine model whose latency and bandwidth were fitted
  to DeepSeek's published DeepEP low-latency timings (deepseek-ai/DeepEP README, H800, EP
  8-256), a router that is not perfectly balanced within a step (its one spread parameter
  fitted on one measured LongCat-Flash row; a model without a measured spread is balanced
  unless one is stated, ``router_spread``) and requests of varying context; the other terms
  were set before any end-to-end comparison.
- ``train``: ``default`` for LongCat-Flash training (BF16 weights and activations), with one
  fitted term: the achieved link fraction of its dispatch/combine collectives, fitted on the
  paper's non-overlapped communication share without ScMoE.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Literal

from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.hardware import Precision
from longcat_sim.config.fields import Check, choice, name, number, optional, pick, validate

Routing = Literal["balanced", "multinomial"]

# Decode context (tokens per request) assumed for the Table 7 attention row, which the paper
# prices without stating a context length. 5000 is the average context of the paper's own
# Table 6 measurements at the same deployment (EP128, H800); see tests/cluster/test_costmodel.py
# for how close each model's attention row gets under it.
TABLE7_CONTEXT = 5000

MEASURED_MTP_ACCEPT = 0.9  # LongCat-Flash MTP acceptance on test sets (paper sec. 6.1.2)
TABLE7_MTP_ACCEPT = 0.8  # Table 7's own assumption (paper sec. 6.3.2)


@dataclass(frozen=True)
class Assumptions:
    """Efficiency terms of the cost model. Fractions are of the hardware's peak figure."""

    name: str
    # compute: achieved fraction of the dense peak at the op's precision
    gemm_flop_fraction: float
    expert_flop_fraction: float
    attention_flop_fraction: float  # attention core (FlashMLA-class kernel), of the BF16 peak
    # memory: achieved fraction of HBM bandwidth
    hbm_fraction: float
    attention_hbm_fraction: float
    weight_traffic: bool  # weight reads count as HBM traffic
    activation_traffic: bool  # activation reads/writes count as HBM traffic
    # fixed cost of every compute kernel (launch, prologue/epilogue, tail, inter-kernel gap)
    kernel_overhead_s: float
    # expert-parallel dispatch / combine: achieved link fractions and a fixed per-call cost
    # (kernel launch, cross-rank signalling, waiting for the last peer)
    ep_nvlink_fraction: float
    ep_rdma_fraction: float
    ep_call_latency_s: float
    ep_link_latency: bool  # add the hardware's one-way link latency to each call
    ep_locality: bool  # copies bound for this GPU stay put; same-node copies use NVLink
    # tensor- and context-parallel collectives (ring): achieved fraction of the link
    tp_link_fraction: float
    # training dispatch/combine run as large all-gather / reduce-scatter collectives over the
    # EP group: achieved fraction of the link
    ep_collective_fraction: float
    # per decode step outside the layers (scheduling, sampling, host work not hidden)
    step_overhead_s: float
    routing: Routing
    # per layer and step, FFN-expert popularity ~ lognormal(0, sigma): the imbalance a router
    # leaves within one step (0: a perfectly balanced router; multinomial noise remains; None:
    # the model's own stated value, ``router_spread``)
    expert_popularity_sigma: float | None
    # coefficient of variation of request context lengths (gamma distributed); the GPU whose
    # requests hold the most cache sets the pace of every collective after attention
    context_cv: float
    # deployment precisions
    linear_precision: Precision  # dense projections and FFNs
    expert_precision: Precision
    fp8_attention_math: bool  # FP8 KV cache also computes in FP8 (else dequantised to BF16)
    # price the work of a decode step outside the layers (LM head, MTP draft); a theoretical
    # estimate such as Table 7 counts the layers only
    step_work: bool = True
    # share of MTP draft tokens the main model accepts (decode); LongCat-Flash measures about
    # 90 % on its test sets (arXiv 2509.01322 sec. 6.1.2), Table 7 assumes 80 % (sec. 6.3.2)
    mtp_accept: float = MEASURED_MTP_ACCEPT
    # -- prefill (``simulate --mode prefill``): achieved fractions of the dense peak on
    # prefill-shaped kernels (thousands of rows), from published kernel benchmarks
    prefill_gemm_flop_fraction: float = 1.0
    prefill_expert_flop_fraction: float = 1.0
    prefill_attention_flop_fraction: float = 1.0
    # EP dispatch/combine with throughput ("normal") kernels: achieved link fractions; tokens
    # cross RDMA once per destination node and fan out over NVLink there
    ep_normal_nvlink_fraction: float = 1.0
    ep_normal_rdma_fraction: float = 1.0
    # share of the GPU's SMs the normal kernels hold while compute overlaps them (TBO, SBO)
    comm_sm_share: float = 0.0
    # -- memory: a fixed reserve per GPU (CUDA context, communication buffers, CUDA graphs) and
    # a share of HBM the allocator loses to fragmentation
    hbm_runtime_gb: float = 0.0
    hbm_fragmentation: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        validate(self, lambda n: f"assumption {n!r}", ClusterInputError, _CHECKS)

    def replace(self, **changes: Any) -> Assumptions:
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ClusterInputError(
                f"unknown assumption {sorted(unknown)[0]!r}; valid: "
                + ", ".join(f.name for f in fields(self))
            )
        return dataclasses.replace(self, **changes)


_FRACTIONS = (
    "gemm_flop_fraction",
    "expert_flop_fraction",
    "attention_flop_fraction",
    "hbm_fraction",
    "attention_hbm_fraction",
    "ep_nvlink_fraction",
    "ep_rdma_fraction",
    "tp_link_fraction",
    "ep_collective_fraction",
)
_OF_PEAK = Check(
    "is a fraction of peak and must lie in (0, 1]", number(0.0, 1.0, open_low=True).test
)
_FRACTIONS += (
    "prefill_gemm_flop_fraction",
    "prefill_expert_flop_fraction",
    "prefill_attention_flop_fraction",
    "ep_normal_nvlink_fraction",
    "ep_normal_rdma_fraction",
)
_SHARES = ("comm_sm_share", "hbm_fragmentation")
# Stated upper limits (``--assume`` help): a spread or coefficient of variation above 10, or a
# fixed cost above a second per kernel, call or step, describes no hardware and overflows the
# sampled draws or the step time.
MAX_SPREAD = 10.0
MAX_OVERHEAD_S = 1.0
_CHOICES = {
    "routing": choice("balanced", "multinomial"),
    "expert_popularity_sigma": optional(number(0.0, MAX_SPREAD)),
    "context_cv": number(0.0, MAX_SPREAD),
    "kernel_overhead_s": number(0.0, MAX_OVERHEAD_S),
    "ep_call_latency_s": number(0.0, MAX_OVERHEAD_S),
    "step_overhead_s": number(0.0, MAX_OVERHEAD_S),
    "linear_precision": choice("bf16", "fp8"),
    "expert_precision": choice("bf16", "fp8"),
    "mtp_accept": number(0.0, 1.0),
}
_BOOL = Check("must be true or false", lambda v: isinstance(v, bool))


def _check(f: dataclasses.Field) -> Check:
    if f.name in _FRACTIONS:
        return _OF_PEAK
    if f.name in _CHOICES:
        return _CHOICES[f.name]
    if f.name in _SHARES:
        return number(0.0, 0.99)
    return {"float": number(0.0), "bool": _BOOL, "str": name()}.get(str(f.type), name())


_CHECKS = {f.name: _check(f) for f in fields(Assumptions) if f.name != "description"}

# H800 figures the Table 7 assumptions are stated against (arXiv 2509.01322 sec. 6.2).
_H800_BF16_TFLOPS = 989.0
_H800_RDMA_GB_S = 50.0
_FLASHMLA_TFLOPS = 660.0
_DEEPEP_GB_S = 40.0

TABLE7 = Assumptions(
    name="table7",
    gemm_flop_fraction=1.0,
    expert_flop_fraction=1.0,
    attention_flop_fraction=_FLASHMLA_TFLOPS / _H800_BF16_TFLOPS,
    hbm_fraction=1.0,
    attention_hbm_fraction=1.0,
    weight_traffic=False,
    activation_traffic=False,
    kernel_overhead_s=0.0,
    ep_nvlink_fraction=_DEEPEP_GB_S / _H800_RDMA_GB_S,
    ep_rdma_fraction=_DEEPEP_GB_S / _H800_RDMA_GB_S,
    ep_call_latency_s=0.0,
    ep_link_latency=False,
    ep_locality=False,
    tp_link_fraction=1.0,
    ep_collective_fraction=1.0,
    step_overhead_s=0.0,
    routing="balanced",
    expert_popularity_sigma=0.0,
    context_cv=0.0,
    linear_precision="fp8",
    expert_precision="fp8",
    fp8_attention_math=False,
    step_work=False,
    mtp_accept=TABLE7_MTP_ACCEPT,
    description=(
        "LongCat-Flash Table 7 theoretical decode: FlashMLA 660 TFLOPS, MoE at 1979 TFLOPS "
        "FP8 dense, DeepEP 40 GB/s pure bandwidth (every expert copy crosses the network), no "
        "latency or overheads, balanced routing; GEMMs priced by FLOPs alone, the KV-cache "
        "read the only HBM traffic (it bounds attention from below); the layers only, no LM "
        "head or MTP draft; MTP acceptance 80 %"
    ),
)

# Fitted to the DeepEP low-latency table (H800, 128 tokens, hidden 7168, top-8): see
# tests/cluster/test_costmodel.py::test_deepep_low_latency_fit for the fit and its residuals.
DEEPEP_NVLINK_FRACTION = 0.78  # 156 of 200 GB/s per direction (validation V6: ~160 achievable)
DEEPEP_RDMA_FRACTION = 0.90  # 45 of 50 GB/s (400 Gb/s NIC)
DEEPEP_CALL_LATENCY_S = 33e-6  # launch + signalling + last-peer wait per dispatch/combine

# Router imbalance within one step, fitted on one measured row (LongCat-Flash Table 6, bf16,
# context 5000, 3785 tokens/GPU/s at 35 TPS/user); every other term below was set beforehand.
# It implies a max/mean rank load of about 1.7 at EP128 (512 experts, 216 tokens per GPU).
FITTED_EXPERT_POPULARITY_SIGMA = 0.63

# Prefill kernels (H800, thousands of rows per GEMM): DeepGEMM FP8 dense GEMMs on DeepSeek-V3's
# projection shapes at 8192 rows reach 0.53-0.74 of the FP8 peak, its contiguous grouped GEMM
# at 8 local experts 0.63-0.67, FlashAttention-3 MLA prefill at 4K tokens 0.63 of the BF16 peak
# (kernel benchmarks published in alibaba/InferSim bench_data/, H800).
PREFILL_GEMM_FLOP_FRACTION = 0.60
PREFILL_EXPERT_FLOP_FRACTION = 0.62
PREFILL_ATTENTION_FLOP_FRACTION = 0.60
# DeepEP normal kernels (deepseek-ai/DeepEP README, H800, 4096 tokens, hidden 7168, top-8):
# intranode 153-158 GB/s of NVLink's 200 per direction, internode 43-58 GB/s RDMA bottleneck
# bandwidth on 50 GB/s NICs; they run on 24 of the H800's 132 SMs, which overlapped compute
# loses (the SM split DeepSeek-V3's prefill uses).
EP_NORMAL_NVLINK_FRACTION = 0.77
EP_NORMAL_RDMA_FRACTION = 0.90
DEEPEP_NORMAL_SM_SHARE = 24 / 132
# Memory reserve per GPU: CUDA context (~0.5 GB), DeepEP/NCCL buffers (~2 GB), CUDA graphs
# (~0.5 GB); the caching allocator's fragmentation as a share of HBM.
HBM_RUNTIME_GB = 3.0
HBM_FRAGMENTATION = 0.03

FITTED_SPREAD_SOURCE = "fitted on LongCat-Flash Table 6 row 1"
BALANCED_SPREAD_SOURCE = (
    "balanced popularity (multinomial noise only): no measured spread for this model; "
    "state one with --assume expert_popularity_sigma=S"
)


def router_spread(model_name: str) -> tuple[float, str]:
    """(expert-popularity sigma, where it comes from) for a model whose set leaves it unset."""
    if model_name == "longcat-flash":
        return FITTED_EXPERT_POPULARITY_SIGMA, FITTED_SPREAD_SOURCE
    return 0.0, BALANCED_SPREAD_SOURCE


def with_router_spread(a: Assumptions, model_name: str) -> tuple[Assumptions, str]:
    """``a`` with its expert-popularity sigma resolved for ``model_name`` (a stated one
    wins), and the sigma's source."""
    if a.expert_popularity_sigma is not None:
        return a, f"stated by assumption set {a.name!r}"
    sigma, source = router_spread(model_name)
    return a.replace(expert_popularity_sigma=sigma), source


DEFAULT = Assumptions(
    name="default",
    # DeepGEMM-class FP8 GEMMs; grouped expert GEMMs lose more to ragged group sizes
    gemm_flop_fraction=0.70,
    expert_flop_fraction=0.60,
    # FlashMLA peaks at 660 TFLOPS (0.67 of BF16 peak) and ~3000 GB/s (0.9) on H800
    attention_flop_fraction=0.60,
    attention_hbm_fraction=0.80,
    # decode-shape FP8 GEMMs on H800 stream weights at ~1.7-2.7 TB/s of 3.35 (DeepGEMM README)
    hbm_fraction=0.70,
    weight_traffic=True,
    activation_traffic=True,
    kernel_overhead_s=5e-6,
    ep_nvlink_fraction=DEEPEP_NVLINK_FRACTION,
    ep_rdma_fraction=DEEPEP_RDMA_FRACTION,
    ep_call_latency_s=DEEPEP_CALL_LATENCY_S,
    ep_link_latency=True,
    ep_locality=True,
    tp_link_fraction=0.75,
    ep_collective_fraction=0.75,
    # scheduler, sampling and draft verification not hidden behind the GPU
    step_overhead_s=1e-3,
    routing="multinomial",
    # the model's own measured spread (``router_spread``): fitted for LongCat-Flash only
    expert_popularity_sigma=None,
    # request contexts spread like an exponential distribution (coefficient of variation 1)
    context_cv=1.0,
    linear_precision="fp8",
    expert_precision="fp8",
    fp8_attention_math=False,
    prefill_gemm_flop_fraction=PREFILL_GEMM_FLOP_FRACTION,
    prefill_expert_flop_fraction=PREFILL_EXPERT_FLOP_FRACTION,
    prefill_attention_flop_fraction=PREFILL_ATTENTION_FLOP_FRACTION,
    ep_normal_nvlink_fraction=EP_NORMAL_NVLINK_FRACTION,
    ep_normal_rdma_fraction=EP_NORMAL_RDMA_FRACTION,
    comm_sm_share=DEEPEP_NORMAL_SM_SHARE,
    hbm_runtime_gb=HBM_RUNTIME_GB,
    hbm_fragmentation=HBM_FRAGMENTATION,
    description=(
        "realistic Hopper decode: 70 % of peak on dense GEMMs, 60 % on grouped expert GEMMs and "
        "on the attention core, 70 % of HBM bandwidth (80 % for the attention core), 5 us per "
        "kernel, 1 ms per step outside the layers, DeepEP-like dispatch/combine fitted on the "
        "DeepEP low-latency table, a router whose per-step expert popularity is lognormal "
        "with the model's own spread (LongCat-Flash: sigma 0.63, fitted on one Table 6 row; "
        "other models: balanced unless stated), request contexts with coefficient of "
        "variation 1; pass routing='balanced', context_cv=0 for synthetic balanced runs"
    ),
)

# Achieved fraction of NVLink and RDMA line rate of LongCat-Flash's training dispatch/combine
# (pipelined, deterministic all-gather / reduce-scatter of ~25 MB shards over EP 32), fitted on
# one published number: the 25.3 % non-overlapped communication share without ScMoE (arXiv
# 2509.01322 sec. 5.3) on the setup of tests/cluster/test_training_overlap.py, "without ScMoE"
# being the ``baseline`` training schedule (the MoE in series after the first attention, no
# overlap with dense compute); the 8.4 % with ScMoE is then a prediction. Large-message
# collectives reach a higher fraction than decode's small tensor-parallel ones
# (``tp_link_fraction`` 0.75 in ``default``, which ``train`` keeps for its context-parallel
# all-gathers).
FITTED_TRAIN_LINK_FRACTION = 0.88

TRAIN = DEFAULT.replace(
    name="train",
    ep_collective_fraction=FITTED_TRAIN_LINK_FRACTION,
    linear_precision="bf16",
    expert_precision="bf16",
    description=(
        "LongCat-Flash training: the default compute and memory terms with BF16 weights and "
        "activations, and dispatch/combine as pipelined all-gather / reduce-scatter reaching "
        "88 % of NVLink and RDMA line rate (fitted on the paper's 25.3 % non-overlapped "
        "communication share without ScMoE, the MoE in series)"
    ),
)

_NAMED: dict[str, Assumptions] = {a.name: a for a in (TABLE7, DEFAULT, TRAIN)}


def assumption_names() -> list[str]:
    return sorted(_NAMED)


def get_assumptions(name: str) -> Assumptions:
    return pick(_NAMED, name, "assumption set", ClusterInputError)
