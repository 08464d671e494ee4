"""The workflow's specification, read before anything runs: typed params (`params.py`), the test
protocol (`protocol.py`), the paper's tables (`tables.py`) and the plan of jobs and GPU-hours
(`plan.py`). Below the engine and the analysis: it imports neither (docs/architecture.md)."""
