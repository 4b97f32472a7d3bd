"""Tenancy: the namespace annotation (or the default globs) decides which owners a Run may name."""

from __future__ import annotations

from shared.control.tenancy import (
    OWNERS_ANNOTATION,
    authorized,
    check_owner,
    namespace_globs,
    parse_globs,
)


def test_parse_globs_trims_drops_empties_and_dedupes() -> None:
    assert parse_globs(" org:ai:* , ,org:ml,org:ai:*") == ("org:ai:*", "org:ml")
    assert parse_globs("") == ()
    assert parse_globs(None) == ()


def test_annotation_wins_over_default_and_empty_annotation_allows_nobody() -> None:
    assert namespace_globs({OWNERS_ANNOTATION: "org:ai:*"}, ("*",)) == ("org:ai:*",)
    assert namespace_globs({"other": "x"}, ("org:*",)) == ("org:*",)
    assert namespace_globs(None, ("org:*",)) == ()
    assert namespace_globs({OWNERS_ANNOTATION: " , "}, ("*",)) == ()


def test_globs_match_whole_owner_paths_across_colons() -> None:
    assert authorized("org:ai:rai:sys", ["org:ai:*"])
    assert authorized("org:ai", ["org:ai"])
    assert not authorized("org:aix", ["org:ai"])
    assert not authorized("org:ml:x", ["org:ai:*", "org:ml"])
    assert not authorized("org:ai", [])


def test_default_allows_nobody() -> None:
    denied = check_owner("org:any", "ns", {})
    assert denied is not None and not denied.from_annotation and not denied.unreadable
    assert "it may name no owners (the default owner globs (no annotation))" in denied.message
    assert check_owner("org:any", "ns", {}, ("org:*",)) is None


def test_an_unreadable_namespace_authorises_nobody_even_with_open_defaults() -> None:
    denied = check_owner("org:any", "gone", None, ("*",))
    assert denied is not None and denied.unreadable
    assert denied.message.startswith("Unauthorized: namespace 'gone' could not be read")


def test_denial_names_owner_namespace_and_allowed_globs() -> None:
    denied = check_owner("org:ml:x", "team-a", {OWNERS_ANNOTATION: "org:ai:*"})
    assert denied is not None
    assert denied.reason == "Unauthorized"
    assert denied.message.startswith("Unauthorized: ")
    assert "'team-a'" in denied.message and "'org:ml:x'" in denied.message
    assert "org:ai:*" in denied.message and OWNERS_ANNOTATION in denied.message


def test_denial_by_default_globs_says_so() -> None:
    denied = check_owner("org:ml:x", "team-b", {}, ("org:ai:*",))
    assert denied is not None and not denied.from_annotation
    assert "default owner globs" in denied.message
    nobody = check_owner("org:ai", "team-c", {OWNERS_ANNOTATION: ""})
    assert nobody is not None and "no owners" in nobody.message
