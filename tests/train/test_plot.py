"""The charts of a run: what each one draws, read back from the figures."""

import json

import pytest
import yaml

from orionlm.cli import main
from orionlm.train.plot import human_tokens, pyplot, run_figures

PEAK, TOKENS_PER_STEP = 1e-3, 100_000


@pytest.fixture
def run_dir(tmp_path):
    """A 20-step MoE run (2 layers, 4 experts) that logged every 10 steps, with a 5-step warm-up."""
    records = [
        {"step": step, "tokens": step * TOKENS_PER_STEP, "loss": 7.0 - step / 10, "lr": lr, "val_loss": 7.1 - step / 10,
         "expert_fractions": [[0.4, 0.2, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25]]}
        for step, lr in ((10, 0.8e-3), (20, 1e-4))
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    info = {"total_steps": 20, "tokens_per_step": TOKENS_PER_STEP, "peak_lr": PEAK, "unigram_entropy": 6.33}
    (tmp_path / "run.json").write_text(json.dumps(info))
    schedule = {"kind": "cosine", "warmup_steps": 5, "warmup_fraction": None, "min_lr_ratio": 0.1}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"schedule": schedule}))
    return tmp_path


def lines(figure, axis: int = 0) -> dict[str, object]:
    return {line.get_label(): line for line in figure.axes[axis].get_lines()}


def test_the_loss_chart_has_the_unigram_entropy_line_and_tokens_in_k_and_m(run_dir):
    plt = pyplot()
    loss = run_figures(plt, run_dir)["loss.png"]
    floor = lines(loss)["unigram entropy of the data (6.330)"]
    assert list(floor.get_ydata()) == [6.33, 6.33]
    ticks = loss.axes[0].xaxis.get_major_formatter()
    assert [ticks(x, 0) for x in (0, 250_000, 1_500_000, 2e9)] == ["0", "250K", "1.5M", "2B"]
    plt.close("all")


def test_the_lr_chart_draws_every_warmup_step_of_a_run_that_logs_seldom(run_dir):
    plt = pyplot()
    lr = lines(run_figures(plt, run_dir)["lr.png"])
    schedule, logged = lr["schedule"], lr["logged"]
    # steps 0-4 warm up to the peak; each point at the tokens seen after its step, as the logged values are
    assert list(schedule.get_xdata()[:6]) == [(s + 1) * TOKENS_PER_STEP for s in range(6)]
    assert list(schedule.get_ydata()[:5]) == pytest.approx([PEAK * (s + 1) / 5 for s in range(5)])
    assert schedule.get_ydata()[-1] == pytest.approx(0.1 * PEAK) and len(schedule.get_xdata()) == 20
    assert list(logged.get_xdata()) == [1_000_000, 2_000_000]
    plt.close("all")


def test_the_expert_heatmap_says_which_steps_it_shows(run_dir):
    plt = pyplot()
    experts = run_figures(plt, run_dir)["expert_load.png"]
    assert experts.axes[0].get_title() == "token share per expert, steps 11-20 (balanced = 0.250)"
    (curves,) = [ax for ax in experts.axes if ax.get_title() == "load imbalance over training"]
    assert curves.xaxis.get_major_formatter()(1_000_000, 0) == "1M"
    plt.close("all")


def test_human_token_names_are_exact():
    assert [human_tokens(n) for n in (100 * 10**9, 1_638_400, 2_000, 512)] == ["100B", "1.6384M", "2K", "512"]


@pytest.mark.parametrize("damage", ["run.json", "metrics.jsonl"])
def test_a_damaged_run_file_is_one_line(run_dir, capsys, damage):
    path = run_dir / damage
    path.write_text("{not json\n" + path.read_text())
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(run_dir)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert str(path) in err and len(err.splitlines()) == 1
