"""Sub-commands of ``mail-ros`` (see mail_ros/cli.py), one module each."""


def parse_pairs(values: list[str], flag: str) -> dict[str, str]:
    """``["a=b", ...]`` from a repeatable NAME=VALUE option -> ``{"a": "b", ...}``; ValueError if malformed."""
    out = {}
    for value in values:
        key, sep, target = value.partition("=")
        if not sep or not key or not target:
            raise ValueError(f"{flag} expects NAME=VALUE, got {value!r}")
        out[key] = target
    return out
