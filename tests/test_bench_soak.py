"""`conserve bench soak` for two minutes, the engine core killed every 40 s: nothing lost,
nothing left in the engine, every failure answered with an OpenAI error object, requests
answered again after a kill."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import session_profile


def test_two_minute_soak_with_engine_kills(tmp_path):
    server_args = f"--latency-profile {session_profile()} --kv-cache-gb 1 --host-kv-gb 0.25"
    cmd = [sys.executable, "-m", "conserve.cli", "bench", "soak", "--minutes", "2"]
    cmd += ["--kill-every-s", "40", "--output", str(tmp_path), "--server-args", server_args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (result_file,) = tmp_path.glob("soak-*.json")
    res = json.loads(result_file.read_text())["result"]
    assert all(res["checks"].values()), res["checks"]
    # the engine was killed at least once and came back (how many kills fit in two minutes
    # depends on how fast this machine restarts it); requests after a kill were answered
    assert len(res["kills"]) >= 1 and len(res["phases"]) == len(res["kills"]) + 1
    assert res["checks"]["a request answered once the traffic stopped"]
    assert sum(p["online"]["ok"] + p["offline"]["ok"] for p in res["phases"][1:]) > 0
    # the traffic really had every part: early leavers, malformed bodies, batches
    assert sum(p["online"]["left"] for p in res["phases"]) > 0
    assert sum(p["malformed"]["error"] for p in res["phases"]) > 0
    b = res["batches"]
    assert b["submitted"] >= 1 and b["lines"] > 0 and b["lost"] == b["duplicated"] == 0
    assert res["kv"]["integrity_error"] is None and res["kv"]["running"] == 0
