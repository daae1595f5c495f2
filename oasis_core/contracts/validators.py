"""Shared checks of option values and function arguments: one validator per kind of value.

A :class:`Check` is three things at once:

* an ``attrs`` validator (``check(instance, attribute, value)``), so that an ``Options`` or
  settings object built directly from Python refuses a bad value exactly as the
  configuration file does;
* a description in words for error messages (:meth:`Check.words`: ``"a finite number in
  [0, 1]"``) and in short for the rendered ``oasis.toml`` (:meth:`Check.short`: ``"[0, 1]"``);
* a check of a plain function argument (:meth:`Check.require`), for the numeric
  parameters of ``oasis demo``, ``oasis sim`` and ``oasis compare``.

Options declare their check through :func:`oasis_core.contracts.backends.option` (``range=``,
``choices=``); plugins never write their own range or choice validators.

A number is refused when it is NaN (unless the check says ``nan=True``) or infinite
(unless the range has that infinity as a closed bound, e.g. ``in_range(-math.inf, None)``).

Examples
--------
>>> fraction.words()
'a finite number in [0, 1]'
>>> fraction.test(float("nan"))
False
>>> in_range(0, 1, lo_open=True).short()
'(0, 1]'
>>> positive.require(3, "n_fakes", "oasis sim fakes")
3
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from oasis_core.contracts.errors import InputError

__all__ = [
    "Check",
    "InRange",
    "OneOf",
    "OptionValueError",
    "Satisfies",
    "finite",
    "fraction",
    "in_range",
    "integer",
    "non_negative",
    "one_of",
    "positive",
    "satisfies",
    "show",
]


def show(value: Any) -> str:
    """A value as a user wrote it: numbers as TOML spells them (``nan``, ``-inf``),
    strings quoted.

    Examples
    --------
    >>> show(float("nan")), show(-4.5), show("best")
    ('nan', '-4.5', "'best'")
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return repr(float(value))
    return repr(value)


def _num(x: float) -> str:
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class OptionValueError(ValueError):
    """A value outside what its check allows.

    ``str()`` is ``"<owner>: <name> = <value>: must be <words>"`` (``owner`` the options
    class, when known); the configuration names where the value came from instead
    (``configs/oasis.toml: [subtract] q_floor = nan: must be ...``).

    Attributes
    ----------
    name : str
        The option (or argument) name.
    value : object
        The value refused.
    expected : str
        What it must be, in words (:meth:`Check.words`).
    owner : str
        The class whose option it is ('' when not known).
    """

    def __init__(self, name: str, value: Any, expected: str, owner: str = "") -> None:
        self.name = name
        self.value = value
        self.expected = expected
        self.owner = owner
        super().__init__((f"{owner}: " if owner else "") + self.assignment())

    def assignment(self) -> str:
        """``"<name> = <value>: must be <words>"``."""
        return f"{self.name} = {show(self.value)}: must be {self.expected}"


class Check:
    """Base of the shared checks (see the module docstring)."""

    def test(self, value: Any) -> bool:
        """True when ``value`` is allowed."""
        raise NotImplementedError

    def words(self) -> str:
        """What an allowed value is, for messages: ``"a finite number > 0"``."""
        raise NotImplementedError

    def short(self) -> str:
        """The allowed values in short, for the comments of ``oasis.toml``: ``"(0, inf)"``
        ('' when the help says it already)."""
        return self.words()

    def __call__(self, instance: Any, attribute: Any, value: Any) -> None:
        """The ``attrs`` validator: raise :class:`OptionValueError` for a bad value."""
        if not self.test(value):
            owner = type(instance).__name__ if instance is not None else ""
            raise OptionValueError(attribute.name, value, self.words(), owner)

    def require(self, value: Any, name: str, where: str) -> Any:
        """Return ``value`` if allowed, else raise a one-line
        :class:`~oasis_core.contracts.errors.InputError`
        ``"<where>: <name> = <value>: must be ..."``.

        Parameters
        ----------
        value : object
            A function argument.
        name : str
            The argument's name as the user gave it (``"--size"``, ``"n_fakes"``).
        where : str
            The command or function (``"oasis demo"``).
        """
        if not self.test(value):
            raise InputError(f"{where}: {name} = {show(value)}: must be {self.words()}")
        return value


@attrs.frozen
class InRange(Check):
    """A number between ``lo`` and ``hi`` (``None``: unbounded on that side).

    Attributes
    ----------
    lo, hi : float or None
        The bounds; an infinite closed bound admits that infinity.
    lo_open, hi_open : bool
        Exclude the bound itself.
    nan : bool
        NaN is a valid value (it never is otherwise).
    integer : bool
        The value must be an integer (set by :func:`~oasis_core.contracts.backends.option` for
        options whose default is an ``int``).
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    nan: bool = False
    integer: bool = False

    def _allows_inf(self, sign: int) -> bool:
        bound, is_open = (self.hi, self.hi_open) if sign > 0 else (self.lo, self.lo_open)
        return bound is not None and math.isinf(bound) and (bound > 0) == (sign > 0) and not is_open

    def test(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if isinstance(value, numbers.Integral):
            v: Any = int(value)  # compared exactly, however large
        elif self.integer:
            return False
        else:
            v = float(value)
            if math.isnan(v):
                return self.nan
            if math.isinf(v):
                return self._allows_inf(1 if v > 0 else -1)
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def _finite_bounds(self) -> tuple[float | None, float | None]:
        lo = None if self.lo is None or math.isinf(self.lo) else self.lo
        hi = None if self.hi is None or math.isinf(self.hi) else self.hi
        return lo, hi

    def words(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        lo, hi = self._finite_bounds()
        lo_s = f"{'>' if self.lo_open else '>='} {_num(lo)}" if lo is not None else ""
        hi_s = f"{'<' if self.hi_open else '<='} {_num(hi)}" if hi is not None else ""
        if lo is not None and hi is not None:
            text = f"{kind} in {self._interval()}"
        elif lo_s or hi_s:
            text = f"{kind} {lo_s or hi_s}"
        else:
            text = kind
        extra = [
            s for s, ok in (("-inf", self._allows_inf(-1)), ("inf", self._allows_inf(1))) if ok
        ]
        if self.nan:
            extra.append("nan")
        return " or ".join([text, *extra])

    def _interval(self) -> str:
        left = "(-inf" if self.lo is None else ("(" if self.lo_open else "[") + _num(self.lo)
        right = "inf)" if self.hi is None else _num(self.hi) + (")" if self.hi_open else "]")
        return f"{left}, {right}"

    def short(self) -> str:
        return self._interval() + (" or nan" if self.nan else "")


@attrs.frozen
class OneOf(Check):
    """One of a fixed set of values (compared with ``==``)."""

    choices: tuple[Any, ...]

    def test(self, value: Any) -> bool:
        return any(value == c and type(value) is type(c) for c in self.choices)

    def words(self) -> str:
        return "one of " + ", ".join(str(c) for c in self.choices)

    def short(self) -> str:
        return "{" + ", ".join(str(c) for c in self.choices) + "}"


@attrs.frozen
class Satisfies(Check):
    """A value for which ``predicate(value)`` is true (for checks no range expresses)."""

    predicate: Callable[[Any], bool]
    description: str
    brief: str = ""

    def test(self, value: Any) -> bool:
        try:
            return bool(self.predicate(value))
        except (TypeError, ValueError):
            return False

    def words(self) -> str:
        return self.description

    def short(self) -> str:
        return self.brief


def in_range(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    nan: bool = False,
) -> InRange:
    """A number in ``[lo, hi]`` (``lo_open``/``hi_open`` exclude a bound; ``None``: no bound).

    Examples
    --------
    >>> in_range(0, 1, lo_open=True).words()
    'a finite number in (0, 1]'
    >>> in_range(-math.inf, None).words()
    'a finite number or -inf'
    """
    return InRange(lo, hi, lo_open, hi_open, nan)


def integer(lo: int | None = None, hi: int | None = None) -> InRange:
    """An integer in ``[lo, hi]`` (``None``: no bound), e.g. ``integer(1)`` for a count.

    Examples
    --------
    >>> integer(1).words(), integer(1).test(2.0)
    ('an integer >= 1', False)
    """
    return InRange(lo, hi, integer=True)


def one_of(*choices: Any) -> OneOf:
    """One of ``choices``.

    Examples
    --------
    >>> one_of("snr", "seeing").words()
    'one of snr, seeing'
    """
    if len(choices) == 1 and isinstance(choices[0], Sequence) and not isinstance(choices[0], str):
        choices = tuple(choices[0])
    return OneOf(tuple(choices))


def satisfies(predicate: Callable[[Any], bool], description: str, brief: str = "") -> Satisfies:
    """A specific check: ``predicate`` says whether a value is valid (it may raise
    ``ValueError``/``TypeError`` for an invalid one); ``description`` says in words what a
    valid value is (after "must be"); ``brief``, if any, is shown in ``oasis.toml``."""
    return Satisfies(predicate, description, brief)


#: A number > 0.
positive = in_range(0, None, lo_open=True)
#: A number >= 0.
non_negative = in_range(0, None)
#: A number in [0, 1].
fraction = in_range(0, 1)
#: Any finite number.
finite = in_range()
