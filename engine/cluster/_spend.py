"""The run's budget on a cluster: call permits leased like the rate.

A local run checks its `BudgetMeter` before every attempt.  Workers are other
processes: the driver's meter cannot be checked there, and the driver sees a batch's
cost only when the batch comes back.  So one `SpendLedger` actor per cluster keeps an
account per evaluation: what the driver's meter allowed when the evaluation started
(`Allowance`), the call permits it has granted, and the usage workers report.

- A worker cannot start a call without a permit (`SpendLease`, held by its
  `LeasedModel`).  Permits come a few at a time (the worker's concurrency share) and
  are refused once the call cap is granted out or the reported tokens or cost reach
  theirs: the cluster overshoots a cap by at most the permits held at once (the calls
  in flight), as a local run overshoots by its calls in flight.
- A granted permit is a paid call until a worker returns it unused.  When the
  evaluation ends the driver settles the account: calls and usage the ledger knows of
  beyond what the delivered batches charged (the calls of a worker that died, whose
  batches never came back) are charged to the run's meter; the tokens of calls whose
  usage was never reported are estimated at the average of those reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import anyio

from .._budget import BudgetMeter, Price
from .._errors import BudgetExceededError
from .._types import Usage

__all__ = ["Allowance", "SpendLease", "SpendLedger", "Spent"]


@dataclass(frozen=True, slots=True)
class Allowance:
    """The run's caps and what its meter had counted when an evaluation started.

    Only the evaluated prompt's ``model`` is called through the cluster's endpoint;
    ``price`` is its price (None when none is known and no cost cap is set).
    """

    model: str
    max_calls: int | None = None
    max_tokens: int | None = None
    max_cost: float | None = None
    calls_before: int = 0
    tokens_before: int = 0
    cost_before: float = 0.0
    price: Price | None = None

    @classmethod
    def of(cls, meter: BudgetMeter, model: str) -> Allowance:
        """The allowance ``meter`` leaves for calls of ``model``."""
        budget = meter.budget
        return cls(
            model=model,
            max_calls=budget.max_calls,
            max_tokens=budget.max_tokens,
            max_cost=budget.max_cost,
            calls_before=meter.total_calls,
            tokens_before=meter.total_tokens,
            cost_before=meter.cost or 0.0,
            price=budget.price_table().get(model),
        )


@dataclass(frozen=True, slots=True)
class Spent:
    """What an evaluation's calls cost by the ledger: calls paid (granted, not handed
    back) and their usage (reported, plus an estimate for calls that never reported)."""

    calls: int
    usage: Usage


class _Account:
    __slots__ = ("allowance", "granted", "reported", "returned", "usage")

    def __init__(self, allowance: Allowance) -> None:
        self.allowance = allowance
        self.granted = 0  # permits handed out
        self.returned = 0  # ... handed back unused
        self.reported = 0  # calls whose usage was reported (failed ones with none)
        self.usage = Usage()

    def add(self, calls: int, usage: Usage) -> None:
        self.reported += calls
        self.usage = self.usage + usage

    @property
    def calls(self) -> int:
        return self.granted - self.returned

    def exceeded(self) -> str | None:
        """Why no more permits may be granted, as `BudgetMeter.check` words it."""
        a = self.allowance
        calls = a.calls_before + self.calls
        tokens = a.tokens_before + self.usage.total_tokens
        cost = a.cost_before + (a.price.cost(self.usage) if a.price is not None else 0.0)
        if a.max_calls is not None and calls >= a.max_calls:
            return f"call budget reached ({calls} >= {a.max_calls})"
        if a.max_tokens is not None and tokens >= a.max_tokens:
            return f"token budget reached ({tokens} >= {a.max_tokens})"
        if a.max_cost is not None and cost >= a.max_cost:
            return f"money budget reached (${cost:.4f} >= ${a.max_cost})"
        return None

    def spent(self) -> Spent:
        unreported = max(0, self.calls - self.reported)
        usage = self.usage
        if unreported and self.reported:
            # a dead worker's last calls: paid, their usage never seen; the average
            usage = usage + Usage(
                math.ceil(usage.prompt_tokens * unreported / self.reported),
                math.ceil(usage.completion_tokens * unreported / self.reported),
            )
        return Spent(self.calls, usage)


class SpendLedger:
    """Every cluster evaluation's budget account (the body of one Ray actor, made once
    per cluster, as the racing tally is)."""

    def __init__(self) -> None:
        self.accounts: dict[str, _Account] = {}

    def open(self, job: str, allowance: Allowance) -> None:
        """Before the first call of ``job``."""
        self.accounts[job] = _Account(allowance)

    def take(self, job: str, want: int, calls: int, usage: Usage) -> tuple[int, str | None]:
        """Report ``calls`` made since the last report and their ``usage``; up to
        ``want`` permits, or none and the reason (a cap is reached)."""
        account = self.accounts.get(job)
        if account is None:
            return 0, "the evaluation is over"
        account.add(calls, usage)
        reason = account.exceeded()
        if reason is not None:
            return 0, reason
        count = max(1, want)
        cap = account.allowance.max_calls
        if cap is not None:
            count = min(count, cap - account.allowance.calls_before - account.calls)
        account.granted += count
        return count, None

    def give_back(self, job: str, unused: int, calls: int, usage: Usage) -> None:
        """A worker's evaluation ended: its ``unused`` permits and its last report."""
        account = self.accounts.get(job)
        if account is not None:
            account.returned += unused
            account.add(calls, usage)

    def settle(self, job: str) -> Spent | None:
        """What ``job`` cost by the ledger; forgets it."""
        account = self.accounts.pop(job, None)
        return account.spent() if account is not None else None


class SpendLease:
    """A worker's permits for one evaluation (``ledger``: the `SpendLedger` handle).

    `take` before every attempt (raises `BudgetExceededError` at a cap), `record` after
    it (paid or failed), `unspend` when the attempt was never sent, `release` at the end.
    """

    def __init__(self, ledger: Any, job: str, *, want: int) -> None:
        self.ledger = ledger
        self.job = job
        self.want = want
        self.permits = 0  # granted, not used yet
        self.calls = 0  # made since the last report
        self.usage = Usage()  # ... and their usage
        self._lock = anyio.Lock()  # one request to the ledger at a time

    async def take(self) -> None:
        """Spend one permit, asking the ledger for more when none is left."""
        while self.permits == 0:
            async with self._lock:
                if self.permits:
                    break
                calls, usage = self.calls, self.usage
                self.calls, self.usage = 0, Usage()
                # shielded: a grant that reached the ledger must reach this worker too,
                # or its permits would be charged and never used (a quick answer)
                with anyio.CancelScope(shield=True):
                    granted, reason = await self.ledger.take.remote(
                        self.job, self.want, calls, usage
                    )
                if reason is not None:
                    raise BudgetExceededError(reason)
                self.permits += granted
        self.permits -= 1

    def unspend(self) -> None:
        """The permit taken last was not used (the attempt never went out)."""
        self.permits += 1

    def record(self, usage: Usage | None) -> None:
        """An attempt was made (``usage``: what it used, None when it failed)."""
        self.calls += 1
        if usage is not None:
            self.usage = self.usage + usage

    async def release(self) -> None:
        """Hand back the unused permits and report the last calls."""
        async with self._lock:
            unused, calls, usage = self.permits, self.calls, self.usage
            self.permits, self.calls, self.usage = 0, 0, Usage()
            if unused or calls:
                await self.ledger.give_back.remote(self.job, unused, calls, usage)
