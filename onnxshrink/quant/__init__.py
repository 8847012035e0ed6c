"""The lossy-stage engine: what every lossy rule module (`onnxshrink.rules.int8`, `float16`)
runs on.

- `lossy`: the stage contract (plan, budget, materialize) and the held-out and speed checks.
- `calibration`: calibration data sources, observers and their statistics.
- `schemes`: how one tensor maps to integers, as data.
- `targets`: what each runtime fuses, accepts and runs fast.
- `sensitivity`: the error budget: the float reference outputs, the default budget.
- `budget`: the search for which units to decline so the error stays in budget.

Nothing is re-exported here: import from the modules.
"""
