"""``kubectl runs owners``: the owner globs a namespace's Runs may name, and their source (pure).

Admission authorises a Run's ``spec.owner`` against the namespace's annotation
``rq.davidlangworthy.io/owners`` when it exists, else against the admission service's
``--default-owner-globs`` (``JOBTREE_DEFAULT_OWNER_GLOBS``, none unless configured)
— ``shared.control.tenancy`` is that rule; this module only reports it. The default is read
from the admission Deployment when the caller may see it; Budget owners the globs admit are
listed so a researcher sees which owners they can actually use.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from shared.cli import views
from shared.cli.deployments import command_words, service_containers
from shared.control.tenancy import (
    DEFAULT_OWNER_GLOBS,
    OWNERS_ANNOTATION,
    authorized,
    namespace_globs,
    parse_globs,
)

Obj = Mapping[str, Any]
GLOBS_FLAG = "--default-owner-globs"
GLOBS_ENV = "JOBTREE_DEFAULT_OWNER_GLOBS"


def admission_default(deployment: Obj) -> str | None:
    """The ``--default-owner-globs`` text of a Deployment's admission container (flag, then
    env, else the built-in ``*``); None when it runs no admission container."""
    for service, container in service_containers(deployment):
        if service != "admission":
            continue
        words = command_words(container)
        for i, word in enumerate(words):
            if word.startswith(GLOBS_FLAG + "="):
                return word.partition("=")[2]
            if word == GLOBS_FLAG and i + 1 < len(words):
                return words[i + 1]
        for env in views.as_list(container.get("env")):
            env = views.as_map(env)
            if env.get("name") == GLOBS_ENV and isinstance(env.get("value"), str):
                return str(env["value"]) or ",".join(DEFAULT_OWNER_GLOBS)
        return ",".join(DEFAULT_OWNER_GLOBS)
    return None


def owners_record(
    namespace: str,
    namespace_obj: Obj | None,
    admissions: Sequence[Obj],
    budgets: Iterable[Obj] | None,
) -> dict[str, Any]:
    """The globs in force for ``namespace``, where they come from, and the Budget owners they
    admit (``budgets`` None: Budgets could not be read)."""
    annotations = views.as_map(
        views.as_map((namespace_obj or {}).get("metadata")).get("annotations")
    )
    defaults = [
        (views.run_label((views.namespace_of(d) or "", views.name_of(d))), text)
        for d in admissions
        if (text := admission_default(d)) is not None
    ]
    if OWNERS_ANNOTATION in annotations:
        globs = namespace_globs({k: str(v) for k, v in annotations.items()})
        source = f"annotation {OWNERS_ANNOTATION} on namespace {namespace}"
    elif defaults:
        where, text = defaults[0]
        globs = parse_globs(text) or DEFAULT_OWNER_GLOBS
        source = f"no annotation: the default owner globs of admission Deployment {where}"
    else:
        globs = DEFAULT_OWNER_GLOBS
        source = (
            "no annotation: the admission service's --default-owner-globs, which is * unless "
            "the operator configured it (its Deployment is not visible to you)"
        )
    record: dict[str, Any] = {
        "namespace": namespace,
        "namespaceFound": namespace_obj is not None,
        "globs": list(globs),
        "source": source,
        "annotation": OWNERS_ANNOTATION,
    }
    if budgets is not None:
        owners = sorted({str(views.as_map(b.get("spec")).get("owner")) for b in budgets} - {"None"})
        record["budgetOwners"] = [o for o in owners if authorized(o, globs)]
        record["otherBudgetOwners"] = [o for o in owners if not authorized(o, globs)]
    return record
