"""`smallbig plan`: jobs and GPU-hours of the workflow, before anything is submitted.
(Placeholder until the workflow issue fills it in.)"""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="jobs and GPU-hour estimate per table (workflow issue)")
    p.set_defaults(func=lambda args: (print("smallbig plan: not implemented yet"), 1)[1])
