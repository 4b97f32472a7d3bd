"""Pod policy: what a Run's ``spec.template`` may ask of the node its pods land on.

Jobtree copies the template into every rank's pod and binds the pod to a node itself, so without
this check any tenant who may create a Run could run privileged containers, mount the host's
disk or pick a service account of another workload. :func:`check_template` is the one rule; the
admission webhook, admission's reconcile and the binder (right before it writes pods) all call it.

By default a template may not use host namespaces (``hostNetwork``, ``hostPID``, ``hostIPC``),
``hostPath`` volumes, ``privileged`` containers, ``allowPrivilegeEscalation: true``, capabilities
beyond the container runtime's default set, a service account outside the allowed globs,
``nodeName`` (the binder places pods), extended resources (GPUs) in init or ephemeral containers
(they would hold devices the Lease does not pay for), or dynamic resource claims; and it may not
be larger than ``max_template_bytes`` (the binder builds one copy per rank). The operator relaxes
each rule by name (:data:`RULES`), or widens the capability and service-account lists.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

POD_POLICY = "PodPolicy"
"""The typed reason of every refusal (Run status reason, binder conflict, webhook message)."""

HOST_NAMESPACES = "hostNamespaces"
HOST_PATH = "hostPath"
PRIVILEGED = "privileged"
PRIVILEGE_ESCALATION = "privilegeEscalation"
NODE_NAME = "nodeName"
AUXILIARY_GPUS = "auxiliaryGPUs"
RESOURCE_CLAIMS = "resourceClaims"
RULES: tuple[str, ...] = (
    HOST_NAMESPACES,
    HOST_PATH,
    PRIVILEGED,
    PRIVILEGE_ESCALATION,
    NODE_NAME,
    AUXILIARY_GPUS,
    RESOURCE_CLAIMS,
)
"""Rules the operator may relax by name (``--pod-policy-allow``)."""

RUNTIME_DEFAULT_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "NET_RAW",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
"""What containerd and CRI-O grant a container anyway: adding one of these changes nothing."""
DEFAULT_SERVICE_ACCOUNTS: tuple[str, ...] = ("default",)
DEFAULT_MAX_TEMPLATE_BYTES = 64 * 1024
TEMPLATE = "spec.template"
_CORE_RESOURCES = ("cpu", "memory", "ephemeral-storage")
_CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


@dataclass(frozen=True, slots=True)
class PodPolicyConfig:
    """The operator's policy: rules relaxed by name, capability and service-account lists."""

    allow: frozenset[str] = frozenset()
    """Relaxed rules (names in :data:`RULES`)."""
    capabilities: frozenset[str] = frozenset()
    """Capabilities a container may add beyond the runtime default (``*`` = any)."""
    service_accounts: tuple[str, ...] = DEFAULT_SERVICE_ACCOUNTS
    """Globs a template's ``serviceAccountName`` must match (``*`` = any)."""
    max_template_bytes: int = DEFAULT_MAX_TEMPLATE_BYTES
    """Largest ``spec.template`` accepted, as compact JSON; 0 = no limit."""

    def __post_init__(self) -> None:
        unknown = sorted(self.allow - set(RULES))
        if unknown:
            raise ValueError(
                f"unknown pod policy rule(s) {', '.join(unknown)}; known: {', '.join(RULES)}"
            )
        if self.max_template_bytes < 0:
            raise ValueError("max template bytes must be 0 (no limit) or positive")


@dataclass(frozen=True, slots=True)
class PodPolicyViolation:
    """One thing the template may not do: the field path, what is wrong, the rule to relax."""

    path: str
    problem: str
    rule: str | None = None
    """The rule name that relaxes it (None for the lists and the size limit)."""


@dataclass(frozen=True, slots=True)
class PodPolicyRefusal:
    """Every violation of one template; ``message`` names each field path."""

    violations: tuple[PodPolicyViolation, ...]

    @property
    def reason(self) -> str:
        return POD_POLICY

    @property
    def detail(self) -> str:
        """``<field path> <problem>`` of each violation, ``; `` separated."""
        return "; ".join(f"{v.path} {v.problem}" for v in self.violations)

    @property
    def message(self) -> str:
        return f"{POD_POLICY}: {self.detail}"


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _extended(resource: str) -> bool:
    """A device or other extended resource (``nvidia.com/gpu``), not cpu/memory/hugepages."""
    return not (resource in _CORE_RESOURCES or resource.startswith("hugepages-"))


def template_bytes(template: Any) -> int:
    """Size of the template as compact JSON, the measure ``max_template_bytes`` limits."""
    return len(json.dumps(template, separators=(",", ":"), default=str).encode())


def _containers(spec: Mapping[str, Any], at: str) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    for kind in _CONTAINER_LISTS:
        for index, container in enumerate(_items(spec.get(kind))):
            yield kind, f"{at}.{kind}[{index}]", _mapping(container)


def _container_violations(
    kind: str, path: str, container: Mapping[str, Any], config: PodPolicyConfig
) -> Iterator[PodPolicyViolation]:
    allowed = config.allow
    security = _mapping(container.get("securityContext"))
    if security.get("privileged") is True and PRIVILEGED not in allowed:
        yield PodPolicyViolation(f"{path}.securityContext.privileged", "is true", PRIVILEGED)
    if security.get("allowPrivilegeEscalation") is True and PRIVILEGE_ESCALATION not in allowed:
        yield PodPolicyViolation(
            f"{path}.securityContext.allowPrivilegeEscalation", "is true", PRIVILEGE_ESCALATION
        )
    added = _items(_mapping(security.get("capabilities")).get("add"))
    if "*" not in config.capabilities:
        for index, cap in enumerate(added):
            name = str(cap).upper().removeprefix("CAP_")
            if name not in RUNTIME_DEFAULT_CAPABILITIES and name not in config.capabilities:
                yield PodPolicyViolation(
                    f"{path}.securityContext.capabilities.add[{index}]",
                    f"adds {cap}, beyond the runtime default capabilities",
                )
    resources = _mapping(container.get("resources"))
    if kind != "containers" and AUXILIARY_GPUS not in allowed:
        for section in ("limits", "requests"):
            for resource in sorted(_mapping(resources.get(section))):
                if _extended(str(resource)):
                    yield PodPolicyViolation(
                        f"{path}.resources.{section}[{resource}]",
                        "requests a device outside the Run's Lease "
                        f"(only containers may hold GPUs, not {kind})",
                        AUXILIARY_GPUS,
                    )
    if _items(resources.get("claims")) and RESOURCE_CLAIMS not in allowed:
        yield PodPolicyViolation(
            f"{path}.resources.claims", "uses dynamic resource claims", RESOURCE_CLAIMS
        )


def violations(template: Any, config: PodPolicyConfig) -> tuple[PodPolicyViolation, ...]:
    """Every way ``template`` (a Run's ``spec.template``; None = none) breaks ``config``."""
    if template is None:
        return ()
    found: list[PodPolicyViolation] = []
    size = template_bytes(template)
    if config.max_template_bytes and size > config.max_template_bytes:
        found.append(
            PodPolicyViolation(
                TEMPLATE,
                f"is {size} bytes, more than the limit of {config.max_template_bytes} bytes "
                "(--max-template-bytes)",
            )
        )
    at = f"{TEMPLATE}.spec"
    spec = _mapping(_mapping(template).get("spec"))
    allowed = config.allow
    if HOST_NAMESPACES not in allowed:
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(field) is True:
                found.append(PodPolicyViolation(f"{at}.{field}", "is true", HOST_NAMESPACES))
    if HOST_PATH not in allowed:
        for index, volume in enumerate(_items(spec.get("volumes"))):
            if "hostPath" in _mapping(volume):
                found.append(
                    PodPolicyViolation(
                        f"{at}.volumes[{index}].hostPath", "mounts the node's filesystem", HOST_PATH
                    )
                )
    if spec.get("nodeName") and NODE_NAME not in allowed:
        found.append(
            PodPolicyViolation(f"{at}.nodeName", "is set (the binder places pods)", NODE_NAME)
        )
    if _items(spec.get("resourceClaims")) and RESOURCE_CLAIMS not in allowed:
        found.append(
            PodPolicyViolation(
                f"{at}.resourceClaims", "uses dynamic resource claims", RESOURCE_CLAIMS
            )
        )
    for field in ("serviceAccountName", "serviceAccount"):  # the second is the deprecated alias
        account = spec.get(field)
        if account and not any(fnmatchcase(str(account), g) for g in config.service_accounts):
            listed = ", ".join(config.service_accounts) or "none"
            found.append(
                PodPolicyViolation(
                    f"{at}.{field}", f"is {account!r}, not an allowed service account ({listed})"
                )
            )
    for kind, path, container in _containers(spec, at):
        found.extend(_container_violations(kind, path, container, config))
    return tuple(found)


def check_template(template: Any, config: PodPolicyConfig) -> PodPolicyRefusal | None:
    """None when the template may become pods, else every violation with its field path."""
    found = violations(template, config)
    return PodPolicyRefusal(found) if found else None


# -- operator settings (flags with environment fallbacks) ------------------------------------------


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The pod policy flags, shared by admission and the binder (same names, same env)."""
    env = os.environ.get
    parser.add_argument(
        "--pod-policy-allow",
        default=env("JOBTREE_POD_POLICY_ALLOW", ""),
        help=f"pod policy rules to relax, comma separated: {', '.join(RULES)} "
        "($JOBTREE_POD_POLICY_ALLOW)",
    )
    parser.add_argument(
        "--pod-policy-capabilities",
        default=env("JOBTREE_POD_POLICY_CAPABILITIES", ""),
        help="capabilities a container may add beyond the runtime default, comma separated, "
        "* = any ($JOBTREE_POD_POLICY_CAPABILITIES)",
    )
    parser.add_argument(
        "--pod-policy-service-accounts",
        default=env("JOBTREE_POD_POLICY_SERVICE_ACCOUNTS", ",".join(DEFAULT_SERVICE_ACCOUNTS)),
        help="service account globs a template may name, comma separated "
        "($JOBTREE_POD_POLICY_SERVICE_ACCOUNTS; default %(default)s)",
    )
    parser.add_argument(
        "--max-template-bytes",
        type=int,
        default=int(env("JOBTREE_MAX_TEMPLATE_BYTES", str(DEFAULT_MAX_TEMPLATE_BYTES))),
        help="largest Run spec.template in bytes of JSON, 0 = no limit "
        "($JOBTREE_MAX_TEMPLATE_BYTES; default %(default)s)",
    )


def from_arguments(ns: argparse.Namespace) -> PodPolicyConfig:
    """The policy the flags of :func:`add_arguments` describe (ValueError on an unknown rule)."""
    return policy_config(
        allow=_names(ns.pod_policy_allow),
        capabilities=_names(ns.pod_policy_capabilities),
        service_accounts=_names(ns.pod_policy_service_accounts),
        max_template_bytes=ns.max_template_bytes,
    )


def policy_config(
    *,
    allow: Sequence[str] = (),
    capabilities: Sequence[str] = (),
    service_accounts: Sequence[str] = DEFAULT_SERVICE_ACCOUNTS,
    max_template_bytes: int = DEFAULT_MAX_TEMPLATE_BYTES,
) -> PodPolicyConfig:
    """A :class:`PodPolicyConfig` from plain lists (capability names upper-cased, ``CAP_`` off)."""
    caps = {c if c == "*" else c.upper().removeprefix("CAP_") for c in capabilities}
    return PodPolicyConfig(
        allow=frozenset(allow),
        capabilities=frozenset(caps),
        service_accounts=tuple(service_accounts),
        max_template_bytes=max_template_bytes,
    )
