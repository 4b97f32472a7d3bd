"""Tenancy: which owners a namespace may name in its Runs (SPEC §3 Tenancy).

A namespace lists the owner globs it is authorised for in the annotation
``rq.davidlangworthy.io/owners`` (comma separated, shell-style ``fnmatch`` globs: ``*`` matches any
run of characters, ``:`` included). Tenancy is closed unless opened: a namespace without the
annotation gets the operator's default globs (``--default-owner-globs``), which are empty (nobody)
unless the operator names some; an annotation that is present but lists nothing authorises nobody;
a namespace that cannot be read (unknown, or the lookup failed) authorises nobody. This is what
makes lending ACLs mean anything: a Run cannot claim to be an owner its namespace does not speak
for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from shared.api import GROUP

OWNERS_ANNOTATION = f"{GROUP}/owners"
DEFAULT_OWNER_GLOBS: tuple[str, ...] = ()
"""Nobody: a namespace speaks for the owners its annotation names, or the operator's default."""
UNAUTHORIZED = "Unauthorized"


def parse_globs(text: str | None) -> tuple[str, ...]:
    """``"org:ai:*, org:ml"`` → ``("org:ai:*", "org:ml")``: trimmed, empties dropped, deduped."""
    if not text:
        return ()
    return tuple(dict.fromkeys(g.strip() for g in text.split(",") if g.strip()))


def namespace_globs(
    annotations: Mapping[str, str] | None, default: Sequence[str] = DEFAULT_OWNER_GLOBS
) -> tuple[str, ...]:
    """The namespace's annotation globs when the annotation exists, else ``default``; none at all
    when the namespace is unknown (``annotations`` None)."""
    if annotations is None:
        return ()
    if OWNERS_ANNOTATION in annotations:
        return parse_globs(annotations[OWNERS_ANNOTATION])
    return tuple(default)


def authorized(owner: str, globs: Sequence[str]) -> bool:
    """True when some glob matches the whole owner path (case-sensitive)."""
    return any(fnmatchcase(owner, glob) for glob in globs)


@dataclass(frozen=True, slots=True)
class Denied:
    """The namespace may not name this owner; ``message`` names both and the allowed globs."""

    owner: str
    namespace: str
    globs: tuple[str, ...]
    from_annotation: bool
    unreadable: bool = False
    """The Namespace could not be read: nothing is authorised until it can."""

    @property
    def reason(self) -> str:
        return UNAUTHORIZED

    @property
    def message(self) -> str:
        if self.unreadable:
            return (
                f"Unauthorized: namespace {self.namespace!r} could not be read, so it is not "
                f"authorised for owner {self.owner!r} (tenancy is closed unless the namespace's "
                f"annotation {OWNERS_ANNOTATION} names the owner)"
            )
        allowed = ", ".join(self.globs) if self.globs else "no owners"
        source = (
            f"annotation {OWNERS_ANNOTATION}"
            if self.from_annotation
            else "the default owner globs (no annotation)"
        )
        return (
            f"Unauthorized: namespace {self.namespace!r} is not authorised for owner "
            f"{self.owner!r}; it may name {allowed} ({source})"
        )


def check_owner(
    owner: str,
    namespace: str,
    annotations: Mapping[str, str] | None,
    default: Sequence[str] = DEFAULT_OWNER_GLOBS,
) -> Denied | None:
    """None when ``namespace`` may name ``owner``, else why not.

    ``annotations`` is the Namespace's metadata.annotations (None when the Namespace is unknown
    or its lookup failed: denied).
    """
    globs = namespace_globs(annotations, default)
    if authorized(owner, globs):
        return None
    from_annotation = annotations is not None and OWNERS_ANNOTATION in annotations
    return Denied(
        owner=owner,
        namespace=namespace,
        globs=globs,
        from_annotation=from_annotation,
        unreadable=annotations is None,
    )
