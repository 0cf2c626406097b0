"""argparse value types shared by the commands: one line saying what the value must be."""

from __future__ import annotations

import argparse

SHOWN = 40  # characters of a bad value repeated in its error


def shown(text: str) -> str:
    """The value as an error repeats it, cut when long (a 5000-digit number stays one short line)."""
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


def positive_int(text: str) -> int:
    value = parse_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {shown(text)}")
    return value


def non_negative_int(text: str) -> int:
    value = parse_int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {shown(text)}")
    return value


def parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {shown(text)!r}") from None


def positive_float(text: str) -> float:
    value = parse_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {shown(text)}")
    return value


def non_negative_float(text: str) -> float:
    value = parse_float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {shown(text)}")
    return value


def parse_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {shown(text)!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {shown(text)}")
    return value


def unit_float(text: str) -> float:
    value = parse_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {shown(text)}")
    return value


def port(text: str) -> int:
    value = parse_int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {shown(text)}")
    return value


def stage_window(text: str):
    """`LO:HI` -> (LO, HI) with 0 <= LO < HI <= 1000, or `auto` -> None."""
    if text == "auto":
        return None
    try:
        lo, hi = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be LO:HI (e.g. 400:800) or auto, got {shown(text)!r}") from None
    if not 0 <= lo < hi <= 1000:
        raise argparse.ArgumentTypeError(f"needs 0 <= LO < HI <= 1000, got {shown(text)}")
    return (lo, hi)
