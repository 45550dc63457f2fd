"""istune bench frontier on the test size: every output written, the frontier computed right, bad options refused."""

import json

import pytest

from istune.bench import frontier


def _row(key, memory, seconds):
    return {"key": key, "memory_bytes": memory, "seconds_per_step": seconds}


def test_frontier_keeps_the_rows_no_other_row_beats_on_both_axes():
    rows = [_row("a", 10, 1.0), _row("b", 5, 2.0), _row("c", 6, 2.5), _row("d", 10, 1.5), _row("e", 4, 3.0)]
    # c is beaten by b (less memory, less time); d by a (same memory, less time)
    assert frontier.frontier_keys(rows) == ["a", "b", "e"]
    assert frontier.frontier_keys([_row("a", 1, 1.0), _row("b", 1, 1.0)]) == ["a", "b"]  # ties beat nobody


def test_the_test_size_writes_json_markdown_and_picture(tmp_path):
    out = tmp_path / "frontier"
    assert frontier.main(["--size", "test", "--rows", "lora,ist+ckpt", "--out", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    rows = {row["key"]: row for row in record["rows"]}
    assert list(rows) == ["lora", "lora+ist+gc"]  # typed as ist+ckpt (the old key): one key per configuration
    for row in rows.values():
        assert row["memory_bytes"] > 0 and row["seconds_per_step"] > 0
        assert row["memory"]["peak_rss_bytes"] >= row["memory"]["rss_before_bytes"]
    assert rows["lora"]["memory_vs_lora"] == 1.0 and rows["lora+ist+gc"]["probe_update_s"] > 0
    assert rows["lora+ist+gc"]["checkpointing"] and rows["lora+ist+gc"]["ist"] == {}
    markdown = out.with_suffix(".md").read_text()
    assert "| LoRA + IST + gradient checkpointing |" in markdown and "--size test" in markdown
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, message", [
    (["--size", "huge"], "--size='huge' is not a known size"),
    (["--size", "test", "--rows", "lora,bogus"], "bogus"),
    (["--size", "test", "--steps", "1"], "--steps=1"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        frontier.main([*argv, "--out", str(tmp_path / "out")])
    assert not list(tmp_path.iterdir())


def test_time_runs_draw_layers_as_in_training_and_memory_runs_take_the_worst_case(monkeypatch):
    from istune.core.layers import find_adapter_layers
    from istune.integrations.hf import ISTCallback

    size, row = frontier.SIZES["test"], frontier.ROWS["lora+ist+gc"]
    seeds = []
    make_trainer = frontier.make_trainer

    def recording(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        seeds.extend(c.config.seed for c in trainer.callback_handler.callbacks if isinstance(c, ISTCallback))
        return trainer

    monkeypatch.setattr(frontier, "make_trainer", recording)
    times = frontier.measure_time([frontier.ROWS["lora"], row], size, steps=2, rounds=2, progress=lambda _: None)
    # time: the training draws (ISTConfig's default seed, the next one in round 2), not the memory runs' layer-0 seed
    # (43 on this size: with the worst seed in both rounds this would read [43, 43])
    assert seeds == [frontier.TIME_SEED, frontier.TIME_SEED + 1]
    assert times["lora+ist+gc"]["samples"] == {"steps": 2, "probe_updates": 2}
    worst = frontier.ist_seed(row, size, len(find_adapter_layers(frontier.build_model(size, row))))
    trainer = make_trainer(row, size, frontier.build_model(size, row), 1, "unused")
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ISTCallback))
    assert callback.config.seed == worst  # memory: the seed whose first steps select layer 0


def test_stored_layers_rows_measure_memory_at_both_worst_steps():
    # With stored_layers = M the largest peak is the step that selects layer 0 or the one whose lowest selected layer
    # is N_L - M (every block running backward stored, the selected ones included); draws rarely hit the second.
    from istune.integrations.hf import ISTCallback

    size, row = frontier.SIZES["test"], frontier.ROWS["lora+ist+gc+stored3"]  # 4 layers, N_u = 1, M = 3
    assert frontier.stored_worst_step(row, 4) == [1]
    assert frontier.stored_worst_step(row, 3) is None
    assert frontier.stored_worst_step(frontier.ROWS["lora+ist"], 4) is None
    assert frontier.stored_worst_step(frontier.ROWS["lora+ist+stored8"], 30) == [22, 23, 24, 25, 26, 27, 28, 29]
    # M < N_u:
    assert frontier.stored_worst_step(frontier.ROWS["lora+ist+gc+stored3"], 30) == [22, 23, 24, 25, 26, 27, 28, 29]

    trainer = frontier.make_trainer(row, size, frontier.build_model(size, row), 1, "unused", layers=[1])
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ISTCallback))
    assert (callback.config.strategy, callback.config.layers, callback.config.stored_layers) == ("fixed", [1], 3)

    memory = frontier.measure_memory([row], size, progress=lambda _: None)[row.key]  # two processes
    assert [run["fixed_layers"] for run in memory["runs"]] == [None, [1]]
    assert memory["growth_bytes"] == max(run["growth_bytes"] for run in memory["runs"]) > 0
    assert frontier.measure_memory_here(row, frontier.SIZES["test"], stored_worst=True)["fixed_layers"] == [1]
    few = frontier.ROWS["lora+ist+stored8"]  # M >= N_L = 4: no second worst step, no second run
    assert frontier.measure_memory_here(few, size, stored_worst=True) == {"row": few.key, "fixed_layers": None,
                                                                         "skipped": True}


def test_rules_that_choose_from_a_measurement_add_a_memory_run_with_layer_0_fixed(monkeypatch):
    """owlore, gradnorm and probe-once run as they train (their first-step measurement inside the measured
    trainer.train()) and once with layer 0 fixed; lisa and badam reach layer 0 in their own first steps."""
    # with --rows only: a run without --rows measures what the recorded commands measured
    assert not set(frontier.RULE_KEYS) & set(frontier.DEFAULT_KEYS) and set(frontier.RULE_KEYS) <= set(frontier.NAMES)
    assert frontier.worst_step(frontier.ROWS["lora+gradnorm"], 30) == [0, 23, 24, 25, 26, 27, 28, 29]  # N_u = 8
    for key in ("lora+owlore", "lora+probe-once"):
        assert frontier.worst_step(frontier.ROWS[key], 4) == [0]  # N_u = 1 of 4
    for key in ("lora+lisa", "lora+badam", "lora+random", "lora+ist"):
        assert frontier.worst_step(frontier.ROWS[key], 30) is None
    calls = []

    def child(target, kwargs):
        calls.append((kwargs["row"], kwargs["stored_worst"]))
        return {"growth_bytes": 2.0 if kwargs["stored_worst"] else 1.0}

    monkeypatch.setattr(frontier, "run_in_child", child)
    rows = [frontier.ROWS[key] for key in ("lora+lisa", "lora+badam", "lora+gradnorm")]
    memory = frontier.measure_memory(rows, frontier.SIZES["test"], progress=lambda _: None)
    assert calls == [("lora+lisa", False), ("lora+badam", False), ("lora+gradnorm", False), ("lora+gradnorm", True)]
    assert memory["lora+gradnorm"]["growth_bytes"] == 2.0 and len(memory["lora+gradnorm"]["runs"]) == 2


def test_rule_rows_train_with_their_rule_and_time_their_first_step(tmp_path):
    out = tmp_path / "frontier"
    assert frontier.main(["--size", "test", "--rows", "lora+badam,lora+probe-once", "--out", str(out)]) == 0
    rows = {row["key"]: row for row in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert rows["lora+badam"]["ist"] == {"strategy": "badam"} and rows["lora+probe-once"]["first_step_s"] > 0
    assert rows["lora+probe-once"]["memory"]["fixed_layers"] in (None, [0])  # the larger of its two runs
    assert len(rows["lora+probe-once"]["memory"]["runs"]) == 2 and len(rows["lora+badam"]["memory"]["runs"]) == 1
    assert "| LoRA + one-time gradient probe |" in out.with_suffix(".md").read_text()
