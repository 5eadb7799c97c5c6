"""The run report of `optimize`: JSON, Markdown, HTML and the score plot."""

from ._report import PoolRecord, ProposalRecord, RunReport, StepRecord

__all__ = [
    "PoolRecord",
    "ProposalRecord",
    "RunReport",
    "StepRecord",
]
