"""Trace export in both packagings: the chart's `tracing.*` values and the Kustomize tracing
component set the OpenTelemetry environment on every service container (split Deployments and
the combined controller-manager pod), and the services really read it: the rendered environment
is handed to a service process's own config and tracing setup (real OpenTelemetry SDK)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.localenv.controlplane import ensure_binaries
from tests.deploy.conftest import CHART, KUSTOMIZE, REPO, SERVICES, documents, find, run

ENDPOINT = "http://jaeger-collector.observability.svc:4318"
OTEL = re.compile(r"^OTEL_")


def helm_template(bin_dir: Path, *args: str) -> list[dict[str, Any]]:
    done = run([bin_dir / "helm", "template", "jobtree", CHART, "-n", "jobtree-system", *args])
    return documents(done.stdout)


def service_containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every container of every Deployment (the five services in either mode)."""
    out = []
    for deployment in find(docs, "Deployment"):
        out.extend(deployment["spec"]["template"]["spec"]["containers"])
    assert sorted(c["name"] for c in out) == sorted(SERVICES)
    return out


def resolve_env(
    container: dict[str, Any], fields: dict[str, str], secrets: dict[tuple[str, str], str]
) -> dict[str, str]:
    """The environment the kubelet gives a container: `value`s with `$(VAR)` expanded against
    earlier entries, `fieldRef`/`secretKeyRef` looked up in ``fields`` / ``secrets``."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            value = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: env.get(m.group(1), m.group(0)),
                str(entry["value"]),
            )
        elif "fieldRef" in entry["valueFrom"]:
            value = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            value = secrets[(ref["name"], ref["key"])]
        env[entry["name"]] = value
    return env


PROBE = """
import json, sys
from shared.bus.config import service_args
from shared.bus.tracing import configure_tracing
name = sys.argv[1]
cfg = service_args(name, [])
provider = configure_tracing(f"jobtree-{name}", cfg.otlp_endpoint)
out = {"endpoint": cfg.otlp_endpoint, "on": provider is not None}
if provider is not None:
    out["sampler"] = provider.sampler.get_description()
    out["resource"] = {k: str(v) for k, v in provider.resource.attributes.items()}
    provider.shutdown()
print(json.dumps(out))
"""


def probe(service: str, env: dict[str, str]) -> dict[str, Any]:
    """What a service process makes of ``env``: its OTLP endpoint, sampler and resource."""
    base = {k: v for k, v in os.environ.items() if not OTEL.match(k)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, service],
        env={**base, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(data, dict)
    return data


# ------------------------------------------------------------------------------------- Helm


@pytest.mark.parametrize("mode", ["combined", "split"])
def test_helm_tracing_is_off_by_default(deploy_bin: Path, mode: str) -> None:
    containers = service_containers(helm_template(deploy_bin, "--set", f"mode={mode}"))
    for container in containers:
        names = [e["name"] for e in container.get("env", [])]
        assert not [n for n in names if OTEL.match(n)], (container["name"], names)
    fields = {"metadata.name": "p", "metadata.namespace": "jobtree-system"}
    packer = next(c for c in containers if c["name"] == "packer")
    assert probe("packer", resolve_env(packer, fields, {}))["on"] is False


@pytest.mark.parametrize("mode", ["combined", "split"])
def test_helm_tracing_values_reach_every_service(deploy_bin: Path, mode: str) -> None:
    docs = helm_template(
        deploy_bin,
        "--set", f"mode={mode}",
        "--set", f"tracing.otlpEndpoint={ENDPOINT}",
        "--set", "tracing.sampler=parentbased_traceidratio",
        "--set", "tracing.samplerArg=0.25",
        "--set", "tracing.resourceAttributes.deployment\\.environment=prod",
        "--set", "tracing.headersSecret.name=otlp-auth",
    )  # fmt: skip
    pod = "jobtree-controller-manager-7d9f-x2x" if mode == "combined" else "jobtree-binder-5c-q"
    fields = {"metadata.name": pod, "metadata.namespace": "jobtree-system"}
    secrets = {("otlp-auth", "headers"): "authorization=Bearer s3cret"}
    for container in service_containers(docs):
        name = container["name"]
        env = resolve_env(container, fields, secrets)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == ENDPOINT
        assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
        assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.25"
        assert env["OTEL_EXPORTER_OTLP_HEADERS"] == "authorization=Bearer s3cret"
        assert env["OTEL_RESOURCE_ATTRIBUTES"] == (
            f"k8s.namespace.name=jobtree-system,k8s.pod.name={pod},"
            f"k8s.container.name={name},deployment.environment=prod"
        )
        # the service process itself: endpoint, sampler and resource as configured
        seen = probe(name, env)
        assert seen["on"] is True
        assert seen["endpoint"] == ENDPOINT
        assert "TraceIdRatioBased{0.25}" in seen["sampler"]
        assert seen["sampler"].startswith("ParentBased")
        resource = seen["resource"]
        assert resource["service.name"] == f"jobtree-{name}"
        assert resource["k8s.pod.name"] == pod
        assert resource["k8s.container.name"] == name
        assert resource["deployment.environment"] == "prod"


def test_helm_tracing_endpoint_alone(deploy_bin: Path) -> None:
    """Only the endpoint: no sampler or headers variables, the SDK's default sampler."""
    docs = helm_template(deploy_bin, "--set", f"tracing.otlpEndpoint={ENDPOINT}")
    for container in service_containers(docs):
        names = {e["name"] for e in container["env"] if OTEL.match(e["name"])}
        assert names == {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_RESOURCE_ATTRIBUTES"}
    binder = next(c for c in service_containers(docs) if c["name"] == "binder")
    fields = {"metadata.name": "p", "metadata.namespace": "jobtree-system"}
    seen = probe("binder", resolve_env(binder, fields, {}))
    assert seen["on"] is True
    assert seen["sampler"].startswith("ParentBased{root:AlwaysOnSampler")


@pytest.mark.parametrize(
    "bad",
    [
        "tracing.otlpEndpoint=jaeger:4318",  # no scheme: the exporter would not parse it
        "tracing.sampler=sometimes",
        "tracing.headersSecret.key=",
        "tracing.exporter=grpc",
    ],
)
def test_helm_tracing_values_are_checked(deploy_bin: Path, bad: str) -> None:
    done = run([deploy_bin / "helm", "template", "jobtree", CHART, "--set", bad], check=False)
    assert done.returncode != 0, bad
    assert "tracing" in done.stderr


# -------------------------------------------------------------------------------- Kustomize


@pytest.fixture(scope="module")
def kubectl() -> Path:
    """The real kubectl (`kubectl kustomize` needs no API server)."""
    return ensure_binaries() / "kubectl"


def kustomize(kubectl: Path, directory: Path) -> list[dict[str, Any]]:
    return documents(run([kubectl, "kustomize", directory]).stdout)


def tracing_config_maps(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("jobtree-tra")]


@pytest.mark.parametrize("overlay", ["base", "prod"])
def test_kustomize_tracing_is_off_without_the_component(kubectl: Path, overlay: str) -> None:
    docs = kustomize(kubectl, KUSTOMIZE / overlay)
    assert not tracing_config_maps(docs)
    for container in service_containers(docs):
        assert [s["configMapRef"]["name"] for s in container["envFrom"]] == [engine_name(docs)]
        assert not [e for e in container.get("env", []) if OTEL.match(e["name"])]


def engine_name(docs: list[dict[str, Any]]) -> str:
    """The base's engine-settings ConfigMap, the first environment source of every service."""
    (config_map,) = [
        d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("jobtree-engine")
    ]
    name: str = config_map["metadata"]["name"]
    return name


def _via_config_map(docs: list[dict[str, Any]]) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The tracing ConfigMap's data, and the containers after checking each takes it whole
    (after the engine settings)."""
    (config_map,) = tracing_config_maps(docs)
    name = config_map["metadata"]["name"]
    assert re.fullmatch(r"jobtree-tracing-[a-z0-9]{10}", name), "content-hashed name"
    assert config_map["metadata"]["namespace"] == "jobtree-system"
    containers = service_containers(docs)
    for container in containers:
        assert container["envFrom"] == [
            {"configMapRef": {"name": engine_name(docs)}},
            {"configMapRef": {"name": name}},
        ], container["name"]
    data = config_map["data"]
    assert isinstance(data, dict)
    return data, containers


def test_kustomize_dev_overlay_exports_traces(kubectl: Path) -> None:
    data, containers = _via_config_map(kustomize(kubectl, KUSTOMIZE / "dev"))
    assert data == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT,
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }
    for container in containers:
        seen = probe(container["name"], data)
        assert seen["on"] is True and seen["endpoint"] == ENDPOINT
        assert seen["resource"]["service.name"] == f"jobtree-{container['name']}"


def test_kustomize_component_in_another_overlay(kubectl: Path, tmp_path: Path) -> None:
    """The usage documented in the component and docs/install.md: prod + component + ConfigMap."""
    overlay = tmp_path / "prod-traced"
    overlay.mkdir()
    up = Path(os.path.relpath(KUSTOMIZE, overlay))  # kustomize wants relative directories
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        f"resources: [{up / 'prod'}]\n"
        f"components: [{up / 'components' / 'tracing'}]\n"
        "configMapGenerator:\n"
        "  - name: jobtree-tracing\n"
        "    namespace: jobtree-system\n"
        "    literals:\n"
        "      - OTEL_EXPORTER_OTLP_ENDPOINT=http://otel-collector.monitoring.svc:4318\n"
        "      - OTEL_TRACES_SAMPLER=parentbased_traceidratio\n"
        "      - OTEL_TRACES_SAMPLER_ARG=0.1\n"
    )
    data, containers = _via_config_map(kustomize(kubectl, overlay))
    assert data["OTEL_TRACES_SAMPLER_ARG"] == "0.1"
    seen = probe("resolver", data)
    assert seen["endpoint"] == "http://otel-collector.monitoring.svc:4318"
    assert "TraceIdRatioBased{0.1}" in seen["sampler"]
    # prod's own settings are untouched
    assert all(c["image"].startswith("registry.internal.example/") for c in containers)


def test_component_comment_matches_its_usage() -> None:
    """The usage example in the component's header names the real ConfigMap and path."""
    text = (KUSTOMIZE / "components" / "tracing" / "kustomization.yaml").read_text()
    assert "- ../components/tracing" in text
    assert "name: jobtree-tracing" in text
    dev = (KUSTOMIZE / "dev" / "kustomization.yaml").read_text()
    assert "- ../components/tracing" in dev
