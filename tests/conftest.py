"""Shared fixtures.

`embedded_run` (session scope): ONE `snakemake --profile embedded` run (every table and
figure) in a scratch copy of the repository, shared by tests/test_workflow_e2e.py and
tests/test_report_workflow.py; returns (copy, wall seconds)."""

from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="session")
def embedded_run(tmp_path_factory):
    from slurm.workspace import copy_repo, snakemake

    root = copy_repo(tmp_path_factory.mktemp("embedded") / "repo")
    t0 = time.time()
    snakemake(
        root, "--profile", "embedded", timeout=3600, MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}"
    )
    seconds = time.time() - t0
    (root / "embedded-wall-seconds.txt").write_text(f"{seconds:.0f}\n")
    print(f"\nembedded workflow: {seconds:.0f} s")
    return root, seconds


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors: one intra-op thread is fastest, and robust on a shared 2-core runner."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
