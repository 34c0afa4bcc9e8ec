"""One run across processes (torchrun, gloo, FSDP2, DCP) on CPU, against the same run in one process.

The 2-process runs are launched once per module (torchrun's start-up is most of a small test's time) and
shared by the tests: the round-1 rollouts equal the 1-process run's token for token; after eight rounds
the fp32 weights equal the 1-process run's up to reduction-order rounding, for token-mean and for
seq-mean-token-mean (with two PPO epochs of two mini-batches and a token budget that gives the ranks
different numbers of micro-batches); a kill -9 of one rank resumes from the last sharded checkpoint to the
uninterrupted run's metrics; the export of a sharded run loads in transformers with the same logits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastrft.distributed import World, dcp_full_model_state, share, split
from fastrft.report import read_metrics
from conftest import subprocess_env, untimed

WORKER = str(Path(__file__).with_name("dist_worker.py"))
AGGS = ("token-mean", "seq-mean-token-mean")
ROUNDS = 8
KILL_AFTER = 5  # rounds logged before one rank is killed (checkpoints every 2)
LR = 3e-3
LORA = ["--lora-rank", "4", "--reward-funcs", "conftest:digit_share"]


def _argv(model, out, aggregation):
    # 3 examples x G = 3: 9 requests, split 4 / 5 with a group across the ranks; a 48-token budget cuts each
    # rank's part of a step into a different number of micro-batches.
    argv = ["--model", str(model), "--out", str(out), "--rounds", str(ROUNDS), "--group-size", "3",
            "--example-index", "0,1,2", "--advantage", "grpo", "--aggregation", aggregation, "--kl-coef", "0.01",
            "--lr", str(LR), "--max-new-tokens", "4", "--eval-every", "2", "--test-size", "5",
            "--train-samples", "3", "--save-every", "2", "--log-samples", "100", "--seed", "3",
            "--max-tokens-per-step", "48", "--no-progress", "--exact-logprobs", "off"]
    if aggregation != "token-mean":
        argv += ["--ppo-epochs", "2", "--mini-batches", "2"]
    return argv


def _torchrun(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]


def _weights(run_dir):
    """The final fp32 masters of a run, sharded (DCP) or not."""
    from fastrft.checkpoint import load_latest, shard_dir
    from fastrft.models import load_model

    round_, payload = load_latest(run_dir)
    if "model" in payload:
        return payload["model"]
    cfg = json.loads((run_dir / "config.json").read_text())
    template = load_model(cfg["model"]["model"], dtype=torch.float32).state_dict()
    return dcp_full_model_state(shard_dir(run_dir, round_), template)


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    """Both aggregations at world size 2 (one torchrun launch) and 1 (one process), side by side."""
    root = tmp_path_factory.mktemp("dist")
    for world in (1, 2):
        spec = [{"argv": _argv(tiny_llama, root / f"w{world}-{agg}", agg), "dump": str(root / f"w{world}-{agg}.json")}
                for agg in AGGS]
        # LoRA: replicated adapters, trained on a reward with signal in every group (conftest.digit_share)
        spec.append({"argv": _argv(tiny_llama, root / f"w{world}-lora", AGGS[0]) + LORA,
                     "dump": str(root / f"w{world}-lora.json")})
        if world == 2:  # the exact mode across ranks (issue 24), in both precisions; with adapters too
            for precision in ("fp32", "bf16-mixed"):
                spec.append({"argv": _argv(tiny_llama, root / f"w2-{precision}-exact", AGGS[1]) +
                             ["--precision", precision, "--exact-logprobs", "on"], "dump": None})
            spec.append({"argv": _argv(tiny_llama, root / "w2-lora-exact", AGGS[1]) + LORA +
                         ["--precision", "bf16-mixed", "--exact-logprobs", "on"], "dump": None})
        (root / f"spec{world}.json").write_text(json.dumps(spec))
    procs = [subprocess.Popen(cmd, env=subprocess_env(distributed=True, tests=True), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for cmd in (_torchrun(WORKER, str(root / "spec2.json")), [sys.executable, WORKER, str(root / "spec1.json")])]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-4000:]
    return root


def test_shares_cover_every_request_once():
    for counts in ([4], [1], [1, 1, 1], [3, 3, 3], [5, 0, 2], [16] * 7):
        for size in (1, 2, 3, 5, 8):
            got = [(p, first + j) for r in range(size) for p, first, n in share(counts, World(r, size)) for j in range(n)]
            assert got == [(p, j) for p, n in enumerate(counts) for j in range(n)]  # in order, none dropped
            sizes = [sum(n for *_, n in share(counts, World(r, size))) for r in range(size)]
            assert max(sizes) - min(sizes) <= 1
            assert [x for r in range(size) for x in split(list(range(sum(counts))), World(r, size))] == \
                list(range(sum(counts)))


@pytest.mark.parametrize("aggregation", AGGS)
def test_round_rollouts_equal_one_process_token_for_token(runs, aggregation):
    one = json.loads((runs / f"w1-{aggregation}.json").read_text())
    two = json.loads((runs / f"w2-{aggregation}.json").read_text())
    assert [len(g) for g in two] == [3, 3, 3]
    for g1, g2 in zip(one, two):
        for a, b in zip(g1, g2):
            assert (a["tokens"], a["finish"], a["request"]) == (b["tokens"], b["finish"], b["request"])
            # The same weights in other batch shapes: only fp32 rounding separates the log-probs.
            assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-5
    # Every later round too, as logged (all 9 rollouts a round, decoded text and length).
    assert (runs / f"w1-{aggregation}" / "rollouts.jsonl").read_text() == \
        (runs / f"w2-{aggregation}" / "rollouts.jsonl").read_text()


def test_exact_logprobs_at_world_size_2(runs):
    """Every rank's sampler log-probs equal its trainer's bit for bit, in fp32 and in bf16-mixed (the PPO
    job's settings with --exact-logprobs on); the same job with the mode off shows the gap the check would
    catch. (The jobs compared with one process above keep the mode off: their tolerances were measured so.)"""
    def trained(name):
        return [r for r in read_metrics(runs / name / "metrics.jsonl") if r["kind"] == "round" and not r["skipped"]]

    for name in ("w2-fp32-exact", "w2-bf16-mixed-exact"):
        rounds = trained(name)
        assert rounds and [r["logp_gap_max"] for r in rounds] == [0.0] * len(rounds), name
    assert max(r["logp_gap_max"] for r in trained(f"w2-{AGGS[1]}")) > 0


@pytest.mark.parametrize("aggregation", AGGS)
def test_weights_equal_one_process(runs, aggregation, tiny_llama):
    """Tolerance: the two runs differ only in the order fp32 sums are taken (per-rank micro-batches, the
    ranks' gradient reduction), about 1e-7 relative per step. AdamW divides each gradient by its running
    RMS, so a relative change d of the gradient moves the step by about d * lr, except for elements whose
    gradient is rounding noise itself, where m / sqrt(v) can change by up to lr. Every element must
    therefore stay within lr * steps of the 1-process weights, and all but a few within 1e-3 of that;
    measured after 8 rounds at lr 3e-3: max 7.9e-6 (token-mean, 8 steps) and 3.7e-5
    (seq-mean-token-mean, 32 steps), about 3e-4 of the bound, none beyond 1e-3 of it."""
    from fastrft.models import load_model

    w1, w2 = _weights(runs / f"w1-{aggregation}"), _weights(runs / f"w2-{aggregation}")
    assert w1.keys() == w2.keys() and all(v.dtype == torch.float32 for v in w2.values())
    steps = ROUNDS * (1 if aggregation == "token-mean" else 4)
    diff = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    assert diff.max() <= LR * steps
    assert (diff > 1e-3 * LR * steps).float().mean() < 1e-3
    init = load_model(tiny_llama).state_dict()
    moved = torch.cat([(w1[k] - init[k]).abs().flatten() for k in w1])
    assert moved.max() > 100 * diff.max()  # the runs trained, far beyond their disagreement

    m1, m2 = untimed(read_metrics(runs / f"w1-{aggregation}" / "metrics.jsonl")), \
        untimed(read_metrics(runs / f"w2-{aggregation}" / "metrics.jsonl"))
    assert len(m1) == len(m2)
    for a, b in zip(m1, m2):
        assert a.keys() == b.keys()
        for k in a:
            if k == "micro_batches":  # one process cuts a step into fewer, larger micro-batches
                continue
            if k.startswith(("logp_gap", "ratio_")):
                # Extremes over tokens of log-prob differences (and their exp): on-policy they are rounding
                # noise itself (~1e-6); after a step they carry the logits' ~1e-4 drift between the runs.
                assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-5), (a["round"], k)
            elif isinstance(a[k], float):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["round"], k)
            else:
                assert a[k] == b[k], (a["round"], k)


def test_lora_adapters_are_replicated_and_equal_one_process(runs):
    """A LoRA run keeps its adapters whole on every rank (their gradients all-reduced, one checkpoint file) and
    ends where the one-process run ends, up to the rounding of the gradient sums (the bound of the test above:
    lr per step); its sampler and trainer agree bit for bit with the exact mode on."""
    one = json.loads((runs / "w1-lora.json").read_text())
    two = json.loads((runs / "w2-lora.json").read_text())
    assert [[a["tokens"] for a in g] for g in one] == [[b["tokens"] for b in g] for g in two]
    w1, w2 = _weights(runs / "w1-lora"), _weights(runs / "w2-lora")
    assert set(w1) == set(w2) and all(".lora_" in k for k in w2)  # one file, the adapters alone
    assert any(torch.count_nonzero(w2[k]) for k in w2 if ".lora_B." in k)  # they trained
    diff = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    assert diff.max() <= LR * ROUNDS
    assert (diff > 1e-3 * LR * ROUNDS).float().mean() < 1e-3
    rounds = [r for r in read_metrics(runs / "w2-lora-exact" / "metrics.jsonl") if r["kind"] == "round"
              and not r["skipped"]]
    assert rounds and [r["logp_gap_max"] for r in rounds] == [0.0] * len(rounds)


def test_export_of_a_sharded_run_loads_in_transformers(runs, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fastrft.cli import main
    from fastrft.models import load_model

    run, out = runs / "w2-token-mean", tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    saved, trained = load_file(str(out / "model.safetensors")), _weights(run)
    assert saved.keys() <= trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    native = load_model(out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[2, 5, 9, 13, 40, 7, 11, 3, 4]])
    with torch.no_grad():
        ours = native.forward_packed(ids[0], torch.tensor([0, ids.shape[1]], dtype=torch.int32)) @ native.lm_head_weight.T
        theirs = hf(ids).logits[0]
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def _rank_pids(torchrun_pid):
    """(rank, pid) of torchrun's worker processes."""
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int(proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != torchrun_pid:
                continue
            pid = proc.name
            env = proc.joinpath("environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
        if ranks:
            out.append((int(ranks[0]), int(pid)))
    return sorted(out)


def test_kill_9_of_one_rank_then_resume_matches_the_uninterrupted_run(runs, tiny_llama, tmp_path):
    ref, killed = runs / "w2-token-mean", tmp_path / "killed"
    argv = _argv(tiny_llama, killed, "token-mean")
    proc = subprocess.Popen(_torchrun("-m", "fastrft", "train", *argv), env=subprocess_env(distributed=True), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        m = killed / "metrics.jsonl"
        if m.exists() and m.read_text().count('"kind": "round"') >= KILL_AFTER:
            break
        time.sleep(0.002)
    ranks = _rank_pids(proc.pid)
    assert [r for r, _ in ranks] == [0, 1], "the run finished before it could be killed"
    os.kill(ranks[1][1], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0  # torchrun ends the whole job when a rank dies
    done = [r["round"] for r in read_metrics(killed / "metrics.jsonl") if r["kind"] == "round"]
    assert KILL_AFTER <= max(done) < ROUNDS
    ckpts = sorted((killed / "checkpoints").glob("round-*"))
    assert ckpts and (ckpts[-1] / "dcp" / ".metadata").exists()

    # A single process cannot load the sharded state: a clear error, and nothing recorded is touched.
    before = (killed / "metrics.jsonl").read_bytes()
    plain = subprocess.run([sys.executable, "-m", "fastrft", "train", *argv], env=subprocess_env(distributed=True), capture_output=True,
                           text=True, timeout=300)
    assert plain.returncode == 2 and "sharded" in plain.stderr and "--nproc-per-node" in plain.stderr
    assert (killed / "metrics.jsonl").read_bytes() == before

    # Another world size: DCP reshards the 2-rank checkpoint onto 1 rank (a copy of the run; --force since
    # its --out differs from the recorded one).
    import shutil

    other = tmp_path / "resharded"
    shutil.copytree(killed, other)
    one = subprocess.run(_torchrun("-m", "fastrft", "train", *argv, "--out", str(other), "--force", nproc=1),
                         env=subprocess_env(distributed=True), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-4000:]
    assert "written by 2 ranks; resharded onto 1" in one.stderr
    assert [r["round"] for r in read_metrics(other / "metrics.jsonl") if r["kind"] == "round"] == \
        list(range(1, ROUNDS + 1))

    resumed = subprocess.run(_torchrun("-m", "fastrft", "train", *argv), env=subprocess_env(distributed=True), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "continuing after round" in resumed.stderr
    a = untimed(read_metrics(ref / "metrics.jsonl"))
    b = untimed(read_metrics(killed / "metrics.jsonl"))
    assert [r["round"] for r in b if r["kind"] == "round"] == list(range(1, ROUNDS + 1))
    assert a == b
    assert (ref / "rollouts.jsonl").read_text() == (killed / "rollouts.jsonl").read_text()
    wa, wb = _weights(ref), _weights(killed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # The resharded run divided its last rounds' work differently: equal up to rounding (as in
    # test_weights_equal_one_process).
    wc = _weights(other)
    assert max((wa[k] - wc[k]).abs().max() for k in wa) <= LR * ROUNDS


def test_a_rank_that_cannot_reach_the_rendezvous_fails_with_a_message(tiny_llama, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = subprocess_env(distributed=True)
    env.update(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fastrft", "train", "--model", str(tiny_llama), "--out",
                           str(tmp_path / "run"), "--rounds", "1", "--dist-timeout", "3", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "rendezvous" in proc.stderr and "--dist-timeout" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "run").exists()
