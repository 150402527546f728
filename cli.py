"""
cli.py -- the command-line kit every script shares, written once.

Each script keeps its own flags and its `main`; what they have in common is here:

  1. OneLineParser      argparse, but a bad flag is refused in one line before any work
  2. Flags from a dataclass   add_fields: one --flag per field, its help the comment written
                        beside the field, its default shown in --help
  3. Numbers and rules  number (an argparse type with a range), check (a table of rules, one
                        message format), first_line (a library's message inside ours),
                        port_in_use (a rendezvous that could not start, in one line)
  4. Progress           one status line: redrawn in place on a terminal, plain lines in a log

This file imports no other file of the project, and nothing in it touches the disk.
"""

import argparse
import dataclasses
import inspect
import io
import math
import sys
import time
import tokenize
import typing


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is refused in one line, `error: MESSAGE; see python PROG --help`,
    before any work; every script's parser is one. The exit status is argparse's 2, or 1 for a
    script whose other refusals are sys.exit("error: ..."): the line is then SystemExit's code.
    Each script names itself in prog (argparse's default, sys.argv[0], is pytest's in a test)."""

    def __init__(self, *args, status: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.status = status

    def error(self, message):
        line = f"error: {message}; see python {self.prog} --help"
        if self.status == 1:
            sys.exit(line)
        self.exit(self.status, line + "\n")


def field_comments(cls) -> dict:
    """{field name: the comment at the end of its line} in a dataclass's source."""
    comments, name = {}, None
    source = inspect.getsource(cls)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and name is None:
            name = tok.string                            # a field's line starts at 4 spaces
        elif tok.type == tokenize.COMMENT and name:
            comments[name] = tok.string.lstrip("# ").strip()
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            name = None
    return comments


def add_fields(parser: argparse.ArgumentParser, cls) -> None:
    """One --flag per field of the dataclass `cls`: --batch-size for batch_size, --sp/--no-sp
    for a bool (or an Optional[bool], unset by default); help is the field's comment, with
    its default. With argument_default=SUPPRESS, a flag left out is absent from the result."""
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        boolean = f.type in (bool, typing.Optional[bool])
        kind = (dict(action=argparse.BooleanOptionalAction) if boolean
                else dict(type=type(f.default)))
        default = "unset" if f.default is None else repr(f.default)
        text = comments.get(f.name, "")
        parser.add_argument("--" + f.name.replace("_", "-"), **kind,
                            help=f"{text}{'; ' if text else ''}default {default}")


def first_line(e: BaseException, limit: int) -> str:
    """The first line of an exception's message that holds text, at most `limit` characters (""
    if it has none): a library's long message, quoted inside one of our one-line errors."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:limit]


def port_in_use(e: BaseException, master: tuple) -> str:
    """The one line for a process group that could not start because its rendezvous port is
    taken (torch says EADDRINUSE), or "" for any other error. master: (address, port). Under
    torchrun the launcher binds the port itself, and fails in its own words before any script
    runs; this is for ranks started with MASTER_ADDR and MASTER_PORT by other means."""
    if "EADDRINUSE" not in str(e):
        return ""
    return (f"error: the rendezvous port {master[1]} on {master[0]} is in use by another process "
            "(another job?); give this job a free one (torchrun --master-port N, or "
            "MASTER_PORT=N)")


def number(kind=int, low=1, above=False):
    """An argparse type: a `kind` (int or float) >= low (> low if `above`), or an error that
    says which numbers to use."""
    def parse(text: str):
        try:
            value = kind(text)
            ok = math.isfinite(value) and (value > low if above else value >= low)
        except (ValueError, OverflowError):     # not a number; an int too large for a float
            ok = False
        if not ok:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"use {what} {'above' if above else 'of at least'} "
                                             f"{low}, not {text!r}")
        return value
    return parse


def finite(x) -> bool:
    """A real number that is not nan or inf. NOTE: every comparison with nan is false, so a rule
    is written as what a value must be, and `x > 0` alone would let inf through."""
    return isinstance(x, (int, float)) and math.isfinite(x)


def check(rules, error=ValueError) -> None:
    """Flag rules as a table, checked in order; the first rule broken is refused in one line.
    A rule is (flag, value, ok, what it must be), said as `--flag=value must be what`, or
    (ok, message) where a rule needs its own words."""
    for rule in rules:
        ok, message = (rule[2], f"--{rule[0].replace('_', '-')}={rule[1]} must be {rule[3]}"
                       ) if len(rule) == 4 else rule
        if not ok:
            raise error(message)


class Progress:
    """One status line, `label [####......] text`. On a terminal it is redrawn in place, at
    most every `every` seconds and at the end; in a log or a pipe each update the caller asks
    for is a line of its own (throttled to `every` seconds when it asks often)."""

    def __init__(self, label: str, total: float, stream=None, every: float = 0.2,
                 quiet: bool = False):
        self.label, self.total, self.every, self.quiet = label, max(total, 1), every, quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.drawn, self.start = -math.inf, time.perf_counter()

    def show(self, done: float, text: str = "", final: bool = False):
        now = time.perf_counter()
        if self.quiet or (now - self.drawn < self.every and not final):
            return
        self.drawn, share = now, min(done / self.total, 1.0)
        line = " ".join(x for x in (self.label, f"[{'#' * int(20 * share):<20}]", text) if x)
        if self.tty:                                   # ESC[K: clears a longer line's tail
            print("\r" + line + "\x1b[K", end="\n" if final else "", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)

    def seconds(self) -> float:
        return time.perf_counter() - self.start
