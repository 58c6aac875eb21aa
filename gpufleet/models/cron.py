"""dstack's `schedule: {cron: ...}`: five-field cron expressions, read as dstack reads them, and the
next time one fires. Pure: no clock (the caller says what "now" is), no I/O.

dstack (0.19/0.20) reads each expression with APScheduler 3's `CronTrigger.from_crontab(expr,
timezone=UTC)` (checked at dstack 511c318c8, src/dstack/_internal/utils/cron.py and
services/runs/__init__.py), and so does this module, with its rules written out here:

- five fields split on whitespace: minute (0-59), hour (0-23), day of month (1-31), month (1-12 or
  jan-dec), day of week (0-6 or mon-sun: **0 is Monday**, as dstack's docs say; 7 is refused);
- each field a comma list of `*`, `*/S`, `N`, `N-M`, `N-M/S`, `N/S` (N, N+S, ... to the field's
  end), names and name ranges (`mon-fri`, `jan-mar`, any case) in the month and day-of-week
  fields, and `last` (the month's last day) in the day-of-month field; a range never wraps
  (`fri-mon` is refused), a step is at least 1 and at most the span it steps through;
- every field must match (a day of month *and* a day of week, when both are given: APScheduler's
  rule, not POSIX cron's "either");
- times are UTC; a run fires on the minute (second 0); the next time is the first such minute at or
  after "now".

What APScheduler would take and silently drop is refused instead: a step after names (`mon-fri/2`:
APScheduler ignores the `/2`). Forms it does not take (`?`, `L`, `W`, `#`, `@daily`, `7` for
Sunday) are refused with the field and why. An expression that can never fire (`0 0 30 2 *`) is
refused too (dstack would accept it and then fail to compute its time).
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache

MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # 0 is Monday, as in dstack
# (name, lowest, highest, names or None)
FIELDS = (("minute", 0, 59, None), ("hour", 0, 23, None), ("day of month", 1, 31, None),
          ("month", 1, 12, MONTHS), ("day of week", 0, 6, WEEKDAYS))
FORMS = "`*`, `*/S`, `N`, `N-M`, `N-M/S`, `N/S` or a comma list of them"
_NUMBERS = re.compile(r"(?P<first>\d+)(?:-(?P<last>\d+))?(?:/(?P<step>\d+))?")
_ALL = re.compile(r"\*(?:/(?P<step>\d+))?")
_NAMES = re.compile(r"(?P<first>[a-z]+)(?:-(?P<last>[a-z]+))?(?P<rest>.*)", re.I)
_SEARCH_DAYS = 146097  # 400 years: the Gregorian calendar repeats, so a date that exists occurs in them


@dataclass(frozen=True)
class Cron:
    """One cron expression, read: the values each field lets through (``last_day``: the day of
    month field also takes each month's last day)."""

    text: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    last_day: bool = False

    def _day_matches(self, day: date) -> bool:
        if day.month not in self.months or day.weekday() not in self.weekdays:
            return False
        return day.day in self.days or (self.last_day and day.day == calendar.monthrange(day.year, day.month)[1])

    def next_at(self, now: float) -> float | None:
        """The first time (epoch seconds, UTC, on a whole minute) at or after ``now`` that this
        expression fires; None if it never does (refused by parse_cron, so never None for one read)."""
        start = datetime.fromtimestamp(-(-now // 60) * 60, UTC)  # the first whole minute at or after now
        day = start.date()
        end = day + timedelta(days=_SEARCH_DAYS)
        while day < end:
            if day.month not in self.months:  # skip to the first day of the next month
                day = (day.replace(day=1) + timedelta(days=32)).replace(day=1)
                continue
            if self._day_matches(day):
                after = (start.hour, start.minute) if day == start.date() else (0, 0)
                for h in self.hours:
                    if h < after[0]:
                        continue
                    m = next((m for m in self.minutes if h > after[0] or m >= after[1]), None)
                    if m is not None:
                        return datetime(day.year, day.month, day.day, h, m, tzinfo=UTC).timestamp()
            day += timedelta(days=1)
        return None


def _number(text: str, field: str, lo: int, hi: int) -> int:
    n = int(text)
    if not lo <= n <= hi:
        extra = " (0 is Monday, as in dstack; Sunday is 6 or sun)" if field == "day of week" else ""
        raise ValueError(f"{field} {n} is out of range {lo}-{hi}{extra}")
    return n


def _step(text: str | None, field: str, span: int) -> int:
    if text is None:
        return 1
    step = int(text)
    if step < 1:
        raise ValueError(f"{field}: a step must be 1 or more (got /{text})")
    if step > span:
        raise ValueError(f"{field}: the step /{step} is larger than the span it steps through ({span})")
    return step


def _item(item: str, field: str, lo: int, hi: int, names: tuple[str, ...] | None) -> tuple[set[int], bool]:
    """The values one comma-separated item of a field lets through, and whether it is `last`."""
    if field == "day of month" and item.lower() == "last":
        return set(), True
    if m := _ALL.fullmatch(item):
        return set(range(lo, hi + 1, _step(m["step"], field, hi - lo))), False
    if m := _NUMBERS.fullmatch(item):
        first = _number(m["first"], field, lo, hi)
        last = _number(m["last"], field, lo, hi) if m["last"] else (hi if m["step"] else first)
        if first > last:
            raise ValueError(f"{field}: the range {item!r} runs backwards (a range never wraps around)")
        return set(range(first, last + 1, _step(m["step"], field, last - first))), False
    if names and (m := _NAMES.fullmatch(item)):
        def index(name: str) -> int:
            if name.lower() not in names:
                raise ValueError(f"{field}: {name!r} is not one of {', '.join(names)}")
            return names.index(name.lower()) + lo
        first = index(m["first"])
        last = index(m["last"]) if m["last"] else first
        if m["rest"]:
            raise ValueError(f"{field}: {item!r}: names take no step or suffix (dstack would ignore "
                             f"{m['rest']!r}); write the values, e.g. `mon,wed,fri`")
        if first > last:
            raise ValueError(f"{field}: the range {item!r} runs backwards (a range never wraps around)")
        return set(range(first, last + 1)), False
    named = f", or {names[0]}-{names[-1]} names" if names else ", or `last`" if field == "day of month" else ""
    raise ValueError(f"{field}: {item!r} is not a cron value: {FORMS}{named}")


@lru_cache(maxsize=1024)
def parse_cron(text: str) -> Cron:
    """A five-field cron expression as dstack reads it (see the module's doc); ValueError says
    which field is wrong and why."""
    parts = text.split()
    if text.strip().startswith("@"):
        raise ValueError(f"{text.strip()!r}: cron nicknames are not taken (nor by dstack): write the five fields, "
                         f"e.g. '0 0 * * *' for @daily")
    if len(parts) != 5:
        raise ValueError(f"{text!r} has {len(parts)} fields; a cron expression has 5: minute hour "
                         f"day-of-month month day-of-week (e.g. '15 23 * * *')")
    values: list[set[int]] = []
    last_day = False
    for part, (field, lo, hi, names) in zip(parts, FIELDS, strict=True):
        got: set[int] = set()
        for item in part.split(","):
            if not item:
                raise ValueError(f"{field}: {part!r} has an empty item")
            more, last = _item(item, field, lo, hi, names)
            got |= more
            last_day = last_day or last
        values.append(got)
    minutes, hours, days, months, weekdays = values
    # a day that exists: in some month allowed, a day allowed (Feb 29 exists; dates recur with every weekday)
    longest = {m: (29 if m == 2 else calendar.monthrange(2001, m)[1]) for m in months}
    if not last_day and not any(d <= longest[m] for m in months for d in days):
        raise ValueError(f"{text!r} never fires: no month allowed has the days it names")
    return Cron(text=text, minutes=tuple(sorted(minutes)), hours=tuple(sorted(hours)), days=frozenset(days),
                months=frozenset(months), weekdays=frozenset(weekdays), last_day=last_day)


def next_start(crons: list[str] | tuple[str, ...], now: float) -> float | None:
    """The earliest time at or after ``now`` that any of ``crons`` fires (None: none ever does)."""
    times = [t for t in (parse_cron(c).next_at(now) for c in crons) if t is not None]
    return min(times) if times else None


def utc_text(t: float) -> str:
    """`2026-12-03 23:15 UTC`."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")
