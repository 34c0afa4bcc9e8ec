"""bench/same_run.py, the before/after check of a refactor: equal runs pass, and a one-ulp difference in
a metric, a changed rollout or one flipped weight bit fails it; wall-clock fields are ignored."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("same_run", ROOT / "bench" / "same_run.py")
same_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(same_run)


def _run(path: Path, *, loss=0.25, wall=1.0, text="11", weight_bits=0) -> Path:
    (path / "export").mkdir(parents=True)
    records = [{"kind": "eval", "round": 0, "test_pass1": 0.5, "time_eval": wall},
               {"kind": "round", "round": 1, "loss": loss, "time_rollout": wall, "rollout_tokens_per_s": 9 / wall}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "rollouts.jsonl").write_text(json.dumps({"round": 1, "samples": [{"text": text}]}) + "\n")
    (path / "config.json").write_text(json.dumps({"run": {"out": str(path), "seed": 0}}))
    w = torch.linspace(-1, 1, 7)
    w.view(torch.int32)[3] ^= weight_bits
    save_file({"w": w}, str(path / "export" / "model.safetensors"))
    return path


def test_equal_runs_pass_whatever_their_wall_clock(tmp_path, capsys):
    assert same_run.main([str(_run(tmp_path / "a")), str(_run(tmp_path / "b", wall=3.0))]) == 0
    assert "same run: 2 metrics records" in capsys.readouterr().out


def test_a_one_ulp_metric_a_rollout_or_a_weight_bit_fails(tmp_path, capsys):
    a = _run(tmp_path / "a")
    cases = {"ulp": dict(loss=float(torch.nextafter(torch.tensor(0.25, dtype=torch.float64),
                                                        torch.tensor(1.0, dtype=torch.float64)))),
             "rollout": dict(text="12"), "weight": dict(weight_bits=1)}
    expected = {"ulp": "loss 0.25 != 0.25000000000000006", "rollout": "rollouts.jsonl differs",
                "weight": "exported weights: w differs"}
    for name, kw in cases.items():
        assert same_run.main([str(a), str(_run(tmp_path / name, **kw))]) == 1, name
        assert expected[name] in capsys.readouterr().out
