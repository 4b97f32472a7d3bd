"""``make bench-compare``'s arithmetic: figures collected per side, medians, ratios, the flag."""

from __future__ import annotations

from bench.compare import collect, table


def test_ratios_are_head_over_base_medians_and_slow_figures_are_flagged() -> None:
    samples: dict[str, dict[str, list[float]]] = {}
    for base, head in ((1.0, 1.1), (1.2, 1.0), (1.1, 1.05)):
        collect([{"figure": "steady", "p50_ms": base, "p99_ms": 2 * base}], "base", samples)
        collect([{"figure": "steady", "p50_ms": head, "p99_ms": 2 * head}], "head", samples)
    collect([{"figure": "slow", "p50_ms": 1.0, "p99_ms": 1.0}], "base", samples)
    collect([{"figure": "slow", "p50_ms": 1.5, "p99_ms": 1.2}], "head", samples)
    collect([{"figure": "mem", "rss_growth_mb": 70.0, "target_mb": 200}], "base", samples)
    collect([{"figure": "mem", "rss_growth_mb": 71.0, "target_mb": 200}], "head", samples)
    collect([{"figure": "new", "p50_ms": 0.5, "p99_ms": 0.6}], "head", samples)
    rows, flagged = table(samples, 1.15)
    by_figure = {row.split()[0]: row for row in rows[1:]}
    assert flagged == 1
    assert "SLOWER" in by_figure["slow"] and "1.50" in by_figure["slow"]
    # medians: base 1.1, head 1.05 → 0.95; p99 2.2 vs 2.1
    assert by_figure["steady"].split()[1:4] == ["1.100", "1.050", "0.95"]
    assert "SLOWER" not in by_figure["steady"]
    assert by_figure["mem.rss_growth_mb"].split()[1:4] == ["70.000", "71.000", "1.01"]
    assert "target_mb" not in " ".join(by_figure)
    assert "only in head" in by_figure["new"]
