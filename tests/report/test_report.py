"""The figures: a run's curves (Pass@1, reward, loss, KL) and the ladder's difference panel, whose scale
must show a difference within noise as small."""

from __future__ import annotations

import pytest

from fastrft.report import MIN_EFFECT, curves_figure, delta_xlim, ladder_figure, plot_curves, plural


def _records(kl: bool = True):
    """Evaluations at rounds 0, 10, 20 and 20 rounds of G = 1 records; round 5 skipped (no loss, no KL)."""
    recs = [{"kind": "eval", "round": rd, "train_pass1": p, "test_pass1": p / 2} for rd, p in ((0, 0.1), (10, 0.5),
                                                                                            (20, 0.9))]
    for rd in range(1, 21):
        r = {"kind": "round", "round": rd, "reward_mean": float(rd % 2), "correct_mean": float(rd % 2),
             "skipped": int(rd == 5), "grad_norm": 1.0}
        if rd != 5:
            r.update(loss=-0.1 * rd, entropy_mean=0.0, kl_mean=0.001 * rd if kl else 0.0)
        recs.append(r)
    return recs


def _line(ax, label):
    return next(line for line in ax.get_lines() if line.get_label() == label)


def test_curves_draw_pass1_reward_loss_and_kl(tmp_path):
    fig = curves_figure(_records(), title="L0-minimal/seed-0")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Pass@1 at each evaluation", "reward per round", "loss per round (skipped rounds left out)",
                      "KL to the initial policy per round"]
    pass1, reward, loss, kl = fig.axes
    assert list(_line(pass1, "train Pass@1").get_ydata()) == [0.1, 0.5, 0.9]
    assert list(_line(reward, "reward").get_xdata()) == list(range(1, 21))
    # 20 rounds: a trailing mean over 2; {0,1} rewards alternate, so it settles at 0.5.
    assert list(_line(reward, "reward, mean of last 2").get_ydata())[1:] == [0.5] * 19
    assert "share correct" not in [line.get_label() for line in reward.get_lines()]  # reward is correctness here
    stepped = [rd for rd in range(1, 21) if rd != 5]
    assert list(_line(loss, "loss").get_xdata()) == stepped
    assert list(_line(loss, "loss").get_ydata()) == pytest.approx([-0.1 * rd for rd in stepped])
    assert list(_line(kl, "KL").get_ydata()) == pytest.approx([0.001 * rd for rd in stepped])
    assert fig._suptitle.get_text() == "L0-minimal/seed-0"
    png = plot_curves(_records(), tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_say_kl_off_and_show_correctness_beside_a_signed_reward():
    recs = _records(kl=False)
    for r in recs:
        if r["kind"] == "round":
            r["reward_mean"] = 2 * r["correct_mean"] - 1  # L3's {-1,+1}
    _, reward, _, kl = curves_figure(recs).axes
    assert not kl.get_lines() and [t.get_text() for t in kl.texts] == ["KL off: no round recorded a KL"]
    assert list(_line(reward, "share correct").get_ydata()) == [float(rd % 2) for rd in range(1, 21)]
    assert min(_line(reward, "reward").get_ydata()) == -1.0


def test_delta_axis_shows_noise_as_noise():
    within = {"delta": 0.04, "se": 0.01, "verdict": "within noise"}
    assert delta_xlim([within, None], [0.03, 0.05]) == (-0.25, 0.25)
    big = {"delta": -0.4, "se": 0.05, "verdict": "hurts"}
    lo, hi = delta_xlim([within, big], [-0.45, 0.1])
    assert lo == -hi and hi > 0.5  # the bar's 2 SE whisker reaches 0.5: all of it shows
    lo, hi = delta_xlim([within], [0.7])
    assert hi > 0.7  # a far seed dot is inside the panel


def _layer(name, curves):
    runs = [{"seed": s, "records": [{"kind": "eval", "round": rd, "test_pass1": v, "train_pass1": v}
                                    for rd, v in c.items()], "summary": {"wall_s": 1.0}} for s, c in enumerate(curves)]
    return {"name": name, "layer": name.split("-")[0], "choice": name, "runs": runs}


def test_ladder_figure_panel_limits_and_titles():
    l0 = _layer("L0-minimal", [{0: 0.2, 10: 0.5}, {0: 0.2, 10: 0.6}])
    close = _layer("L1-advantage", [{0: 0.2, 10: 0.6}, {0: 0.2, 10: 0.58}])  # +0.04: within noise
    one = _layer("L3-negative-reward", [{0: 0.2, 10: 0.5}])
    fig = ladder_figure([l0, close, one])
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles[:3] == ["L0-minimal (2 seeds)", "L1-advantage (2 seeds)", "L3-negative-reward (1 seed)"]
    deltas = next(ax for ax in fig.axes if ax.get_title().startswith("vs baseline"))
    assert deltas.get_xlim() == pytest.approx((-0.25, 0.25))
    band = [p for p in deltas.patches if p.get_x() == pytest.approx(-MIN_EFFECT)]  # the shaded ±MIN_EFFECT
    assert band and band[0].get_width() == pytest.approx(2 * MIN_EFFECT)


def test_figures_keep_their_text_inside_and_rounds_on_integers():
    """A 2-round, 2-preset study: every title and axis label lies inside the figure (the difference panel's
    caption was once cut off), and the round axes tick whole rounds only (not 0.5)."""
    l0 = _layer("L0-minimal", [{0: 0.2, 1: 0.5, 2: 0.6}])
    up = _layer("L2-rollouts-4", [{0: 0.2, 1: 0.9, 2: 0.9}])
    records = [{"kind": "eval", "round": 0, "train_pass1": 0.1, "test_pass1": 0.2},
               {"kind": "round", "round": 1, "reward_mean": 0.5, "loss": 0.1, "kl_mean": 0.01},
               {"kind": "round", "round": 2, "reward_mean": 1.0, "loss": 0.2, "kl_mean": 0.02},
               {"kind": "eval", "round": 2, "train_pass1": 0.9, "test_pass1": 0.5}]
    for fig in (ladder_figure([l0, up]), curves_figure(records, "a run")):
        fig.canvas.draw()
        box = fig.bbox
        for ax in [a for a in fig.axes if a.get_visible()]:
            for text in (ax.title, ax.xaxis.label, ax.yaxis.label):
                if text.get_text():
                    bb = text.get_window_extent()
                    assert box.x0 - 1 <= bb.x0 and bb.x1 <= box.x1 + 1 and box.y0 - 1 <= bb.y0, text.get_text()
            if ax.get_xlabel() == "round":
                ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
                assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_plural():
    assert [plural(n, "seed") for n in (0, 1, 2)] == ["0 seeds", "1 seed", "2 seeds"]
