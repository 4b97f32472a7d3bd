"""Pod policy: each rule refuses by default, names the field path, and each relaxation lifts it."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from shared.control import pod_policy as pp
from shared.control.pod_policy import PodPolicyConfig, check_template, policy_config, violations


def template(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"containers": [{"name": "main", "image": "busybox"}]}
    base.update(spec)
    return {"metadata": {"labels": {"app": "x"}}, "spec": base}


def container(**fields: Any) -> dict[str, Any]:
    return {"name": "c", "image": "busybox", **fields}


def paths(tmpl: Any, config: PodPolicyConfig | None = None) -> list[str]:
    return [v.path for v in violations(tmpl, config or PodPolicyConfig())]


S = "spec.template.spec"

# (template, the field path refused by default, the rule that relaxes it)
CASES: list[tuple[dict[str, Any], str, str]] = [
    (template(hostNetwork=True), f"{S}.hostNetwork", pp.HOST_NAMESPACES),
    (template(hostPID=True), f"{S}.hostPID", pp.HOST_NAMESPACES),
    (template(hostIPC=True), f"{S}.hostIPC", pp.HOST_NAMESPACES),
    (
        template(volumes=[{"name": "e", "emptyDir": {}}, {"name": "r", "hostPath": {"path": "/"}}]),
        f"{S}.volumes[1].hostPath",
        pp.HOST_PATH,
    ),
    (
        template(containers=[container(securityContext={"privileged": True})]),
        f"{S}.containers[0].securityContext.privileged",
        pp.PRIVILEGED,
    ),
    (
        template(initContainers=[container(securityContext={"privileged": True})]),
        f"{S}.initContainers[0].securityContext.privileged",
        pp.PRIVILEGED,
    ),
    (
        template(
            containers=[container(), container(securityContext={"allowPrivilegeEscalation": True})]
        ),
        f"{S}.containers[1].securityContext.allowPrivilegeEscalation",
        pp.PRIVILEGE_ESCALATION,
    ),
    (template(nodeName="gpu-a-01"), f"{S}.nodeName", pp.NODE_NAME),
    (
        template(initContainers=[container(resources={"limits": {"nvidia.com/gpu": "8"}})]),
        f"{S}.initContainers[0].resources.limits[nvidia.com/gpu]",
        pp.AUXILIARY_GPUS,
    ),
    (
        template(ephemeralContainers=[container(resources={"requests": {"amd.com/gpu": "1"}})]),
        f"{S}.ephemeralContainers[0].resources.requests[amd.com/gpu]",
        pp.AUXILIARY_GPUS,
    ),
    (
        template(resourceClaims=[{"name": "gpu", "resourceClaimName": "eight-gpus"}]),
        f"{S}.resourceClaims",
        pp.RESOURCE_CLAIMS,
    ),
    (
        template(containers=[container(resources={"claims": [{"name": "gpu"}]})]),
        f"{S}.containers[0].resources.claims",
        pp.RESOURCE_CLAIMS,
    ),
]


@pytest.mark.parametrize(("tmpl", "path", "rule"), CASES, ids=[c[1] for c in CASES])
def test_each_rule_refuses_by_default_and_its_relaxation_allows(
    tmpl: dict[str, Any], path: str, rule: str
) -> None:
    refused = check_template(tmpl, PodPolicyConfig())
    assert refused is not None
    assert refused.reason == "PodPolicy"
    assert [v.path for v in refused.violations] == [path]
    assert refused.message.startswith(f"PodPolicy: {path} ")
    assert refused.violations[0].rule == rule
    assert check_template(tmpl, policy_config(allow=[rule])) is None
    others = [r for r in pp.RULES if r != rule]
    assert paths(tmpl, policy_config(allow=others)) == [path]


def test_a_plain_template_and_no_template_pass() -> None:
    assert check_template(None, PodPolicyConfig()) is None
    assert check_template({}, PodPolicyConfig()) is None
    safe = template(
        serviceAccountName="default",
        initContainers=[container(resources={"limits": {"cpu": "1", "memory": "1Gi"}})],
        containers=[
            container(
                resources={"limits": {"nvidia.com/gpu": "8", "hugepages-2Mi": "1Gi"}},
                securityContext={
                    "privileged": False,
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
                },
            )
        ],
        volumes=[{"name": "scratch", "emptyDir": {}}],
        hostNetwork=False,
    )
    assert check_template(safe, PodPolicyConfig()) is None


def test_added_capabilities_beyond_the_runtime_default_and_their_allow_list() -> None:
    caps = {"capabilities": {"add": ["CHOWN", "SYS_ADMIN", "CAP_NET_ADMIN"]}}
    tmpl = template(containers=[container(securityContext=caps)])
    prefix = f"{S}.containers[0].securityContext.capabilities.add"
    assert paths(tmpl) == [f"{prefix}[1]", f"{prefix}[2]"]
    assert paths(tmpl, policy_config(capabilities=["sys_admin"])) == [f"{prefix}[2]"]
    assert paths(tmpl, policy_config(capabilities=["SYS_ADMIN", "NET_ADMIN"])) == []
    assert paths(tmpl, policy_config(capabilities=["*"])) == []
    all_caps = template(containers=[container(securityContext={"capabilities": {"add": ["ALL"]}})])
    assert paths(all_caps) == [f"{prefix}[0]"]


def test_service_accounts_outside_the_allowed_globs() -> None:
    foreign = template(serviceAccountName="jobtree-binder")
    refused = check_template(foreign, PodPolicyConfig())
    assert refused is not None
    assert refused.violations[0].path == f"{S}.serviceAccountName"
    assert "'jobtree-binder'" in refused.message and "(default)" in refused.message
    alias = template(serviceAccount="kube-proxy")
    assert paths(alias) == [f"{S}.serviceAccount"]
    assert paths(foreign, policy_config(service_accounts=["default", "train-*"])) == [
        f"{S}.serviceAccountName"
    ]
    assert (
        paths(template(serviceAccountName="train-a"), policy_config(service_accounts=["train-*"]))
        == []
    )
    assert paths(foreign, policy_config(service_accounts=["*"])) == []
    assert paths(template(serviceAccountName="default"), policy_config(service_accounts=[])) == [
        f"{S}.serviceAccountName"
    ]


def test_oversized_template_names_the_limit() -> None:
    big = template(containers=[container(args=["x" * 70_000])])
    refused = check_template(big, PodPolicyConfig())
    assert refused is not None
    assert refused.violations[0].path == "spec.template"
    size = pp.template_bytes(big)
    assert f"is {size} bytes, more than the limit of 65536 bytes" in refused.message
    assert check_template(big, policy_config(max_template_bytes=size)) is None
    assert check_template(big, policy_config(max_template_bytes=0)) is None
    assert paths(template(), policy_config(max_template_bytes=10)) == ["spec.template"]


def test_every_violation_is_reported_in_one_message() -> None:
    tmpl = template(
        hostPID=True,
        volumes=[{"name": "root", "hostPath": {"path": "/"}}],
        containers=[container(securityContext={"privileged": True})],
    )
    refused = check_template(tmpl, PodPolicyConfig())
    assert refused is not None
    assert refused.message == (
        f"PodPolicy: {S}.hostPID is true; {S}.volumes[0].hostPath mounts the node's filesystem; "
        f"{S}.containers[0].securityContext.privileged is true"
    )


def test_unknown_rules_and_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown pod policy rule.*hostpath"):
        policy_config(allow=["hostpath"])
    with pytest.raises(ValueError, match="max template bytes"):
        policy_config(max_template_bytes=-1)


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBTREE_POD_POLICY_ALLOW", "hostPath")
    monkeypatch.setenv("JOBTREE_MAX_TEMPLATE_BYTES", "2048")
    parser = argparse.ArgumentParser()
    pp.add_arguments(parser)
    ns = parser.parse_args(
        [
            "--pod-policy-allow",
            "hostNamespaces, privileged",
            "--pod-policy-capabilities",
            "sys_ptrace",
            "--pod-policy-service-accounts",
            "default,train-*",
        ]
    )
    config = pp.from_arguments(ns)
    assert config.allow == {pp.HOST_NAMESPACES, pp.PRIVILEGED}
    assert config.capabilities == {"SYS_PTRACE"}
    assert config.service_accounts == ("default", "train-*")
    assert config.max_template_bytes == 2048


def test_no_flags_is_the_default_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ALLOW", "CAPABILITIES", "SERVICE_ACCOUNTS"):
        monkeypatch.delenv(f"JOBTREE_POD_POLICY_{name}", raising=False)
    monkeypatch.delenv("JOBTREE_MAX_TEMPLATE_BYTES", raising=False)
    parser = argparse.ArgumentParser()
    pp.add_arguments(parser)
    assert pp.from_arguments(parser.parse_args([])) == PodPolicyConfig()


def test_admission_and_binder_read_the_same_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.admission.config import parse_args as admission_args
    from services.binder.__main__ import parse_args as binder_args

    for name in ("JOBTREE_POD_POLICY_CAPABILITIES", "JOBTREE_DEFAULT_OWNER_GLOBS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JOBTREE_POD_POLICY_ALLOW", "hostPath")
    monkeypatch.setenv("JOBTREE_POD_POLICY_SERVICE_ACCOUNTS", "default,train-*")
    argv = ["--max-template-bytes", "4096"]
    admission = admission_args(argv).pod_policy
    _, binder = binder_args(argv)
    assert (
        admission
        == binder.pod_policy
        == policy_config(
            allow=["hostPath"], service_accounts=["default", "train-*"], max_template_bytes=4096
        )
    )
    assert admission_args([]).default_owner_globs == ()


def test_an_unknown_rule_stops_the_service(capsys: pytest.CaptureFixture[str]) -> None:
    from services.admission.config import parse_args as admission_args

    with pytest.raises(SystemExit) as stop:
        admission_args(["--pod-policy-allow", "hostpath"])
    assert stop.value.code == 2
    assert "unknown pod policy rule(s) hostpath" in capsys.readouterr().err
