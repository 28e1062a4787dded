"""Wormhole records in --state-dir: atomic, readable back, bad files skipped."""

import json
import os

import pytest

from wormholed.state import StateDir


def test_save_load_remove(tmp_path):
    st = StateDir(str(tmp_path))
    st.ensure()
    st.save("a", {"id": "a", "words": ["url", ":1"]})
    st.save("b", {"id": "b", "words": []})
    assert {r["id"] for r in st.load()} == {"a", "b"}
    st.save("a", {"id": "a", "words": ["url", ":2"]})  # replaced, not duplicated
    assert [r["words"] for r in st.load() if r["id"] == "a"] == [["url", ":2"]]
    st.remove("a")
    st.remove("a")  # idempotent
    assert [r["id"] for r in st.load()] == ["b"]
    assert not [n for n in os.listdir(tmp_path / "wormholes") if n.endswith(".tmp")]


def test_leftover_temp_and_corrupt_records_are_skipped(tmp_path):
    st = StateDir(str(tmp_path))
    st.ensure()
    (tmp_path / "wormholes" / "x.json.tmp").write_text("{half")
    (tmp_path / "wormholes" / "bad.json").write_text("{half")
    st.save("ok", {"id": "ok"})
    assert st.load() == [{"id": "ok"}]
    assert not (tmp_path / "wormholes" / "x.json.tmp").exists()


def test_missing_dir_is_empty_and_names_are_checked(tmp_path):
    assert StateDir(str(tmp_path / "none")).load() == []
    with pytest.raises(ValueError):
        StateDir(str(tmp_path)).save("../escape", {})
    assert json.dumps(StateDir(str(tmp_path)).load()) == "[]"
