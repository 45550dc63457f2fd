"""istune.bench.probes: rank agreement against hand-computed values, truncation keeps the labelled tokens,
runs are reproducible by seed on frozen adapters, and the command writes its results whole."""

import json
import math
import types

import pytest
import torch

from istune.bench import probes
from istune.config import ISTConfig
from istune.data import CausalLMCollator
from tests.tiny_models import peft_model

# ---- ranking metrics, against values computed by hand ------------------------------------------


def test_average_ranks_share_ties():
    assert probes.average_ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]


@pytest.mark.parametrize("a, b, expected", [
    ([1, 2, 3, 4, 5], [2, 1, 4, 3, 5], 0.8),  # two swaps: 1 - 6 * 4 / (5 * 24)
    ([1, 2, 3, 4, 5], [50, 40, 30, 20, 10], -1.0),
    ([0.1, 0.2, 0.3], [10, 20, 30], 1.0),  # only the order counts
    ([1, 1, 2, 3], [1, 2, 3, 4], 3 / math.sqrt(10)),  # a tie: ranks 1.5, 1.5, 3, 4
])
def test_spearman(a, b, expected):
    assert probes.spearman(a, b) == pytest.approx(expected)


def test_spearman_of_a_constant_vector_is_nan_and_lengths_must_match():
    assert math.isnan(probes.spearman([0, 0, 0], [1, 2, 3]))
    with pytest.raises(ValueError, match="equal length"):
        probes.spearman([1, 2], [1, 2, 3])


def test_top_k_overlap():
    assert probes.top_k([5, 4, 3, 2, 1], 2) == [0, 1]
    assert probes.top_k([1, 1, 1, 0], 2) == [0, 1]  # ties go to the lower position
    assert probes.top_k_overlap([5, 4, 3, 2, 1], [1, 4, 5, 2, 3], 2) == 0.5  # {0, 1} vs {1, 2}
    assert probes.top_k_overlap([5, 4, 3, 2, 1], [9, 8, 0, 0, 0], 2) == 1.0


# ---- probe batches -------------------------------------------------------------------------------

COLLATE = CausalLMCollator(types.SimpleNamespace(pad_token_id=0, eos_token_id=0))


def example(length: int, labelled: int, start: int = 1) -> dict:
    ids = list(range(start, start + length))
    return {"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * (length - labelled) + ids[-labelled:]}


def loss_terms(batch: dict) -> list[list[int]]:
    """Per row, the (context token, label) pairs the shifted causal-LM loss uses."""
    return [[(int(i), int(label)) for i, label in zip(ids[:-1], labels[1:]) if label != -100]
            for ids, labels in zip(batch["input_ids"], batch["labels"])]


def test_truncation_keeps_every_labelled_token_in_the_loss():
    batch = COLLATE([example(10, 3), example(6, 2, start=50), example(3, 1, start=80)])
    cut = probes.truncate_batch(batch, 4)
    assert cut["input_ids"].tolist() == [[7, 8, 9, 10], [52, 53, 54, 55], [80, 81, 82, 0]]
    assert cut["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert loss_terms(cut) == loss_terms(batch)  # the same answers, with less context before them


def test_truncation_ends_at_the_last_label_and_cuts_long_answers_from_the_end():
    row = {"input_ids": [1, 2, 3, 4, 5, 6], "attention_mask": [1] * 6, "labels": [-100, -100, 3, 4, -100, -100]}
    assert probes.truncate_batch(COLLATE([row]), 3)["input_ids"].tolist() == [[2, 3, 4]]
    long = COLLATE([example(8, 6)])
    assert probes.truncate_batch(long, 3)["labels"].tolist() == [[6, 7, 8]]
    unlabelled = COLLATE([example(5, 1), {"input_ids": [9, 9], "attention_mask": [1, 1], "labels": [-100, -100]}])
    assert probes.truncate_batch(unlabelled, 3)["input_ids"].tolist() == [[3, 4, 5], [9, 9, 0]]


@pytest.mark.parametrize("batch, length, words", [
    ({"input_ids": torch.ones(1, 2), "labels": torch.ones(1, 2), "position_ids": torch.ones(1, 2)}, 1, "position_ids"),
    ({"input_ids": torch.ones(1, 2), "labels": torch.ones(1, 2)}, 0, "max_length=0"),
])
def test_truncation_refuses_what_it_cannot_cut(batch, length, words):
    with pytest.raises(ValueError, match=words):
        probes.truncate_batch(batch, length)


def test_variants_cut_the_full_probe_batch():
    batch = COLLATE([example(10, 2), example(7, 2, start=30)])
    assert probes.VARIANTS["batch1"].shrink(batch)["input_ids"].tolist() == [batch["input_ids"][0].tolist()]
    assert probes.VARIANTS["half"].shrink(batch)["input_ids"].shape == (2, 5)
    assert probes.VARIANTS["full"].shrink(batch) is batch


# ---- importance runs on a tiny model with frozen adapters ----------------------------------------


@pytest.fixture(scope="module")
def source():
    generator = torch.Generator().manual_seed(0)
    rows = []
    for index in range(16):
        length = 6 + index % 5
        ids = torch.randint(1, 100, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * (length - 2) + ids[-2:]})
    return probes.ProbeSource(rows, COLLATE, batch_size=4)


CONFIG = ISTConfig(update_layers=2, probe_layers=3)  # N_L = 6: top-2 overlap, 3 of 6 layers per candidate


def test_same_seed_same_ranking_and_frozen_adapters(source):
    model = peft_model("llama", num_layers=6)
    before = probes.adapter_checksum(model)
    first = probes.importance_run(model, CONFIG, probes.REFERENCE, 3, source, updates=4)
    again = probes.importance_run(model, CONFIG, probes.REFERENCE, 3, source, updates=4)
    other = probes.importance_run(model, CONFIG, probes.REFERENCE, 4, source, updates=4)
    assert first["importance"] == again["importance"]
    assert probes.spearman(first["importance"], again["importance"]) == 1.0
    assert other["importance"] != first["importance"]  # the seed drives candidates and probe batches
    assert any(value != 0 for value in first["importance"])
    assert first["tokens_per_update"] > 0 and first["seconds_per_update"] > 0
    assert probes.adapter_checksum(model) == before


def test_one_candidate_is_refused():
    """Eq. 9 with N_c = 1: the reward exp(-L) - mean(exp(-L)) is exactly 0, so importance could never move."""
    from istune.core import policy

    assert policy.rewards_from_losses(torch.tensor([2.5], dtype=torch.float64)).tolist() == [0.0]
    with pytest.raises(ValueError, match="num_probes=1.*N_c >= 2"):
        ISTConfig(num_probes=1)


def test_main_writes_the_comparison(source, monkeypatch, tmp_path):
    model = peft_model("llama", num_layers=6)
    monkeypatch.setattr(probes, "train_briefly", lambda *args, **kwargs: (model, source, {"model": "tiny llama"}))
    out = tmp_path / "results" / "probe_cost"
    argv = ["--updates", "3", "--variants", "full,batch1,half,nc2", "--seeds", "1,2",
            "--ist", "update_layers=2,probe_layers=3", "--out", str(out)]
    assert probes.main(argv) == 0

    saved = json.loads(out.with_suffix(".json").read_text())
    assert [row["variant"] for row in saved["rows"]] == ["full", "batch1", "half", "nc2"]
    assert saved["update_layers"] == 2 and saved["settings"]["probe_batch_size"] == 4
    for row in saved["rows"]:
        assert [run["seed"] for run in row["runs"]] == [1, 2]
    by_key = {row["variant"]: row for row in saved["rows"]}
    # probe tokens relative to the reference; rows differ in length (6..10 tokens), so only roughly
    assert by_key["full"]["relative_tokens"] == pytest.approx(1.0, abs=0.1)
    assert by_key["batch1"]["relative_tokens"] < 0.4  # 1 of 4 rows
    assert by_key["half"]["relative_tokens"] == pytest.approx(0.5, abs=0.1)
    assert by_key["nc2"]["relative_tokens"] == pytest.approx(2 / 3, abs=0.1)
    for key in ("full", "batch1", "half", "nc2"):
        assert -1 <= by_key[key]["spearman"] <= 1 and 0 <= by_key[key]["top_overlap"] <= 1
    markdown = out.with_suffix(".md").read_text()
    assert "| N_c = 2 |" in markdown and "-m istune bench probes --updates 3" in markdown
    assert not list(out.parent.glob(".*tmp"))


def test_make_adapters_trainable_finds_adapters_by_structure():
    model = peft_model("llama", num_layers=2)
    model.requires_grad_(False)
    assert probes.make_adapters_trainable(model) > 0
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert trainable == {name for name, _ in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("argv, words", [
    (["--variants", "full,tiny"], ["--variants='full,tiny'", "'tiny'", "batch1"]),
    (["--seeds", "1,x"], ["--seeds='1,x'", "list of ints"]),
    (["--updates", "0"], ["--updates=0", "at least 1"]),
    (["--ist", "num_probes=0"], ["--ist 'num_probes=0'", "ISTConfig.num_probes=0"]),
])
def test_bad_options_raise_before_any_work(monkeypatch, tmp_path, argv, words):
    monkeypatch.setattr(probes, "train_briefly", lambda *a, **k: pytest.fail("trained despite bad options"))
    with pytest.raises(ValueError) as error:
        probes.main(argv + ["--out", str(tmp_path / "out")])
    for word in words:
        assert word in str(error.value)
    assert not list(tmp_path.iterdir())


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--run=.* is not the output folder of `istune train`"):
        probes.load_run(tmp_path)
