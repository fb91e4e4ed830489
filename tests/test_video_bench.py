"""bench/decode.py stays runnable (a tiny smoke run; speed itself is never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_decode_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "decode.py"), "--seconds", "2", "--heights", "72",
                          "--fps", "15", "--gop-seconds", "1", "--sample-fps", "2,4", "--no-shared", "--parallel",
                          "2", "--workdir", str(tmp_path), "--json", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    methods = [r["method"] for r in rows]
    assert methods == ["a_null", "a_same", "a_same ft1", "b_naive@2", "ours@2", "ours@4", "ours@2 x2", "ours_full"]
    assert all(r["exact"] for r in rows if r["exact"] is not None) and all(r["frames"] > 0 for r in rows)
    assert "| 72p H.264 2s (generated) |" in res.stdout
