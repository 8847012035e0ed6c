"""The generic budget search (onnxshrink.quant.budget) on made-up error functions."""

from __future__ import annotations

from onnxshrink.quant.budget import decline_fewest, grant_most, rank


def _errors_by_count(per_unit: dict[str, float]):
    """A candidate is the set of units declined; its error is what the others contribute."""

    def build(declined):
        return frozenset(declined)

    def error(declined, _k):
        return sum(v for u, v in per_unit.items() if u not in declined)

    return build, error


def test_rank_largest_first_ties_in_order() -> None:
    values = {"a": 0.1, "b": 0.5, "c": 0.1, "d": 0.3}
    seen = []
    ranked = rank(
        list(values),
        lambda u: values[u],
        progress=lambda done, total: seen.append((done, total)),
    )
    assert ranked == [("b", 0.5), ("d", 0.3), ("a", 0.1), ("c", 0.1)]
    assert seen[-1] == (4, 4)


def test_decline_fewest_finds_the_least_k_with_few_measurements() -> None:
    units = [f"u{i}" for i in range(64)]
    per_unit = {u: 1.0 / (i + 1) ** 2 for i, u in enumerate(units)}  # ranked already
    build, error = _errors_by_count(per_unit)
    total = sum(per_unit.values())
    budget = total - sum(list(per_unit.values())[:5]) + 1e-9  # exactly k = 5 meets it
    search = decline_fewest(units, build, error, budget)
    assert search.k == 5 and search.built == frozenset(units[:5])
    assert search.error <= budget
    assert len(search.steps) <= 2 * 6 + 1  # about 2 log2(64)
    assert [s.k for s in search.steps][:4] == [1, 2, 4, 8]  # galloping first


def test_decline_fewest_when_even_everything_fails() -> None:
    build = lambda declined: frozenset(declined)  # noqa: E731
    search = decline_fewest(["a", "b"], build, lambda built, k: 1.0, 0.5)
    assert search.built is None and search.k == 2 and [s.k for s in search.steps] == [1, 2]


def test_grant_most_longest_prefix() -> None:
    items = ["w1", "w2", "w3", "w4", "w5"]
    cost = {"w1": 0.1, "w2": 0.1, "w3": 0.5, "w4": 0.1, "w5": 0.1}

    def build(granted):
        return tuple(granted)

    def error(granted, _j):
        return sum(cost[i] for i in granted)

    search = grant_most(items, build, error, 0.25)
    assert search.k == 2 and search.built == ("w1", "w2")
    everything = grant_most(items, build, error, 10.0)
    assert everything.k == 5 and len(everything.steps) == 1  # one measurement when all pass
    nothing = grant_most(items, build, error, 0.05)
    assert nothing.k == 0 and nothing.built is None


def test_isolate_finds_the_culprits_in_few_measurements() -> None:
    from onnxshrink.quant.budget import isolate

    units = [f"u{i}" for i in range(200)]
    culprits = {"u17", "u150"}
    calls = []

    def fails_alone(group):
        calls.append(len(group))
        return bool(culprits & set(group))

    assert sorted(isolate(units, fails_alone)) == sorted(culprits)
    assert len(calls) <= 2 * 2 * 8  # about 2 k log2(N)
    # a failure that needs two units together keeps their smallest common group whole
    assert isolate(units[:8], lambda g: {"u0", "u1"} <= set(g)) == ["u0", "u1"]
    straddling = isolate(units[:8], lambda g: {"u3", "u4"} <= set(g))
    assert straddling == units[:8]  # split between the halves: the whole group
