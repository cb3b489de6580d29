"""``longcat-sim sdc`` on the training step: every site it offers runs, its JSON holds no NaN,
replay misses nothing, and bad input is one line with exit code 2."""

from __future__ import annotations

import functools
import json
import re

import pytest

from longcat_sim.cli import main
from longcat_sim.commands import sdc as sdc_command
from longcat_sim.repro.campaign import DETECTORS, CampaignConfig
from longcat_sim.repro.inject import SITES
from tests.cli_checks import refused

SMALL = ["--trials", "1", "--clean-runs", "3", "--attribution-events", "1", "--byte-budget"]
SMALL += [str(2**18)]


def pool_of(chain: int):
    """``CampaignConfig`` with a pool of 2 states ``chain`` steps apart (8 x 10 by default)."""
    return functools.partial(CampaignConfig, states=2, chain=chain)


def _no_nan(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"results JSON holds {constant}")

    return json.loads(text, parse_constant=refuse)


def sdc(argv: list[str], run_dir, capsys, data_cache) -> dict:
    code = main(["sdc", *argv, "--data-cache", data_cache, "--json", "--run-dir", str(run_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    results = _no_nan(out)
    assert _no_nan((run_dir / "results.json").read_text()) == results
    return results


def help_sites(capsys) -> list[str]:
    try:
        code = main(["sdc", "--help"])
    except SystemExit as exc:
        code = exc.code
    assert code == 0
    text = " ".join(capsys.readouterr().out.split())
    listed = re.search(r"--sites SITES comma-separated sites or 'all' \(([^)]*)\)", text)
    assert listed is not None, text
    return [s.strip() for s in listed.group(1).split(",")]


@pytest.fixture(scope="module")
def every_site(tmp_path_factory, data_cache) -> dict:
    """One campaign over every site, bits 30 and 31, with one overhead round (trials start
    from 2 states 4 steps apart: 8 steps of history for the validators)."""
    run_dir = tmp_path_factory.mktemp("sdc") / "run"
    argv = ["sdc", "--sites", ",".join(SITES), "--bits", "30-31", *SMALL]
    argv += ["--overhead-rounds", "1", "--data-cache", data_cache, "--json"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sdc_command, "CampaignConfig", pool_of(chain=4))
        code = main([*argv, "--run-dir", str(run_dir)])
    assert code == 0
    return _no_nan((run_dir / "results.json").read_text())


def test_help_lists_every_site(capsys) -> None:
    assert help_sites(capsys) == list(SITES)


@pytest.mark.parametrize("site", SITES)
def test_every_site_runs_and_replay_misses_nothing(every_site, site) -> None:
    rows = [r for r in every_site["results"] if r["site"] == site]
    assert sorted((r["bit"], r["detector"]) for r in rows) == sorted(
        (b, d) for b in (30, 31) for d in DETECTORS
    )
    for row in rows:
        assert row["detected"] + row["masked"] + row["missed"] + row["crashed"] == 1
    assert every_site["summary"]["detection_rate"]["replay"][site] in (1.0, None)
    replay = [r for r in rows if r["detector"] == "replay"]
    assert all(r["missed"] == 0 for r in replay)


def test_every_site_campaign_scores_clean_runs_attribution_and_overhead(every_site) -> None:
    assert every_site["clean_runs"] == 3 and set(every_site["false_positives"]) == set(DETECTORS)
    assert every_site["false_positives"]["replay"] == 0 and every_site["abft_checks"] > 0
    assert every_site["attribution"]["events_per_class"] == 1
    assert set(every_site["overhead"]) == {"abft_validators", "guard"}
    summary = every_site["summary"]
    abft = [
        r for r in every_site["results"]
        if r["site"] in ("expert_gemm", "combine") and r["detector"] == "abft"
    ]  # fmt: skip
    assert len(abft) == 4  # expert_gemm and combine, 2 bits each
    assert summary["abft_exponent_sign_trials"] == sum(r["detected"] + r["missed"] for r in abft)
    gemm = [
        r for r in every_site["results"]
        if r["site"] == "expert_gemm" and r["detector"] == "abft"
    ]  # fmt: skip
    detected = sum(r["detected"] for r in gemm)
    effective = detected + sum(r["missed"] for r in gemm)
    expected = detected / effective if effective else None
    assert summary["abft_expert_gemm_exponent_sign_detection"] == expected
    assert every_site["abft_failed_checks"] == 0


@pytest.fixture
def short_pool(monkeypatch) -> None:
    """Trials start from 2 states 2 steps apart (8 states 10 steps apart by default)."""
    monkeypatch.setattr(sdc_command, "CampaignConfig", pool_of(chain=2))


@pytest.mark.usefixtures("short_pool")
def test_a_sign_flip_of_a_weight_alone(tmp_path, capsys, data_cache) -> None:
    argv = ["--sites", "weight", "--bits", "31", *SMALL[:2], "--clean-runs", "1"]
    argv += ["--attribution-events", "0", "--overhead-rounds", "0", *SMALL[-2:]]
    results = sdc(argv, tmp_path / "run", capsys, data_cache)
    assert {(r["site"], r["bit"]) for r in results["results"]} == {("weight", 31)}
    assert results["summary"]["detection_rate"]["replay"] == {
        "weight": results["summary"]["detection_rate"]["replay"]["weight"]
    }
    assert results["attribution"]["accuracy"] == dict.fromkeys(
        ("transient", "persistent", "genuine")
    )
    assert results["overhead"] == {}


@pytest.mark.usefixtures("short_pool")
def test_bit_40_flips_only_the_64_bit_routing_sites(tmp_path, capsys, data_cache) -> None:
    argv = ["--bits", "40", *SMALL[:2], "--clean-runs", "1", "--attribution-events", "0"]
    argv += ["--overhead-rounds", "0", *SMALL[-2:]]
    results = sdc(argv, tmp_path / "run", capsys, data_cache)
    assert {r["site"] for r in results["results"]} == {"routing_indices", "routing_counts"}
    rates = results["summary"]["detection_rate"]["replay"]
    assert set(rates) == set(SITES)
    assert all(rates[s] is None for s in SITES if not s.startswith("routing"))
    assert rates["routing_indices"] in (1.0, None) and rates["routing_counts"] in (1.0, None)
    assert results["summary"]["abft_exponent_sign_detection"] is None


@pytest.mark.usefixtures("short_pool")
def test_optimizer_state_alone_with_the_largest_seed(tmp_path, capsys, data_cache) -> None:
    """Every pool state has AdamW moments to flip (a state before the first step has none: its
    trials were all masked and no attribution event could be drawn there), and the largest
    seed drives the sampled recompute."""
    argv = ["--sites", "optimizer_state", "--bits", "30", "--trials", "2", "--clean-runs", "1"]
    argv += ["--attribution-events", "2", "--overhead-rounds", "0", "--seed", str(2**63 - 1)]
    results = sdc([*argv, *SMALL[-2:]], tmp_path / "run", capsys, data_cache)
    (replay,) = [r for r in results["results"] if r["detector"] == "replay"]
    assert replay["masked"] == 0 and replay["detected"] + replay["crashed"] == 2
    assert results["attribution"]["accuracy"]["transient"] == 1.0


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--seq-len", "0"], "--seq-len must be positive"),
        (["--batch-size", "4096", "--seq-len", "32"], "at most 65,536 tokens"),
        (["--overhead-rounds", "-1"], "--overhead-rounds must be >= 0"),
        (["--clean-runs", "-1"], "--clean-runs must be >= 0"),
        (["--attribution-events", "-1"], "--attribution-events must be >= 0"),
        (["--seed", "-1"], "--seed must lie in"),
        (["--bits", "64"], "0..63"),
        (["--bits", "5-3"], "low to high"),
        (["--bits", ","], "selects no bit"),
        (["--sites", "weight", "--bits", "40"], "selects no bit of the chosen sites"),
        (["--sites", "weight,disk"], "unknown --sites"),
        (["--recompute-experts", "9"], "exceeds the 8 routed experts"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, fragment, capsys, tmp_path) -> None:
    assert fragment in refused(["sdc", *argv], capsys, tmp_path / "run")
