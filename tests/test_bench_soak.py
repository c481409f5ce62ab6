"""`conserve bench soak` for two minutes, the engine core killed twice: nothing lost, nothing
left in the engine, every failure answered with an OpenAI error object."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import session_profile


def test_two_minute_soak_with_engine_kills(tmp_path):
    server_args = f"--latency-profile {session_profile()} --kv-cache-gb 1 --host-kv-gb 0.25"
    cmd = [sys.executable, "-m", "conserve.cli", "bench", "soak", "--minutes", "2"]
    cmd += ["--kill-every-s", "45", "--output", str(tmp_path), "--server-args", server_args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (result_file,) = tmp_path.glob("soak-*.json")
    res = json.loads(result_file.read_text())["result"]
    assert all(res["checks"].values()), res["checks"]
    assert len(res["kills"]) == 2 and len(res["phases"]) == 3
    # the server answered requests again after each kill: the supervisor restarted the engine
    for phase in res["phases"]:
        assert phase["online"]["ok"] + phase["offline"]["ok"] > 0, phase
    # the traffic really had every part: early leavers, malformed bodies, batches
    assert sum(p["online"]["left"] for p in res["phases"]) > 0
    assert sum(p["malformed"]["error"] for p in res["phases"]) > 0
    b = res["batches"]
    assert b["submitted"] >= 1 and b["lines"] > 0 and b["lost"] == b["duplicated"] == 0
    assert res["kv"]["integrity_error"] is None and res["kv"]["running"] == 0
