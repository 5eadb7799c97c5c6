"""The run report of `optimize`: JSON, Markdown, HTML and the score plot."""

from ._report import ProposalRecord, RunReport, StepRecord

__all__ = [
    "ProposalRecord",
    "RunReport",
    "StepRecord",
]
