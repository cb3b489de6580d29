"""Published numbers the simulator is checked against, each with its source; the one place the
tests read them from (cluster-level tests and command-line tests alike)."""

from __future__ import annotations

from typing import NamedTuple

# -- V1: LongCat-Flash paper (arXiv 2509.01322) Table 7, theoretical decode on H800: EP128,
# batch 96 per GPU, MTP 1 draft token at 80 % acceptance, FlashMLA 660 TFLOPS, DeepEP 40 GB/s,
# $2 per GPU-hour. Microseconds per layer, TPOT in ms, $ per million output tokens.


class Table7Row(NamedTuple):
    schedule: str  # the row's overlap strategy
    attention_tp: int  # Qwen3's GQA attention runs TP4 in the paper's estimate
    attention_us: float
    dispatch_us: float
    moe_us: float  # routed experts plus DeepSeek-V3's shared expert
    combine_us: float
    tpot_ms: float
    cost_per_m_tokens: float


TABLE7 = {
    "deepseek-v3": Table7Row("tbo", 1, 471, 275, 77, 551, 30.0, 0.17),
    "qwen3-235b-a22b": Table7Row("tbo", 4, 314, 157, 29, 315, 26.2, 0.15),
    "longcat-flash": Table7Row("sbo", 1, 264, 236, 60, 472, 16.0, 0.09),
}
TABLE7_BATCH, TABLE7_EP, TABLE7_MTP_ACCEPT = 96, 128, 0.8

# -- V2: LongCat-Flash paper Table 6, measured decode on 128 Hopper GPUs (EP128).


class Table6Row(NamedTuple):
    attention_dtype: str
    context: int  # average context per request
    tgs: float  # tokens per GPU per second
    tps_per_user: float

    @property
    def batch_per_device(self) -> int:
        """Concurrent requests per GPU = TGS / TPS-per-user."""
        return round(self.tgs / self.tps_per_user)


TABLE6_LONGCAT = (
    Table6Row("bf16", 5000, 3785, 35.0),
    Table6Row("bf16", 5000, 2205, 68.9),
    Table6Row("bf16", 5000, 804, 100.5),
    Table6Row("fp8", 5000, 4230, 26.4),
    Table6Row("fp8", 8192, 3240, 33.8),
)
TABLE6_FIT_ROW = 0  # the row the default set's router-imbalance spread was fitted on
LONGCAT_MTP_ACCEPT = 0.9  # ~90 % MTP acceptance on test sets (paper sec. 6.1.2)
TABLE6_TOLERANCE = 0.15

# deepseek-ai/profile-data: decode on EP128, 128 requests per GPU, 4K context, two micro-batches
# (TBO), absolutely balanced routing, no speculative decoding named; 18,598 tokens/s per
# 8-GPU node = 2,324 per GPU.
DEEPSEEK_PROFILE_TGS = 2324
DEEPSEEK_PROFILE_BATCH, DEEPSEEK_PROFILE_CONTEXT = 128, 4096

# -- V3: LongCat-Flash paper sec. 5.3: share of training time in dispatch/combine that compute
# does not hide, with pipelined deterministic all-gather / reduce-scatter (EP 32, CP 8,
# 200 Gb/s RDMA per accelerator, MoE in 2 token chunks).
NON_OVERLAPPED_COMM_WITHOUT_SCMOE = 0.253
NON_OVERLAPPED_COMM_WITH_SCMOE = 0.084
TRAINING_SHARE_TOLERANCE = 0.03  # 3 percentage points

# -- V7: deepseek-ai/profile-data prefill: EP32, TP1, 4K-token prompts, 16K tokens per GPU in two
# micro-batches (TBO), attention balanced between them: 62,713 tokens/s per 8-GPU H800 node =
# 7,839 per GPU. Peers on this row (same inputs): InferSim 9,034 (+15 %, its README),
# aiconfigurator 0.12 on H100 tables 3,812 (-51 %; 3,859 in docs/peers.md's rerun).
DEEPSEEK_PREFILL_TGS = 7839
DEEPSEEK_PREFILL_EP, DEEPSEEK_PREFILL_PROMPT, DEEPSEEK_PREFILL_TOKENS = 32, 4096, 16384
PREFILL_TOLERANCE = 0.15
