"""LoRA from the command line: the flags reach the config (with presets and the ladder); bad LoRA input is
one line, exit 2, nothing written; a resume that turns LoRA on or changes it is refused with the diff."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import one_line_error as _one_line_error
from conftest import tiny_train_args as _tiny
from fastrft import ladder
from fastrft.cli import main
from fastrft.config import TrainConfig


@pytest.mark.parametrize("flags, needles", [
    (["--lora-rank", "-2"], ["lora_rank (--lora-rank)", ">= 1"]),
    (["--lora-rank", "4", "--lora-targets", "q_proj,qkv_proj"],
     ["'qkv_proj'", "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"]),
    (["--lora-alpha", "16"], ["lora_alpha (--lora-alpha)", "--lora-rank is 0"]),
    (["--lora-rank", "4", "--lora-dropout", "0.1", "--exact-logprobs", "on"], ["exact_logprobs (--exact-logprobs) on cannot be honoured", "--lora-dropout"]),
    (["--lora-rank", "4", "--lora-init", "/nonexistent/adapter"], ["lora_init (--lora-init)", "no such directory"]),
])
def test_bad_lora_flags(tiny_llama, tmp_path, capsys, flags, needles):
    out = tmp_path / "run"
    assert main(_tiny(tiny_llama, out, *flags)) == 2
    _one_line_error(capsys, *needles)
    assert not out.exists()


@pytest.mark.parametrize("change", [["--lora-rank", "4"], ["--lora-rank", "8"], ["--lora-rank", "4", "--lora-targets",
                                                                                  "q_proj"], []])
def test_a_resume_that_changes_lora_is_refused_with_the_diff(tiny_llama, tmp_path, capsys, change):
    """A run made with (or, for the last case, without) --lora-rank 4, resumed with other LoRA settings."""
    out = tmp_path / "run"
    first = [] if change[:2] == ["--lora-rank", "4"] and len(change) == 2 else ["--lora-rank", "4"]
    assert main(_tiny(tiny_llama, out, *first)) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert main(_tiny(tiny_llama, out, "--rounds", "3", *change)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "lora_" in err and "--force" in err, err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_presets_and_the_ladder_carry_the_lora_flags(monkeypatch, tmp_path):
    from fastrft import cli

    seen = []
    monkeypatch.setattr(cli, "_train", lambda config, force=False: seen.append(config) or 0)
    assert main(["train", "--preset", "L3", "--profile", "cpu-mini", "--lora-rank", "16", "--lora-targets",
                 "q_proj,v_proj", "--lora-rslora"]) == 0
    m = seen[-1].model
    assert (m.lora_rank, m.lora_targets, m.lora_rslora) == (16, ("q_proj", "v_proj"), True)
    assert seen[-1].algo.kl_coef == 0.001  # the preset is still underneath
    pairs = ladder.plan(TrainConfig().to_dict(), {"model": {"lora_rank": 1, "lora_alpha": 8.0}}, ["L0", "L3"], 2,
                        "cpu-mini", Path(tmp_path))
    assert len(pairs) == 4 and {(p.config.model.lora_rank, p.config.model.lora_alpha) for p in pairs} == {(1, 8.0)}
