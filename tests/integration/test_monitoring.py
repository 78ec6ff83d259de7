"""monitoring/: the Prometheus rules pass promtool, and the rules and the Grafana dashboard use only
metrics that a live forged really exports.

promtool comes from `./scripts/bootstrap.sh --test` (build/tools/usr/bin, put on PATH by `make test`).
Without it these tests fail, never skip: an unchecked rule file is exactly what the seed shipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import REPO, Daemon
from prometheus_client.parser import text_string_to_metric_families

PROM_DIR = REPO / "monitoring" / "prometheus"
RULES = PROM_DIR / "forged-alerts.yml"
RULE_TESTS = PROM_DIR / "forged-alerts.test.yml"
DASHBOARD = REPO / "monitoring" / "grafana" / "forged-dashboard.json"
DOC = REPO / "docs" / "monitoring.md"

ALERTS = {"ForgedTTFTP99AboveTarget", "ForgedGPUMemoryHigh", "ForgedSessionsNearLimit", "ForgedQueueNearLimit",
          "ForgedFleetAtCapacity"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# PromQL words that are not metric names: functions and aggregations (always followed by "("),
# operators and literals.
PROMQL_FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bottomk", "ceil", "changes", "clamp",
    "clamp_max", "clamp_min", "count", "count_over_time", "count_values", "delta", "deriv", "exp", "floor",
    "group", "histogram_quantile", "holt_winters", "idelta", "increase", "irate", "label_join",
    "label_replace", "last_over_time", "ln", "log2", "log10", "max", "max_over_time", "min",
    "min_over_time", "predict_linear", "quantile", "quantile_over_time", "rate", "resets", "round", "scalar",
    "sgn", "sort", "sort_desc", "sqrt", "stddev", "stddev_over_time", "stdvar", "sum", "sum_over_time",
    "time", "timestamp", "topk", "vector",
}
PROMQL_KEYWORDS = {"bool", "and", "or", "unless", "offset", "inf", "nan", "atan2"}
# Labels that Prometheus adds at scrape time, so a daemon's /metrics never carries them.
TARGET_LABELS = {"instance", "job"}
# Profile keys (sku_profiles.yaml) as the texts name them: tensorrt_llm.kv_cache_dtype, thresholds.max_queue_depth.
LEVER = re.compile(r"\b(tensorrt_llm|inference|thresholds|targets|admission|llama_cpp)\.([a-z0-9_]+)\b")


# ---------------------------------------------------------------- helpers

def promtool() -> str:
    """promtool on PATH, else the copy bootstrap unpacks; a missing promtool is a failure."""
    found = shutil.which("promtool")
    local = REPO / "build" / "tools" / "usr" / "bin" / "promtool"
    if found:
        return found
    if os.access(local, os.X_OK):
        return str(local)
    pytest.fail("promtool not found on PATH nor in build/tools/usr/bin: run `./scripts/bootstrap.sh --test` "
                "(it unpacks Debian's prometheus package there) and run the tests with `make test`")


def run_promtool(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def recording_rules() -> dict[str, str]:
    return {rule["record"]: rule["expr"] for rule in load_rules() if "record" in rule}


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} target {target['refId']}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            # label_values(metric, label) is Grafana's, not PromQL: check it as the PromQL it stands for.
            query = re.sub(r"^label_values\((.+),\s*(\w+)\)$", r"group by (\2) (\1)", query)
            out.append((f"variable {var['name']}", query))
    return out


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def metric_names(expr: str) -> set[str]:
    """Metric names (and recording-rule names) an expression selects. Fails on unknown functions."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                 # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)                              # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)                             # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)                            # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", s):
        word = match.group(0)
        if s[match.end():].lstrip().startswith("("):
            assert word in PROMQL_FUNCTIONS, f"unknown PromQL function {word!r} in {expr!r}"
        elif word.lower() not in PROMQL_KEYWORDS:
            names.add(word)
    return names


def selectors(expr: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(metric, {label: literal value}) for every `metric{label="value", ...}` with literal equality matchers."""
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", expr):
        literal = {name: value for name, op, value in re.findall(r'(\w+)\s*(=~|!=|!~|=)\s*"([^"]*)"', match.group(2))
                   if op == "=" and "$" not in value}
        yield match.group(1), literal


def grouping_labels(expr: str) -> set[str]:
    return {label.strip() for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
            for label in group.split(",") if label.strip()}


def quantile_arguments(expr: str) -> Iterator[str]:
    """The text inside every histogram_quantile(...) call."""
    for match in re.finditer(r"histogram_quantile\s*\(", expr):
        depth, start = 1, match.end()
        for i in range(start, len(expr)):
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            if depth == 0:
                yield expr[start:i]
                break


class Exported:
    """What a live daemon's /metrics holds: sample names, their label sets, and metric family names."""

    def __init__(self, text: str) -> None:
        self.samples: dict[str, list[dict[str, str]]] = {}
        self.families: set[str] = set()
        for family in text_string_to_metric_families(text):
            self.families.add(family.name)
            for sample in family.samples:
                self.samples.setdefault(sample.name, []).append(dict(sample.labels))

    def knows(self, name: str) -> bool:
        return name in self.samples or name in self.families


def check_expression(where: str, expr: str, live: Exported, rules: dict[str, str]) -> list[str]:
    problems = []
    for name in sorted(metric_names(expr)):
        if name in rules:
            problems += check_expression(f"{where} via recording rule {name}", rules[name], live, rules)
        elif name not in live.samples:
            problems.append(f"{where}: {name} is not exported by forged (expr {expr!r})")
    for name, literal in selectors(expr):
        if name not in live.samples:
            continue
        for label, value in literal.items():
            if label not in TARGET_LABELS and not any(s.get(label) == value for s in live.samples[name]):
                problems.append(f"{where}: no {name} series has {label}={value!r}")
    used = {n for n in metric_names(expr) if n in live.samples}
    have = {label for n in used for s in live.samples[n] for label in s} | TARGET_LABELS | {"le"}
    problems += [f"{where}: groups by {label!r}, which none of {sorted(used)} carries"
                 for label in sorted(grouping_labels(expr) - have) if used]
    for argument in quantile_arguments(expr):
        problems += [f"{where}: histogram_quantile over {n}, not a _bucket series"
                     for n in metric_names(argument) if n not in rules and not n.endswith("_bucket")]
    return problems


def profile_keys() -> set[str]:
    from forged.config import Profile
    keys = set()
    for section, section_type in typing.get_type_hints(Profile).items():
        if dataclasses.is_dataclass(section_type):
            keys |= {f"{section}.{f.name}" for f in dataclasses.fields(section_type)}
    return keys


# ---------------------------------------------------------------- the rules, with promtool

def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", "--lint=all", "--lint-fatal", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS) + len(recording_rules())} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = run_promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_shape() -> None:
    alerts = {rule["alert"]: rule for rule in load_rules() if "alert" in rule}
    assert set(alerts) == ALERTS
    assert "forged:ttft_seconds:p99_5m" in recording_rules()
    for name, rule in alerts.items():
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name}: needs a for: duration"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert set(rule["annotations"]) >= {"summary", "description"}, name
        levers = LEVER.findall(rule["annotations"]["description"])
        assert levers, f"{name}: the description names no lever"
    # The thresholds are gauges matched per target, not constants the profile could drift from.
    assert "on(instance, job)" in alerts["ForgedTTFTP99AboveTarget"]["expr"]
    assert "/ 1000" in alerts["ForgedTTFTP99AboveTarget"]["expr"], "forge_target_ttft_p99_ms is in ms"
    assert "forge_max_queue_depth > 0" in alerts["ForgedQueueNearLimit"]["expr"]


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    suite = yaml.safe_load(RULE_TESTS.read_text())
    fires, quiet, exprs = set(), set(), []
    for case in suite["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
        exprs += [check["expr"] for check in case.get("promql_expr_test", [])]
    assert fires == ALERTS, f"no firing case for {ALERTS - fires}"
    assert quiet == ALERTS, f"no quiet case for {ALERTS - quiet}"
    for record in recording_rules():
        assert any(record in expr for expr in exprs), f"no promql_expr_test for {record}"


def test_levers_named_are_profile_keys() -> None:
    """Every `section.key` the rules, the dashboard and the doc tell an operator to change exists."""
    keys = profile_keys()
    texts = {RULES.name: RULES.read_text(), DASHBOARD.name: DASHBOARD.read_text(), DOC.name: DOC.read_text()}
    unknown = {f"{where}: {section}.{key}" for where, text in texts.items()
               for section, key in LEVER.findall(text) if f"{section}.{key}" not in keys}
    assert not unknown, sorted(unknown)


# ---------------------------------------------------------------- the dashboard, statically

def test_dashboard_provisionable() -> None:
    dashboard = load_dashboard()
    assert dashboard["id"] is None
    assert dashboard["uid"] == "forged-overview"
    assert dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert {k: variables["datasource"][k] for k in ("name", "type", "query")} == \
        {"name": "datasource", "type": "datasource", "query": "prometheus"}
    # File provisioning resolves no __inputs (grafana/grafana#10786): every datasource is the variable.
    assert "__inputs" not in dashboard and "${DS_" not in DASHBOARD.read_text()
    refs = [value for key, value in walk(dashboard) if key == "datasource"]
    assert refs and all(ref == DATASOURCE for ref in refs), [r for r in refs if r != DATASOURCE]
    assert not [value for key, value in walk(dashboard) if key == "uid" and value not in
                ("forged-overview", "${datasource}")], "a hard-coded uid"

    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"] == DATASOURCE and panel["targets"], panel["title"]
        refids = [target["refId"] for target in panel["targets"]]
        assert len(refids) == len(set(refids)), panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_dashboard_panels_cover_the_issue() -> None:
    """TTFT P50/P99 against target, TPS, sessions and queue against max, KV, memory, rejections, preemptions."""
    wanted = {
        "TTFT": {"forge_ttft_seconds_bucket", "forge_target_ttft_p99_ms"},
        "tokens/s": {"forge_tokens_per_second_bucket"},
        "Sessions": {"forge_active_sessions", "forge_max_sessions"},
        "Queue": {"forge_queue_depth", "forge_max_queue_depth"},
        "KV": {"forge_kv_cache_blocks"},
        "memory": {"forge_gpu_memory_used_bytes", "forge_gpu_memory_total_bytes"},
        "Rejections": {"forge_rejections_total"},
        "Preemptions": {"forge_preemptions_total"},
    }
    panels = load_dashboard()["panels"]
    for word, metrics in wanted.items():
        matching = [p for p in panels if word in p["title"]]
        assert matching, f"no panel titled with {word!r}"
        used = set().union(*(metric_names(t["expr"]) for p in matching for t in p["targets"]))
        assert metrics <= used, f"{word}: {sorted(metrics - used)} missing"
    ttft = next(p for p in panels if "TTFT" in p["title"])
    assert {"0.5", "0.99"} <= {m for t in ttft["targets"] for m in re.findall(r"histogram_quantile\(([\d.]+)",
                                                                                 t["expr"])}
    rejections = next(p for p in panels if "Rejections" in p["title"])
    assert all("reason" in grouping_labels(t["expr"]) for t in rejections["targets"])


def test_dashboard_promql_is_valid(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, loaded as a recording rule by promtool."""
    fill = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}
    rules = []
    for i, (_, expr) in enumerate(dashboard_queries(load_dashboard())):
        for var, value in fill.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unfilled Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:query:{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_metric_name_parser() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, instance) (rate(forge_ttft_seconds_bucket{instance=~"$instance",'
            ' le!="1e3"}[$__rate_interval]))) > on(instance, job) (forge_target_ttft_p99_ms / 1e3) or vector(0)')
    assert metric_names(expr) == {"forge_ttft_seconds_bucket", "forge_target_ttft_p99_ms"}
    assert metric_names("forged:ttft_seconds:p99_5m offset 5m") == {"forged:ttft_seconds:p99_5m"}
    assert grouping_labels(expr) == {"le", "instance"}
    assert next(iter(quantile_arguments(expr))).startswith("0.99, sum by")
    assert dict(selectors('forge_kv_cache_blocks{instance=~"$instance", state="used"}')) == \
        {"forge_kv_cache_blocks": {"state": "used"}}
    with pytest.raises(AssertionError, match="unknown PromQL function"):
        metric_names("histogram_quantil(0.5, forge_ttft_seconds_bucket)")


# ---------------------------------------------------------------- against a live daemon

@pytest.fixture(scope="module")
def live(shared_daemon: Daemon) -> Exported:
    r = httpx.post(f"{shared_daemon.url}/v1/completions", json={"prompt": "Hello there", "max_tokens": 4},
                   timeout=120)
    assert r.status_code == 200, r.text
    text = httpx.get(f"{shared_daemon.url}/metrics", timeout=10).text
    exported = Exported(text)
    assert "forge_ttft_seconds_bucket" in exported.samples, "no TTFT buckets after a completion"
    return exported


def test_dashboard_metrics_are_exported(live: Exported) -> None:
    dashboard = load_dashboard()
    rules = recording_rules()
    problems = [p for where, expr in dashboard_queries(dashboard) for p in check_expression(where, expr, live, rules)]
    assert not problems, "\n".join(problems)
    # Metric names in panel descriptions are documentation and must not lie either.
    described = {name for panel in dashboard["panels"] for name in re.findall(r"\bforge_\w+", panel["description"])}
    assert not [name for name in described if not live.knows(name)]


def test_alert_rule_metrics_are_exported(live: Exported) -> None:
    rules = recording_rules()
    problems = []
    for rule in load_rules():
        where = rule.get("alert") or rule["record"]
        problems += check_expression(where, rule["expr"], live, rules)
        # Annotations name metrics too (and the TTFT summary queries forge_target_ttft_p99_ms).
        for text in rule.get("annotations", {}).values():
            problems += [f"{where}: annotation names {name}, not exported"
                         for name in re.findall(r"\bforge_\w+", text) if not live.knows(name)]
    assert not problems, "\n".join(problems)


def test_doc_metrics_are_exported(live: Exported) -> None:
    rules = recording_rules()
    unknown = {name for name in re.findall(r"\bforge_\w+", DOC.read_text()) if not live.knows(name)}
    unknown |= {name for name in re.findall(r"\bforged:[\w:]+", DOC.read_text()) if name not in rules}
    assert not unknown, sorted(unknown)
