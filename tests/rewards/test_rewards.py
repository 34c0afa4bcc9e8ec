"""Tests for fastrft.rewards: the three rewards, their extractors and the registry."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import fastrft.rewards as rewards
from fastrft.errors import ConfigError, FastRFTError
from fastrft.rewards import (
    arithmetic,
    extract_boxed,
    extract_hash_answer,
    extract_last_number,
    get,
    gsm8k,
    hendrycks_math,
    math_reward,
    names,
    register,
    score,
)

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- gsm8k

GSM8K_CASES = [
    ("48 + 24 = 72\n#### 72", "72", 1.0), ("#### 72.0", "72", 1.0), ("#### 72.00", "72", 1.0),
    ("#### 72.", "72", 1.0), ("#### 1,000", "1000", 1.0), ("#### 1000", "1,000", 1.0),
    ("#### $1,000", "1,000", 1.0), ("#### $1,000.00", "$1,000", 1.0), ("#### 1,000,000", "1000000", 1.0),
    ("#### -3", "-3", 1.0), ("#### -$5", "-5", 1.0), ("#### $-5", "-5", 1.0),
    ("#### 3", "-3", 0.0), ("#### -3", "3", 0.0), ("#### 0.5", "0.50", 1.0),
    ("#### 50%", "50", 1.0), ("#### 18 dollars", "18", 1.0), ("#### The answer is 72 clips.", "72", 1.0),
    ("#### 72 or maybe 73", "72", 1.0),  # strict: the first number after the marker is the answer
    ("#### 73 or maybe 72", "72", 0.0),
    ("#### 5\nOops, let me redo it.\n#### 6", "6", 1.0),  # only the last marker counts
    ("#### 5\nOops, let me redo it.\n#### 6", "5", 0.0),
    ("#### 72\n#### ", "72", 0.0),  # the last marker is empty
    ("The answer is 72.", "72", 0.0), ("", "72", 0.0), ("####", "72", 0.0), ("72 #### ", "72", 0.0),
    ("#### seventy-two", "72", 0.0), ("#### 71", "72", 0.0), ("#### 720", "72", 0.0),
    ("#### 72.5", "72", 0.0),
    ("#### 0.1", "0.1000000001", 0.0),  # exact comparison, no loose float tolerance
    ("#### 12,34", "1234", 0.0),  # not a thousands pattern: the number is 12
    ("#### 5-3", "2", 0.0), ("#### 5-3", "5", 1.0),  # nothing is evaluated; the first number is 5
]  # fmt: skip


@pytest.mark.parametrize(("response", "answer", "expected"), GSM8K_CASES)
def test_gsm8k(response: str, answer: str, expected: float) -> None:
    assert score("gsm8k", response, answer) == expected


# ----------------------------------------------------------------------------------------- arithmetic

ARITHMETIC_CASES = [
    ("8 + 3 equals 11.", "11", 1.0), ("The answer is 11.0", "11", 1.0), ("#### 11", "11", 1.0),
    ("it's 11!", "11", 1.0), ("11 is wrong, it is 12", "11", 0.0), ("11 is wrong, it is 12", "12", 1.0),
    ("", "11", 0.0), ("no number here", "0", 0.0), ("answer: 0", "0", 1.0),
    ("8 - 11 = -3", "-3", 1.0), ("8 - 11 = 3", "-3", 0.0), ("answer=-7", "-7", 1.0), ("(-3)", "-3", 1.0),
    ("5-3", "-3", 0.0), ("5-3", "3", 1.0), ("x-3", "-3", 0.0), ("(2)-3", "3", 1.0),  # "-" is subtraction
    ("The sum is 1,000", "1000", 1.0),
    ("1,2,3", "3", 1.0),  # a list, not a thousands-separated number
    ("11.5", "11", 0.0), ("11", "-11", 0.0),
]  # fmt: skip


@pytest.mark.parametrize(("response", "answer", "expected"), ARITHMETIC_CASES)
def test_arithmetic(response: str, answer: str, expected: float) -> None:
    assert score("arithmetic", response, answer) == expected


# ----------------------------------------------------------------------------------------------- math

MATH_CASES = [
    # must pass
    (r"So $\boxed{\frac{1}{2}}$.", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\dfrac{1}{2}}", r"\frac12", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{x = 5}", "5", 1.0),
    (r"\boxed{5}", "x=5", 1.0),
    (r"\boxed{(1,2)}", "(1, 2)", 1.0),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", 1.0),
    (r"\boxed{90^\circ}", "90", 1.0),
    (r"\boxed{2\pi}", r"2 \pi", 1.0),
    (r"\boxed{\frac{a}{b^{2}}}", "a/b^2", 1.0),
    (r"\boxed{ 5 }", "5", 1.0),
    (r"\boxed{5.}", "5", 1.0),
    (r"\fbox{5}", "5", 1.0),
    (r"The answer is \boxed 5", "5", 1.0),
    (r"\boxed{10\%}", "10", 1.0),
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", 1.0),
    (r"\boxed{5} is tempting, but really \boxed{6}", "6", 1.0),
    # must fail
    ("The answer is 5.", "5", 0.0),
    (r"\boxed{3}", "5", 0.0),
    (r"\boxed{}", "5", 0.0),
    (r"\boxed{  }", "5", 0.0),
    (r"\boxed{\frac{1}{3}}", "0.5", 0.0),
    (r"\boxed{5} is tempting, but really \boxed{6}", "5", 0.0),
    (r"\boxed{5} then \boxed{\frac{1}{2}", "5", 0.0),  # truncated last box; no fallback to the first
    (r"\boxed{(1,000)}", "1000", 0.0),  # a tuple is not a number
    (r"\boxed{5}", "", 0.0),
]


@pytest.mark.parametrize(("response", "answer", "expected"), MATH_CASES)
def test_math(response: str, answer: str, expected: float) -> None:
    assert score("math", response, answer) == expected


# Answers the normalised string match alone must get right, because that is all that is left when
# math-verify is missing, raises or times out.
FALLBACK_CASES = [
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", 1.0), (r"\boxed{\tfrac12}", r"\frac{1}{2}", 1.0),
    (r"\boxed{1,000}", "1000", 1.0), (r"\boxed{1{,}000}", "1000", 1.0),
    (r"\boxed{x = 5}", "5", 1.0), (r"\boxed{5}", "x=5", 1.0),
    (r"\boxed{(1,2)}", "(1, 2)", 1.0), (r"\boxed{\left(1,2\right)}", "(1,2)", 1.0),
    (r"\boxed{90^\circ}", "90", 1.0), (r"\boxed{90^{\circ}}", "90", 1.0),
    (r"\boxed{2\pi}", r"2 \pi", 1.0), (r"\boxed{10\%}", "10", 1.0), (r"\boxed{\$5}", "5", 1.0),
    (r"\boxed{5\text{ cm}}", "5cm", 1.0), (r"\boxed{3\!\sqrt2}", r"3\sqrt{2}", 1.0),
    (r"\boxed{\frac{1}{2}}", "0.5", 0.0),  # needs math-verify: a string match cannot see this
    (r"\boxed{(1,000)}", "1000", 0.0),  # commas inside brackets may separate a tuple
    (r"\boxed{3}", "5", 0.0),
]  # fmt: skip


@pytest.mark.parametrize(("response", "answer", "expected"), FALLBACK_CASES)
def test_math_fallback_when_math_verify_raises(monkeypatch, response, answer, expected) -> None:
    def broken(predicted: str, reference: str) -> bool:
        raise RuntimeError("math-verify exploded")

    monkeypatch.setattr(hendrycks_math, "_math_verify_equal", broken)
    assert math_reward(response, answer) == expected


def _timing_out(*args, **kwargs):
    raise hendrycks_math.TimeoutException("Operation timed out!")


@pytest.mark.parametrize("verify_stub", [None, _timing_out], ids=["missing", "timeout"])
def test_math_fallback_when_math_verify_missing_or_times_out(monkeypatch, verify_stub) -> None:
    monkeypatch.setattr(hendrycks_math, "verify", verify_stub)
    assert math_reward(r"\boxed{\dfrac{1}{2}}", r"\frac12") == 1.0
    assert math_reward(r"\boxed{0.5}", r"\frac12") == 0.0  # only math-verify could say 1.0 here


def _spy_timeouts(monkeypatch) -> list:
    seen: list = []
    real_verify = hendrycks_math.verify

    def spy(gold, pred, **kwargs):
        seen.append(kwargs.get("timeout_seconds", "default"))
        return real_verify(gold, pred, **kwargs)

    monkeypatch.setattr(hendrycks_math, "verify", spy)
    return seen


def test_math_uses_timeout_in_main_thread(monkeypatch) -> None:
    seen = _spy_timeouts(monkeypatch)
    assert math_reward(r"\boxed{\frac{1}{2}}", "0.5") == 1.0
    assert seen == [hendrycks_math.TIMEOUT_SECONDS]


def test_math_works_in_worker_thread_without_timeout(monkeypatch) -> None:
    # math-verify raises if asked for a signal-based timeout off the main thread; this case can only
    # score 1.0 through math-verify, so an error there would show up as 0.0.
    seen = _spy_timeouts(monkeypatch)
    results: list[float] = []
    worker = threading.Thread(target=lambda: results.append(math_reward(r"\boxed{\frac{1}{2}}", "0.5")))
    worker.start()
    worker.join(timeout=60)
    assert results == [1.0]
    assert seen == [None]


def test_math_pathological_input_times_out() -> None:
    # A child process, so that a broken timeout fails this test at the 30 s limit instead of hanging
    # the whole run; the child calls the reward from its main thread, where the timeout applies. The
    # child shortens the timeout to 1 s (the default, 10 s, allows for a loaded machine's first parse):
    # the mechanism is what is tested, and waiting out the default cost the suite 9 s.
    code = (
        "import fastrft.rewards.hendrycks_math as m; m.TIMEOUT_SECONDS = 1; "
        "from fastrft.rewards import score; "
        "print(score('math', r'The answer is $\\boxed{9^{9^{9^{9}}}}$', '1'))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env, check=True
    )
    elapsed = time.monotonic() - start
    assert done.stdout.strip().splitlines()[-1] == "0.0"
    assert elapsed < 20, f"math reward took {elapsed:.1f}s on a pathological input (its timeout is 1 s)"


# ----------------------------------------------------------------------------------------- extractors

HASH_CASES = [("so 72\n#### 72", "72"), ("#### $1,000 ", "$1,000"), ("#### 5\n#### 6 apples", "6 apples"),
              ("####", ""), ("72", None), ("", None)]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), HASH_CASES)
def test_extract_hash_answer(text: str, expected: str | None) -> None:
    assert extract_hash_answer(text) == expected


BOXED_CASES = [
    (r"$\boxed{\frac{a}{b^{2}}}$", r"\frac{a}{b^{2}}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped set braces do not close the box
    (r"\boxed{1} and \boxed{2}", "2"), (r"\fbox{7}", "7"), (r"\boxed {7}", "7"), (r"$\boxed 7$", "7"),
    (r"\boxed{}", ""), (r"\boxed{\frac{1}{2}", None), (r"\boxed", None), ("no box", None),
    (r"\boxedx{3}", None),  # a different macro, not \boxed
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), BOXED_CASES)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


NUMBER_CASES = [("8 + 3 = 11.", "11"), ("8 - 11 = -3", "-3"), ("5-3", "3"), ("costs $1,250.50", "1250.50"),
                ("1,2,3", "3"), ("11 then 12", "12"), ("none", None), ("", None)]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), NUMBER_CASES)
def test_extract_last_number(text: str, expected: str | None) -> None:
    assert extract_last_number(text) == expected


# ------------------------------------------------------------------------------------------- registry


def test_names_get_and_score() -> None:
    registered = names()
    assert {"arithmetic", "gsm8k", "math"} <= set(registered)
    assert registered == sorted(registered)
    assert get("gsm8k") is gsm8k.gsm8k_reward
    assert get("arithmetic") is arithmetic.arithmetic_reward
    assert get("math") is math_reward
    result = score("arithmetic", "11", "11")
    assert type(result) is float and result == 1.0


@pytest.mark.parametrize("bad", ["gsm9k", "GSM8K", "", "math "])
def test_unknown_reward_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        get(bad)
    message = str(info.value)
    assert repr(bad) in message
    assert "arithmetic, gsm8k, math" in message
    assert isinstance(info.value, FastRFTError) and isinstance(info.value, ValueError)
    with pytest.raises(ConfigError):
        score(bad, "#### 1", "1")


def test_register(monkeypatch) -> None:
    from fastrft.rewards import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register("always")
    def always(response: str, answer: str) -> float:
        return 1.0

    assert "always" in names()
    assert score("always", "anything", "x") == 1.0

    # Re-running the same definition (a module reload) is fine...
    @register("always")
    def always(response: str, answer: str) -> float:  # noqa: F811
        return 1.0

    # ...but a different function may not take over a registered name.
    with pytest.raises(ValueError, match="already registered"):

        @register("always")
        def impostor(response: str, answer: str) -> float:
            return 0.0

    assert score("always", "anything", "x") == 1.0


@pytest.mark.parametrize("module", [rewards, arithmetic, gsm8k, hendrycks_math], ids=lambda m: m.__name__)
def test_doctests(module) -> None:
    result = doctest.testmod(module)
    assert result.attempted > 0
    assert result.failed == 0


# ------------------------------------------------------------------------- custom "module:function"

CUSTOM_MODULE = '''
def exact(response: str, answer: str) -> float:
    return float(response.strip() == answer)

def with_default(response, answer, strict=True):
    return 1.0

def is_right(response, answer):
    return response == answer  # a bool is a number too

class Scorer:
    def __call__(self, response, answer):
        return 0.5

scorer = Scorer()
NOT_A_FUNCTION = 3

def three_args(response, answer, extra):
    return 1.0

def keyword_only(*, response, answer):
    return 1.0

def no_args():
    return 1.0

def returns_text(response, answer):
    return "yes"

def returns_nan(response, answer):
    return float("nan")

def returns_two(response, answer):
    return 2.0

def returns_none(response, answer):
    pass
'''

MOD = "fastrft_test_custom_rewards"


@pytest.fixture
def custom_module(tmp_path, monkeypatch) -> str:
    """A user's reward module on sys.path, imported afresh by each test."""
    (tmp_path / f"{MOD}.py").write_text(CUSTOM_MODULE)
    (tmp_path / "fastrft_test_broken_rewards.py").write_text("import fastrft_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(rewards.custom, "_LOADED", {})
    for name in (MOD, "fastrft_test_broken_rewards"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return MOD


def test_custom_reward_is_scored(custom_module) -> None:
    assert score(f"{MOD}:exact", " 11\n", "11") == 1.0
    assert score(f"{MOD}:exact", "12", "11") == 0.0
    assert score(f"{MOD}:with_default", "", "") == 1.0
    assert score(f"{MOD}:scorer", "", "") == 0.5  # any callable object, scores in [0, 1]
    result = score(f"{MOD}:is_right", "7", "7")
    assert type(result) is float and result == 1.0
    fn = get(f"{MOD}:exact")
    assert fn is sys.modules[MOD].exact and get(f"{MOD}:exact") is fn  # imported once, then cached
    assert f"{MOD}:exact" not in names()  # custom rewards are not registered


BAD_CUSTOM = [
    ("fastrft_no_such_module:exact",
     ["module 'fastrft_no_such_module' cannot be imported", "No module named 'fastrft_no_such_module'",
      "PYTHONPATH"]),
    ("fastrft_test_broken_rewards:exact",  # the module exists; a module it imports does not
     ["module 'fastrft_test_broken_rewards' cannot be imported", "No module named 'fastrft_no_such_dependency'"]),
    (f"{MOD}:missing", ["has no attribute 'missing'", "exact", f"write {MOD}:<function name>"]),
    (f"{MOD}:NOT_A_FUNCTION", ["not callable", "type int", "response: str, answer: str"]),
    (f"{MOD}:three_args", ["(response, answer, extra)", "missing a required argument: 'extra'",
                           "cannot be called as f(response, answer)"]),
    (f"{MOD}:keyword_only", ["cannot be called as f(response, answer)", "response: str, answer: str"]),
    (f"{MOD}:no_args", ["cannot be called as f(response, answer)", "too many positional arguments"]),
    (f"{MOD}:", ["is not 'module.path:function'", "mypkg.rewards:exact_match"]),
    (":exact", ["is not 'module.path:function'"]),
    (f"{MOD}:exact:more", ["is not 'module.path:function'"]),
    ("rewards/mine.py:exact", ["names a file", "mine:exact", "PYTHONPATH"]),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "must_mention"), BAD_CUSTOM, ids=[s for s, _ in BAD_CUSTOM])
def test_bad_custom_reward_is_a_config_error(custom_module, spec, must_mention) -> None:
    from fastrft.config import DataConfig

    with pytest.raises(ConfigError) as info:
        get(spec)
    for needle in [repr(spec), *must_mention]:
        assert needle in str(info.value)
    # Built into a config, the same error names the field and its flag, on one line.
    with pytest.raises(ConfigError) as info:
        DataConfig(reward=spec)
    message = str(info.value)
    assert message.startswith(f"reward (--reward) {spec!r}") and "\n" not in message
    assert all(needle in message for needle in must_mention)


def test_module_in_working_directory_gets_a_pythonpath_hint(tmp_path, monkeypatch) -> None:
    # The `fastrft` console script does not search the working directory; the message says how to.
    (tmp_path / "fastrft_test_cwd_rewards.py").write_text(CUSTOM_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    with pytest.raises(ConfigError, match=r"current directory.*PYTHONPATH=\."):
        get("fastrft_test_cwd_rewards:exact")


@pytest.mark.parametrize("fn", ["returns_text", "returns_nan", "returns_two", "returns_none"])
def test_reward_return_value_is_checked(custom_module, fn) -> None:
    spec = f"{MOD}:{fn}"
    get(spec)  # the signature is fine; only what it returns is wrong
    with pytest.raises(FastRFTError) as info:
        score(spec, "#### 7", "7")
    assert not isinstance(info.value, ConfigError)
    assert repr(spec) in str(info.value) and "must return a float in [0, 1]" in str(info.value)


def test_load_dataset_sets_the_reward(custom_module) -> None:
    from fastrft.data import load_dataset, prompt_text

    spec = f"{MOD}:exact"
    plain = load_dataset("arithmetic", "train", size=5)
    custom = load_dataset("arithmetic", "train", size=5, reward=spec)
    assert {ex.reward for ex in plain} == {"arithmetic"} and {ex.reward for ex in custom} == {spec}
    assert [(ex.id, ex.question, ex.answer, dict(ex.meta)) for ex in custom] == \
           [(ex.id, ex.question, ex.answer, dict(ex.meta)) for ex in plain]
    assert score(custom[0].reward, custom[0].answer, custom[0].answer) == 1.0
    # The prompt keeps the dataset's answer-format instruction.
    assert prompt_text(custom[0]) == prompt_text(plain[0]) == prompt_text(plain[0], "arithmetic")
    assert {ex.reward for ex in load_dataset("gsm8k", "test", size=3, reward="math")} == {"math"}
    with pytest.raises(ConfigError, match="no_such_reward"):
        load_dataset("arithmetic", "test", reward="no_such_reward")
