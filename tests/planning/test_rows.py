"""istune.planning.rows: one key per configuration, the old spellings as aliases, a row moved to another method."""

from istune.planning.rows import ALIASES, ROWS, table_names


def test_every_alias_names_one_existing_row_and_the_old_spellings_of_a_row_meet():
    assert all(key in ROWS and alias not in ROWS for alias, key in ALIASES.items())
    # LoRA + gradient checkpointing was lora+ckpt (frontier), lora+gc (plan, gpu) and lora:ckpt (memory table)
    assert {ALIASES.get(name, name) for name in ("lora+ckpt", "lora+gc", "lora:ckpt")} == {"lora+gc"}
    assert {ALIASES.get(name, name) for name in ("ist+ckpt", "ist+gc", "lora+ist:ckpt")} == {"lora+ist+gc"}
    assert {ALIASES.get(name, name) for name in ("ist-recompute", "ist+recompute", "lora+ist:recompute")} == {
        "lora+ist+recompute"}


def test_a_key_spells_its_configuration():
    for key, row in ROWS.items():
        assert key == row.key and key.startswith(row.method)
        assert ("+gc" in key) == row.checkpointing
        assert ("+stored" in key) == ("stored_layers" in (row.ist or {}))
        drops = (row.ist or {}).get("unselected_optimizer_state") == "drop"
        assert (":drop" in key) == (drops and row.method != "lisa")


def test_table_names_take_the_keys_their_aliases_and_local_names_only():
    names = table_names(["lora", "lora+gc"], local={"lisa": "lora"})
    assert names == {"lora": "lora", "lora+gc": "lora+gc", "lora+ckpt": "lora+gc", "lora:ckpt": "lora+gc",
                     "lisa": "lora"}


def test_with_method_moves_key_label_and_baseline():
    row = ROWS["lora+ist+gc"].with_method("dora")
    assert (row.key, row.label, row.method, row.baseline) == ("dora+ist+gc", "DoRA + IST + gradient checkpointing",
                                                              "dora", "dora")
    assert row.ist == ROWS["lora+ist+gc"].ist and ROWS["dora+ist+gc"] == row
