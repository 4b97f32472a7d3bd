"""Family tree relations: parents, siblings, cousins (descendants included), caps index."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.engine.family import Family, path_parent
from shared.engine.model import Budget
from tests.unit.engine import test_cover_lazy as cover_lazy
from tests.unit.engine.budgets import H100, budget, cap, env, key


def _tree() -> Family:
    # org
    # ├── org:ai
    # │   ├── org:ai:rai
    # │   │   ├── org:ai:rai:sys
    # │   │   │   └── org:ai:rai:sys:kid
    # │   │   └── org:ai:rai:ml
    # │   └── org:ai:vision
    # │       └── org:ai:vision:x
    # └── org:fin
    owners = [
        "org",
        "org:ai",
        "org:ai:rai",
        "org:ai:rai:sys",
        "org:ai:rai:sys:kid",
        "org:ai:rai:ml",
        "org:ai:vision",
        "org:ai:vision:x",
        "org:fin",
    ]
    return Family(budget(o, env("e", 8)) for o in owners)


def test_path_parent() -> None:
    assert path_parent("org:ai:rai") == ("org:ai",)
    assert path_parent("org") == ()
    assert path_parent(":x") == ()


def test_parents_nearest_first() -> None:
    fam = _tree()
    assert fam.parents_of("org:ai:rai:sys") == ("org:ai:rai", "org:ai", "org")
    assert fam.parents_of("org") == ()
    assert fam.owners() == tuple(sorted(fam.owners()))


def test_siblings_share_a_direct_parent_sorted() -> None:
    fam = _tree()
    assert fam.siblings_of("org:ai:rai:sys") == ("org:ai:rai:ml",)
    assert fam.siblings_of("org:ai:vision") == ("org:ai:rai",)
    assert fam.siblings_of("org:ai") == ("org:fin",)


def test_cousins_descendants_first_then_by_common_ancestor() -> None:
    fam = _tree()
    assert fam.cousins_of("org:ai:rai:sys") == (
        "org:ai:rai:sys:kid",  # common ancestor = self (0 up, 1 down)
        "org:ai:vision",  # via org:ai (2 up, 1 down)
        "org:ai:vision:x",  # via org:ai (2 up, 2 down)
        "org:fin",  # via org (3 up, 1 down)
    )
    assert fam.descendants_of("org:ai:rai") == (
        "org:ai:rai:ml",
        "org:ai:rai:sys",
        "org:ai:rai:sys:kid",
    )


def test_relations_are_disjoint_and_cover_the_family() -> None:
    fam = _tree()
    for owner in fam.owners():
        rel = fam.relatives(owner)
        groups = [set(rel.parents), set(rel.siblings), set(rel.cousins)]
        assert sum(len(g) for g in groups) == len(set().union(*groups))
        assert owner not in set().union(*groups)
        assert rel.members == {owner, *rel.parents, *rel.siblings, *rel.cousins}
        # one root: everyone is family of everyone
        assert rel.members == set(fam.owners())


def test_owners_without_budgets_link_nothing() -> None:
    """A shared prefix is not a family: no Budget for org:ai, so its teams are strangers."""
    fam = Family(
        [
            budget("org:ai:a", env("e", 1)),
            budget("org:ai:b", env("e", 1)),
            budget("org:partner:vision", env("e", 1)),
        ]
    )
    assert fam.owners() == ("org:ai:a", "org:ai:b", "org:partner:vision")
    for owner in fam.owners():
        assert fam.relatives(owner).members == {owner}
    assert not fam.is_family("org:ai:a", "org:ai:b")
    assert not fam.is_family("org:ai:a", "org:partner:vision")
    assert fam.direct_parents("org:ai:a") == ()


def test_a_root_budget_makes_the_teams_family() -> None:
    fam = Family(
        [
            budget("org:ai", env("e", 1)),
            budget("org:ai:a", env("e", 1)),
            budget("org:ai:b", env("e", 1)),
            budget("org:partner:vision", env("e", 1)),
        ]
    )
    assert fam.siblings_of("org:ai:a") == ("org:ai:b",)
    assert fam.parents_of("org:ai:a") == ("org:ai",)
    assert not fam.is_family("org:ai:a", "org:partner:vision")


def test_path_parent_is_only_the_immediate_one() -> None:
    """org:ai exists but org:ai:rai does not: org:ai:rai:sys is a root until it names a parent."""
    fam = Family([budget("org:ai", env("e", 1)), budget("org:ai:rai:sys", env("e", 1))])
    assert fam.parents_of("org:ai:rai:sys") == ()
    linked = Family(
        [
            budget("org:ai", env("e", 1)),
            budget("org:ai:rai:sys", env("e", 1), parents=["org:ai"]),
        ]
    )
    assert linked.parents_of("org:ai:rai:sys") == ("org:ai",)
    assert linked.cousins_of("org:ai") == ("org:ai:rai:sys",)


def test_separate_roots_are_not_family() -> None:
    fam = Family(
        [budget("org", env("e", 1)), budget("org:a", env("e", 1)), budget("other:b", env("e", 1))]
    )
    assert fam.cousins_of("org:a") == ()
    assert not fam.is_family("org:a", "other:b")
    assert fam.is_family("org:a", "org")


def test_explicit_parents_override_the_path() -> None:
    fam = Family(
        [
            budget("org", env("e", 1)),
            budget("org:ai", env("e", 1)),
            budget("team:x", env("e", 1), parents=["org:ai"]),
            budget("org:ai:y", env("e", 1)),
        ]
    )
    assert fam.parents_of("team:x") == ("org:ai", "org")
    assert fam.siblings_of("team:x") == ("org:ai:y",)
    assert fam.siblings_of("org:ai:y") == ("team:x",)


def test_explicit_parents_without_a_budget_link_nothing() -> None:
    """Naming a parent nobody budgets relates nobody (and does not fall back to the path)."""
    fam = Family(
        [
            budget("org:ai", env("e", 1)),
            budget("org:ai:a", env("e", 1), parents=["org:ghost"]),
            budget("org:ai:b", env("e", 1), parents=["org:ghost"]),
        ]
    )
    assert fam.direct_parents("org:ai:a") == ()
    assert not fam.is_family("org:ai:a", "org:ai:b")
    assert not fam.is_family("org:ai:a", "org:ai")


def test_naming_the_others_parent_relates_two_teams() -> None:
    fam = Family(
        [
            budget("org:x", env("e", 1)),
            budget("org:x:a", env("e", 1)),
            budget("lab:b", env("e", 1), parents=["org:x"]),
        ]
    )
    assert fam.siblings_of("org:x:a") == ("lab:b",)


def test_multiple_explicit_parents_make_a_dag() -> None:
    fam = Family(
        [
            budget("org", env("e", 1)),
            budget("org:a", env("e", 1)),
            budget("org:b", env("e", 1)),
            budget("joint", env("e", 1), parents=["org:a", "org:b"]),
            budget("org:a:k", env("e", 1)),
            budget("org:b:k", env("e", 1)),
        ]
    )
    assert fam.parents_of("joint") == ("org:a", "org:b", "org")
    assert fam.siblings_of("joint") == ("org:a:k", "org:b:k")


def test_unknown_owner_has_no_relatives() -> None:
    fam = _tree()
    assert fam.relatives("org:ai:rai:new").members == {"org:ai:rai:new"}
    assert fam.envelopes_of("org:ai:rai:new") == ()


def test_updated_applies_budget_events_and_keeps_what_they_cannot_change() -> None:
    fam = _tree()
    rel = fam.relatives("org:ai:rai:sys")
    fam.candidates("org:fin", "H100-80GB")
    # An envelope change keeps the tree: relations are reused, changed owners are re-listed.
    bigger = fam.updated([budget("org:ai:rai:ml", env("e", 64))])
    assert bigger.relatives("org:ai:rai:sys") is rel
    assert [e.concurrency for e in bigger.envelopes_of("org:ai:rai:ml")] == [64]
    assert [e.concurrency for e in fam.envelopes_of("org:ai:rai:ml")] == [8]
    cands = bigger.candidates("org:ai:rai:sys", "H100-80GB")
    assert [e.concurrency for _, e in cands.siblings] == [64]
    # Deleting the root Budget splits the tree: org:ai and org:fin are strangers now.
    split = bigger.updated(deletes=["org"])
    assert not split.is_family("org:ai", "org:fin")
    assert split.parents_of("org:ai:rai:sys") == ("org:ai:rai", "org:ai")
    again = split.updated([budget("org", env("e", 8))])
    assert again.is_family("org:ai", "org:fin")
    rebuilt = Family(again.budgets)
    for owner in rebuilt.owners():
        assert again.relatives(owner) == rebuilt.relatives(owner)
        assert again.candidates(owner, "H100-80GB") == rebuilt.candidates(owner, "H100-80GB")


def test_envelopes_in_budget_name_then_declaration_order() -> None:
    fam = Family(
        [
            budget("org:a", env("z", 1), env("y", 1), name="b2"),
            budget("org:a", env("x", 1), name="b1"),
        ]
    )
    assert [e.key for e in fam.envelopes_of("org:a")] == ["b1/x", "b2/z", "b2/y"]
    assert [e.key for e in fam.all_envelopes()] == ["b1/x", "b2/z", "b2/y"]
    assert fam.envelope("b2/y").name == "y"
    with pytest.raises(KeyError):
        fam.envelope("b3/q")


def test_caps_for_resolves_names_and_keys() -> None:
    b = budget(
        "org:a",
        env("e1", 8),
        env("e2", 8),
        caps=[cap("both", ["e1", "e2"], max_concurrency=10)],
    )
    fam = Family([b])
    assert [c.key for c in fam.caps_for(key("org:a", "e1"))] == ["org-a/both"]
    assert fam.caps_for("nobody/x") == ()
    assert len(fam.caps()) == 1


def test_duplicate_envelope_key_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate envelope"):
        Family([budget("org:a", env("e", 1), env("e", 2))])


def test_cycle_in_explicit_parents_is_safe() -> None:
    fam = Family(
        [
            budget("a", env("e", 1), parents=["b"]),
            budget("b", env("e", 1), parents=["a"]),
        ]
    )
    assert fam.parents_of("a") == ("b",)
    assert "a" not in fam.cousins_of("a")


@settings(max_examples=150, deadline=None)
@given(cover_lazy.budgets(), cover_lazy.budgets(), st.data())
def test_updated_equals_a_rebuild_after_any_budget_events(
    first: list[Budget], second: list[Budget], data: st.DataObject
) -> None:
    """Any sequence of upserts and deletes gives the index a rebuild from scratch would."""
    fam = Family(first)
    for owner in fam.owners():  # memoised relations must not go stale
        fam.relatives(owner)
        fam.candidates(owner, H100)
    names = {b.name for b in first}
    events = data.draw(
        st.lists(st.sampled_from(second) | st.sampled_from(sorted(names)), max_size=6)
    )
    current = {b.name: b for b in first}
    for event in events:
        if isinstance(event, str):
            fam = fam.updated(deletes=[event])
            current.pop(event, None)
        else:
            fam = fam.updated([event])
            current[event.name] = event
    fresh = Family(current.values())
    assert fam.budgets == fresh.budgets and fam.owners() == fresh.owners()
    assert fam.all_envelopes() == fresh.all_envelopes() and fam.caps() == fresh.caps()
    for e in fresh.all_envelopes():
        assert fam.envelope(e.key) == e and fam.caps_for(e.key) == fresh.caps_for(e.key)
    for owner in (*cover_lazy.OWNERS, *fresh.owners()):
        assert fam.direct_parents(owner) == fresh.direct_parents(owner)
        assert fam.relatives(owner) == fresh.relatives(owner)
        assert fam.envelopes_of(owner) == fresh.envelopes_of(owner)
        assert fam.candidates(owner, H100) == fresh.candidates(owner, H100)
        for other in fresh.owners():
            assert fam.is_family(owner, other) == (other in fresh.relatives(owner).members)
