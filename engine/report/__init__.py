"""The run report of `optimize`: JSON, Markdown, HTML and the score plot."""

from ._records import PoolRecord, ProposalRecord, RunRecord, StepRecord
from ._report import RunReport

__all__ = [
    "PoolRecord",
    "ProposalRecord",
    "RunRecord",
    "RunReport",
    "StepRecord",
]
