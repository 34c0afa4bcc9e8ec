r"""Reward for the MATH dataset (Hendrycks et al.): the last ``\boxed{}`` answer, up to equivalence.

Equivalence is decided by math-verify (symbolic/numeric comparison through sympy), because MATH answers
have many correct spellings (``0.5`` vs ``\frac{1}{2}``, ``x = 5`` vs ``5``) that string matching
misses. A normalised string match is tried first (cheap, and answers with the same canonical spelling
are equal without asking sympy) and is the whole check when math-verify is missing, raises or times out.

Timeouts: sympy can take unbounded time on adversarial answers such as ``9^{9^{9^{9}}}``. math-verify
bounds that with ``signal.alarm``, which Python only allows in the main thread, and it raises if asked
for a timeout anywhere else. So a timeout is used only when called from the main thread; in worker
threads (e.g. a thread pool scoring a batch) math-verify runs unbounded, and the caller must bound it,
for instance by scoring in worker *processes*, whose main thread does get the timeout. In the main
thread the alarm replaces any ``SIGALRM`` timer the caller had set.

This file is not named ``math.py`` so that tools that put this directory on ``sys.path`` (such as
``python -m doctest``) do not shadow the standard library's ``math`` module, which sympy imports; nor
``math_reward.py``, which the re-exported ``math_reward`` function would hide as a package attribute.
"""

from __future__ import annotations

import re
import threading

from fastrft.rewards.registry import register

try:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException
except ImportError:  # math-verify is a dependency, but the fallback keeps the reward usable without it
    parse = verify = None  # type: ignore[assignment]

    class TimeoutException(BaseException):  # type: ignore[no-redef]
        """Stand-in so the ``except`` clause below stays valid without math-verify."""


# Seconds allowed for each math-verify parse and each comparison (signal.alarm takes whole seconds).
# Legitimate MATH answers parse and compare in well under a second on an idle machine, but the first
# parse also builds the LaTeX grammar, and on a loaded 2-core machine 3 s was measured to cut off a
# plain \frac{a}{b^{2}}; this only has to stop pathological answers.
TIMEOUT_SECONDS: int = 10

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_boxed(text: str) -> str | None:
    r"""The content of the LAST ``\boxed{...}`` (or ``\fbox{...}``, ``\boxed 5``) in ``text``.

    Braces are matched, so nested groups are kept whole. Returns None when there is no box or when the
    last box is never closed: a truncated final answer must not fall back to an earlier, abandoned one.

    >>> extract_boxed(r"so $\boxed{\frac{a}{b^{2}}}$.")
    '\\frac{a}{b^{2}}'
    >>> extract_boxed(r"first \boxed{5}, then \boxed 6$")
    '6'
    >>> extract_boxed("no box") is None
    True
    """
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        # "\boxed 5" is legal TeX: the argument is the next token, ended by whitespace or math mode.
        token = re.match(r"[^\s$]+", text[i:])
        return token.group(0) if token else None
    depth = 0
    start = i + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            # Skip the escaped character so "\{" and "\}" (set braces) do not count as grouping.
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_SPACING_RE = re.compile(r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\[!,;:]|\\?\$")
_DEGREES_RE = re.compile(r"\^\{?\\circ\}?")
_ASSIGNMENT_RE = re.compile(r"^[A-Za-z]=(?!=)")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _normalise(answer: str) -> str:
    """Canonical string form of a LaTeX answer, for the string-match check."""
    s = _TEXT_RE.sub(r"\1", answer)
    s = s.replace("{,}", ",")  # LaTeX's "1{,}000" keeps the comma from adding space; same number
    s = _SPACING_RE.sub("", s)
    s = re.sub(r"\s+", "", s)
    s = s.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac")
    # "\frac12" and "\sqrt2" are valid TeX shorthands for "\frac{1}{2}" and "\sqrt{2}".
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    s = _DEGREES_RE.sub("", s)
    s = s.replace(r"\%", "").replace("%", "")
    s = _ASSIGNMENT_RE.sub("", s)
    s = s.rstrip(".")
    # Only a whole-answer thousands pattern loses its commas: inside "(1,000)" the comma might be a
    # tuple separator, and guessing wrong there would turn a wrong answer into a right one.
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    return s


def _math_verify_equal(predicted: str, reference: str) -> bool:
    """math-verify's verdict; raises (including TimeoutException) when it cannot give one."""
    if parse is None or verify is None:
        raise RuntimeError("math-verify is not installed")
    timeout = TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    # Wrapping in \boxed{} rather than $...$ makes math-verify take the whole string as one answer even
    # when it contains "$" (e.g. "\$5"); raise_on_error turns its silent False on failure or timeout
    # into an exception, so that the caller can tell "not equal" from "could not tell".
    gold = parse(f"\\boxed{{{reference}}}", config, parsing_timeout=timeout, raise_on_error=True)
    pred = parse(f"\\boxed{{{predicted}}}", config, parsing_timeout=timeout, raise_on_error=True)
    # Argument order matters: verify() treats its first argument as the gold answer.
    return bool(verify(gold, pred, timeout_seconds=timeout, raise_on_error=True))


@register("math")
def math_reward(response: str, answer: str) -> float:
    r"""1.0 if the last ``\boxed{}`` answer in ``response`` is equivalent to ``answer``, else 0.0.

    ``answer`` is the MATH dataset's ``answer`` field: LaTeX without ``\boxed``.

    >>> math_reward(r"Half of it: $\boxed{\frac{1}{2}}$.", "0.5")
    1.0
    >>> math_reward(r"Solving gives $\boxed{x = 5}$.", "5")
    1.0
    >>> math_reward(r"$\boxed{\frac{1}{3}}$", "0.5")
    0.0
    >>> math_reward("The answer is 5.", "5")
    0.0
    """
    boxed = extract_boxed(response)
    # Trailing full stops are sentence punctuation, and math-verify fails to parse "5." at all.
    predicted = boxed.strip().rstrip(".").strip() if boxed is not None else ""
    reference = answer.strip()
    if not predicted or not reference:
        return 0.0
    if _normalise(predicted) == _normalise(reference):
        return 1.0
    try:
        return 1.0 if _math_verify_equal(predicted, reference) else 0.0
    except (Exception, TimeoutException):
        # TimeoutException derives from BaseException, so it must be named; KeyboardInterrupt is not
        # caught. The string check above already failed, so there is nothing left to fall back on.
        return 0.0
