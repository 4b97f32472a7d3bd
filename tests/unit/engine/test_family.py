"""Family tree relations: parents, siblings, cousins (descendants included), caps index."""

from __future__ import annotations

import pytest

from shared.engine.family import Family, path_parent
from tests.unit.engine.budgets import budget, cap, env, key


def _tree() -> Family:
    # org
    # ├── org:ai
    # │   ├── org:ai:rai         (no budget of its own)
    # │   │   ├── org:ai:rai:sys
    # │   │   │   └── org:ai:rai:sys:kid
    # │   │   └── org:ai:rai:ml
    # │   └── org:ai:vision
    # │       └── org:ai:vision:x
    # └── org:fin
    owners = [
        "org",
        "org:ai",
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


def test_parents_nearest_first_through_budgetless_owners() -> None:
    fam = _tree()
    assert fam.parents_of("org:ai:rai:sys") == ("org:ai:rai", "org:ai", "org")
    assert fam.parents_of("org") == ()
    assert "org:ai:rai" in fam.owners()


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


def test_separate_roots_are_not_family() -> None:
    fam = Family([budget("org:a", env("e", 1)), budget("other:b", env("e", 1))])
    assert fam.cousins_of("org:a") == ()
    assert not fam.is_family("org:a", "other:b")
    assert fam.is_family("org:a", "org")


def test_explicit_parents_override_the_path() -> None:
    fam = Family(
        [
            budget("team:x", env("e", 1), parents=["org:ai"]),
            budget("org:ai:y", env("e", 1)),
        ]
    )
    assert fam.parents_of("team:x") == ("org:ai", "org")
    assert fam.siblings_of("team:x") == ("org:ai:y",)
    assert fam.siblings_of("org:ai:y") == ("team:x",)


def test_multiple_explicit_parents_make_a_dag() -> None:
    fam = Family(
        [
            budget("joint", env("e", 1), parents=["org:a", "org:b"]),
            budget("org:a:k", env("e", 1)),
            budget("org:b:k", env("e", 1)),
        ]
    )
    assert fam.parents_of("joint") == ("org:a", "org:b", "org")
    assert fam.siblings_of("joint") == ("org:a:k", "org:b:k")


def test_unknown_owner_still_finds_relatives_by_path() -> None:
    fam = _tree()
    assert fam.siblings_of("org:ai:rai:new") == ("org:ai:rai:ml", "org:ai:rai:sys")
    assert fam.envelopes_of("org:ai:rai:new") == ()


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
