"""Choosing the SKU profile: a `profile:` pin in forged.yaml wins; otherwise the first match.

Profiles are tried in the order `forged.layers` gives (what the operator wrote in the config dir
first, then the packaged ones). Each profile's `match:` rules are tried in order; a rule holds when
every condition it gives holds. The first profile with a rule that holds wins. When none does,
forged falls back to the `cpu` profile, says so, and runs (the embedded engine works everywhere).

`explain()` evaluates every profile and every rule, so `forged probe` (forged/ctl/probe.py) can show
the operator why each one matched or not, one clause per condition: `memory 140.401 GiB (needs >= 39.5): ok`,
`compute capability 9.0 (needs < 8.9): FAILS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from forged.config import LoadedConfig, MatchRule, Profile
from forged.hardware import HardwareInfo
from forged.schema import ConfigError, to_plain

FALLBACK = "cpu"


@dataclass(frozen=True)
class RuleResult:
    index: int
    rule: dict[str, object]  # only the conditions the rule gives
    matched: bool
    # One clause per condition: "kind gpu (needs gpu): ok", "memory 19.995 GiB (needs >= 20): FAILS".
    checks: tuple[str, ...]

    @property
    def text(self) -> str:
        return "; ".join(self.checks)


@dataclass(frozen=True)
class Candidate:
    name: str
    defined_at: tuple[str, ...]  # every file:line that defined or changed it, lowest layer first
    rules: tuple[RuleResult, ...]
    matched_rule: int | None  # index of the first rule that holds
    verdict: str  # "selected", "matches, but <earlier> comes first", "no rule matches", ...


@dataclass(frozen=True)
class Selection:
    name: str
    profile: Profile
    reason: str
    candidates: tuple[Candidate, ...] = ()
    pinned: bool = False
    fallback: bool = False


def _cc_tuple(value: str | float) -> tuple[int, int]:
    text = f"{value:.1f}" if isinstance(value, float) else str(value)
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


def _fmt_gib(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")


def check_rule(rule: MatchRule, hw: HardwareInfo) -> tuple[bool, tuple[str, ...]]:
    """Whether every condition of `rule` holds on `hw`, and one clause per condition saying what the
    machine has, what the rule needs, and `ok` or `FAILS`."""
    checks: list[str] = []
    ok = True

    def note(holds: bool, have: str, needs: str) -> None:
        nonlocal ok
        ok = ok and holds
        checks.append(f"{have} (needs {needs}): {'ok' if holds else 'FAILS'}")

    if rule.kind is not None:
        note(hw.kind == rule.kind, f"kind {hw.kind}", rule.kind)
    if rule.name is not None:
        note(re.search(rule.name, hw.name) is not None, f"name {hw.name!r}", f"/{rule.name}/")
    gib = hw.memory_total_bytes / 2**30
    if rule.memory_gib_at_least is not None:
        note(gib >= rule.memory_gib_at_least, f"memory {_fmt_gib(gib)} GiB", f">= {rule.memory_gib_at_least:g}")
    if rule.memory_gib_below is not None:
        note(gib < rule.memory_gib_below, f"memory {_fmt_gib(gib)} GiB", f"< {rule.memory_gib_below:g}")
    if rule.gpus_at_least is not None:
        note(hw.gpu_count >= rule.gpus_at_least, f"GPUs {hw.gpu_count}", f">= {rule.gpus_at_least}")
    if rule.gpus_below is not None:
        note(hw.gpu_count < rule.gpus_below, f"GPUs {hw.gpu_count}", f"< {rule.gpus_below}")
    for op, value in ((">=", rule.compute_capability_at_least), ("<", rule.compute_capability_below)):
        if value is None:
            continue
        if hw.compute_capability is None:
            note(False, "compute capability unknown", f"{op} {value:.1f}")
            continue
        have, want = _cc_tuple(hw.compute_capability), _cc_tuple(value)
        note(have >= want if op == ">=" else have < want, f"compute capability {hw.compute_capability}",
             f"{op} {value:.1f}")
    return ok, tuple(checks)


def _rule_conditions(rule: MatchRule) -> dict[str, object]:
    return {k: v for k, v in to_plain(rule).items() if v is not None}


def explain(config: LoadedConfig, hardware: HardwareInfo) -> tuple[Candidate, ...]:
    """Every profile, in the order tried, with every rule's result; the first match is 'selected'."""
    layers = getattr(config.profiles_source, "layers", {})
    out: list[Candidate] = []
    winner: str | None = None
    for name, profile in config.profiles.items():
        results = []
        first: int | None = None
        for i, rule in enumerate(profile.match):
            ok, checks = check_rule(rule, hardware)
            results.append(RuleResult(i, _rule_conditions(rule), ok, checks))
            if ok and first is None:
                first = i
        if not profile.match:
            verdict = "no match rules: only a profile: pin selects it"
        elif first is None:
            verdict = "no rule matches"
        elif winner is None:
            winner = name
            verdict = "selected"
        else:
            verdict = f"matches, but {winner} comes first"
        defined = layers.get(name) or (config.profiles_source.where(f"profiles.{name}"),)
        out.append(Candidate(name, tuple(defined), tuple(results), first, verdict))
    return tuple(out)


def select(config: LoadedConfig, hardware: HardwareInfo) -> Selection:
    candidates = explain(config, hardware)
    pinned = config.settings.profile
    if pinned != "auto":
        return Selection(pinned, config.profiles[pinned], f"pinned by profile: {pinned} in "
                         f"{config.settings_source.where('profile')}", candidates, pinned=True)
    for candidate in candidates:
        if candidate.verdict == "selected":
            assert candidate.matched_rule is not None
            rule = candidate.rules[candidate.matched_rule]
            return Selection(candidate.name, config.profiles[candidate.name],
                             f"match rule {candidate.matched_rule + 1}: {rule.text}", candidates)
    if FALLBACK in config.profiles:
        return Selection(FALLBACK, config.profiles[FALLBACK],
                         f"no profile matches this {hardware.kind} machine ({hardware.name}); using {FALLBACK}, "
                         f"the fallback. Add a profile with a match rule for it, or pin one with profile: "
                         f"in forged.yaml", candidates, fallback=True)
    raise ConfigError(f"{config.profiles_source.where('profiles')}: profiles: no profile matches this "
                      f"{hardware.kind} machine ({hardware.name}) and there is no '{FALLBACK}' profile to fall "
                      f"back to; add a match rule or pin one with profile: in forged.yaml")
