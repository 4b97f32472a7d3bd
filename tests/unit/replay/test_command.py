"""``jobtree-replay`` as an administrator runs it: a trace file, Node and Budget manifests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
BUDGET = ROOT / "config/samples/budgets/budget-west-h100.yaml"


def nodes_yaml(path: Path, count: int = 12) -> Path:
    docs = [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": f"gpu-a-{i:02d}",
                "labels": {
                    "region": "us-west",
                    "cluster": "gpu-a",
                    "fabric.domain": "nv-a",
                    "gpu.flavor": "H100-80GB",
                },
            },
            "status": {
                "allocatable": {
                    "nvidia.com/gpu": "8",
                    "cpu": "64",
                    "memory": "512Gi",
                    "pods": "110",
                },
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
        for i in range(1, count + 1)
    ]
    path.write_text(yaml.safe_dump_all(docs))
    return path


def replay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.replay", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=300,
    )


def test_replays_a_csv_trace_against_manifests(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    rows = ["name,owner,arrival,gpus,walltime,runtime,groupGPUs"]
    for i in range(12):
        rows.append(f"j{i},org:ai:rai:sys,{i * 600},32,4h,{3600 + 600 * i},8")
    trace.write_text("\n".join(rows) + "\n")
    done = replay(
        "--trace", str(trace), "-f", str(nodes_yaml(tmp_path / "n.yaml")), "-f", str(BUDGET)
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["fleet_gpus"] == 96 and figures["jobs"] == 12
    assert figures["waited"] > 0  # 12 × 32 GPUs on 96 GPUs queue
    assert figures["promises_broken"] == 0 and figures["lottery_killed_runs"] == 0
    assert 0 < figures["utilisation"] <= 1


def test_a_bad_trace_field_is_named(tmp_path: Path) -> None:
    trace = tmp_path / "trace.json"
    trace.write_text(
        json.dumps(
            [
                {
                    "name": "a",
                    "owner": "o",
                    "arrival": 0,
                    "gpus": 8,
                    "walltime": "soon",
                    "runtime": 60,
                }
            ]
        )
    )
    done = replay(
        "--trace", str(trace), "-f", str(nodes_yaml(tmp_path / "n.yaml")), "-f", str(BUDGET)
    )
    assert done.returncode == 2
    assert "row 1 walltime" in done.stderr
