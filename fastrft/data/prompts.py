"""Turning an :class:`Example` into the prompt text and token ids the policy sees.

The suffixes tell the model where to put its final answer, and each must match what the reward of the
same name parses (``####`` for GSM8K and arithmetic, ``\\boxed{}`` for MATH); changing one without the
other silently turns every correct completion into a zero reward.
"""

from __future__ import annotations

from typing import Any

from fastrft.errors import ConfigError, DataError
from fastrft.data.custom import is_custom
from fastrft.data.example import Example

#: The instruction appended to every question, per dataset (each starts with a space on purpose:
#: it is glued directly onto the raw question).
PROMPT_SUFFIXES: dict[str, str] = {
    "gsm8k": ' Let\'s think step by step and output the final answer after "####".',
    "math": " Let's think step by step and output the final answer within \\boxed{}.",
    "arithmetic": ' Output the final answer after "####".',
}


def _suffix(dataset: str) -> str:
    if dataset not in PROMPT_SUFFIXES:
        raise ConfigError(
            f"no prompt for dataset {dataset!r}; choose one of: {', '.join(PROMPT_SUFFIXES)}"
        )
    return PROMPT_SUFFIXES[dataset]


def prompt_text(example: Example, dataset: str | None = None, template: str | None = None) -> str:
    """Return the user-message text: the raw question followed by the dataset's suffix.

    Args:
        example (Example): The problem.
        dataset (str | None): ``"gsm8k"``, ``"math"`` or ``"arithmetic"``; ``None`` uses
            ``example.reward``, which names the same family, or, when ``--reward`` replaced it with
            a function of the user's, the family its id starts with (``"gsm8k/train/17"``).

    Returns:
        str: ``example.question + PROMPT_SUFFIXES[dataset]``.

    Raises:
        ConfigError: Unknown dataset.
    """
    if template is not None:  # --prompt-template: "{prompt}" is the question
        return template.format(prompt=example.question)
    if dataset and is_custom(dataset):  # a dataset of the user's: its prompt as written
        return example.question
    if not dataset:
        dataset = example.reward if example.reward in PROMPT_SUFFIXES else example.id.split("/", 1)[0]
    return example.question + _suffix(dataset)


def has_chat_template(tokenizer: Any) -> bool:
    """Tell whether a tokenizer carries a chat template.

    Args:
        tokenizer (Any): A ``transformers`` tokenizer (or anything with a ``chat_template`` attribute).

    Returns:
        bool: ``False`` when the attribute is missing, ``None`` or empty.
    """
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_messages(example: Example, dataset: str | None = None, *, template: str | None = None,
                    system: str | None = None) -> list[dict[str, str]]:
    """The prompt as chat messages: the example's own conversation, or one user turn (the prompt text);
    with ``system`` (--system-prompt) a system turn first, unless the conversation has one."""
    messages = [dict(m) for m in example.meta.get("prompt_messages", ())] or \
        [{"role": "user", "content": prompt_text(example, dataset, template)}]
    if system is not None and messages[0]["role"] != "system":  # --system-prompt
        messages.insert(0, {"role": "system", "content": system})
    return messages


def render_prompt(tokenizer: Any, example: Example, dataset: str | None = None, *, template: str | None = None,
                  system: str | None = None) -> str:
    """Render the prompt as the model expects it: one user turn, then the assistant header.

    Base models often ship without a chat template; for those the plain :func:`prompt_text` is used
    rather than failing, since a base model is usually meant to continue raw text anyway.

    Args:
        tokenizer (Any): A ``transformers`` tokenizer.
        example (Example): The problem.
        dataset (str | None): As in :func:`prompt_text`.

    Returns:
        str: The templated prompt (including any special-token text the template writes), or the
        plain prompt text when the tokenizer has no chat template.
    """
    messages = prompt_messages(example, dataset, template=template, system=system)
    if not has_chat_template(tokenizer):
        return "\n\n".join(m["content"] for m in messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer: Any, example: Example, dataset: str | None = None, *,
                  max_prompt_tokens: int, template: str | None = None, system: str | None = None) -> list[int]:
    """Tokenise the rendered prompt, refusing prompts longer than the configured budget.

    ``add_special_tokens=False`` because the chat template already wrote BOS/role tokens as text;
    letting the tokenizer add them again would duplicate BOS for templates such as Llama's.

    Args:
        tokenizer (Any): A ``transformers`` tokenizer.
        example (Example): The problem.
        dataset (str | None): As in :func:`prompt_text`.
        max_prompt_tokens (int): The longest prompt, in tokens, the trainer allots room for.

    Returns:
        list[int]: The prompt's token ids.

    Raises:
        ConfigError: ``max_prompt_tokens`` is not a positive integer, or the dataset is unknown.
        DataError: The prompt is longer than ``max_prompt_tokens``.
    """
    if isinstance(max_prompt_tokens, bool) or not isinstance(max_prompt_tokens, int) \
            or max_prompt_tokens < 1:
        raise ConfigError(f"max_prompt_tokens must be a positive integer, got {max_prompt_tokens!r}")
    ids = list(tokenizer.encode(render_prompt(tokenizer, example, dataset, template=template, system=system),
                                add_special_tokens=False))
    if len(ids) > max_prompt_tokens:
        # Truncating would cut off the question's end or the answer-format instruction, so the
        # model could not succeed and the example would only add noise; make the user decide.
        raise DataError(
            f"example {example.id}: prompt is {len(ids)} tokens, longer than max_prompt_tokens="
            f"{max_prompt_tokens}; raise --max-prompt-tokens to at least {len(ids)}"
        )
    return ids
