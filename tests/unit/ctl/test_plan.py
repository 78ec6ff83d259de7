"""`forgectl plan` against hand-computed numbers, including a profile that cannot hold its sessions."""

from __future__ import annotations

import json
from pathlib import Path

from forged.cli import forgectl_main

REPO = Path(__file__).resolve().parents[3]
LLAMA_31_8B = {"model_type": "llama", "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "hidden_size": 4096, "max_position_embeddings": 131072, "_name_or_path": "Llama-3.1-8B"}


def _plan(tmp_path: Path, capsys, *extra: str) -> tuple[int, str]:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA_31_8B))
    code = forgectl_main(["plan", "--config-dir", str(REPO / "etc" / "forged"), "--model", str(cfg), *extra])
    return code, capsys.readouterr().out


def test_rtx_4000_fp8_holds_eight_20k_sessions_of_llama_8b_weights_excluded(tmp_path, capsys) -> None:
    code, out = _plan(tmp_path, capsys, "--sku", "rtx_4000_pro", "--context", "20000")
    assert code == 0
    assert "fp16        128.00 KiB        2.44 GiB" in out
    assert "fp8          64.00 KiB        1.22 GiB" in out
    assert "OK: with its fp8 KV, rtx_4000_pro holds 8 sessions" in out


def test_says_plainly_when_the_profile_cannot_hold_its_sessions(tmp_path, capsys) -> None:
    # 16 GiB of fp16 weights leave 0.9 x 4 GiB of the 20 GiB card: 20k-token fp8 sessions are 1.22 GiB each.
    code, out = _plan(tmp_path, capsys, "--sku", "rtx_4000_pro", "--weights-gib", "16", "--context", "20000")
    assert code == 0
    assert "DOES NOT FIT: with its fp8 KV, rtx_4000_pro holds only 2 sessions of 20000 tokens, not its 8" in out


def test_json_rows(tmp_path, capsys) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA_31_8B))
    assert forgectl_main(["--json", "plan", "--config-dir", str(REPO / "etc" / "forged"), "--model", str(cfg),
                          "--sku", "rtx_4000_pro", "--sessions", "4"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["bytes_per_token"] for r in doc["rows"]] == [262144, 131072, 65536]
    assert [round(r["saving_vs_fp32"], 2) for r in doc["rows"]] == [0.0, 0.5, 0.75]
    assert doc["profile_fits"] is True and doc["sessions_wanted"] == 4
