"""`spec.after`: wait for upstream Runs to Complete, fail when one fails."""

from __future__ import annotations

from shared.control.dependencies import Ready, UpstreamFailed, Waiting, check_after


def test_no_after_is_ready() -> None:
    assert check_after(None, {}) == Ready()
    assert check_after([], {"a": "Failed"}) == Ready()


def test_all_completed_is_ready() -> None:
    assert check_after(["a", "b"], {"a": "Completed", "b": "Completed"}) == Ready()


def test_running_and_missing_upstreams_wait() -> None:
    verdict = check_after(["a", "b", "c"], {"a": "Completed", "b": "Running"})
    assert verdict == Waiting(pending=("b", "c"), missing=("c",))
    assert isinstance(verdict, Waiting)
    assert verdict.reason == "WaitingForUpstream"
    assert verdict.message == ("WaitingForUpstream: waiting for b to complete; not found yet: c")


def test_upstream_without_phase_waits() -> None:
    assert check_after(["a"], {"a": None}) == Waiting(pending=("a",), missing=())


def test_any_failed_upstream_fails_even_if_others_wait() -> None:
    verdict = check_after(["a", "b", "c"], {"a": "Running", "b": "Failed", "c": "Failed"})
    assert verdict == UpstreamFailed(("b", "c"))
    assert isinstance(verdict, UpstreamFailed)
    assert verdict.reason == "UpstreamFailed"
    assert verdict.message == "UpstreamFailed: upstream Run(s) b, c failed"


def test_duplicates_are_judged_once() -> None:
    assert check_after(["a", "a"], {}) == Waiting(pending=("a",), missing=("a",))
