"""The test environment itself: a real API server that serves and a KWOK that fakes kubelets."""

from __future__ import annotations

import json

from shared.localenv.controlplane import ControlPlane

FAKE_NODE = """apiVersion: v1
kind: Node
metadata:
  name: envcheck-node
  annotations: {kwok.x-k8s.io/node: fake}
  labels: {region: us-west, cluster: gpu-a, fabric.domain: nv-a, gpu.flavor: H100-80GB}
status:
  allocatable: {cpu: "32", memory: 256Gi, pods: "110", nvidia.com/gpu: "8"}
  capacity: {cpu: "32", memory: 256Gi, pods: "110", nvidia.com/gpu: "8"}
"""


def test_apiserver_reports_its_version(kube: ControlPlane) -> None:
    out = kube.kubectl("version", "-o", "json").stdout
    assert json.loads(out)["serverVersion"]["gitVersion"].startswith("v1.")


def test_kwok_marks_a_fake_gpu_node_ready(kube: ControlPlane) -> None:
    kube.kubectl("apply", "-f", "-", input=FAKE_NODE)
    try:
        kube.kubectl(
            "wait", "--for=condition=Ready", "node/envcheck-node", "--timeout=60s", timeout=90
        )
        node = json.loads(kube.kubectl("get", "node", "envcheck-node", "-o", "json").stdout)
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    finally:
        kube.kubectl("delete", "node", "envcheck-node", "--wait=false", check=False)
