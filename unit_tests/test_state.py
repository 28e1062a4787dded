"""Wormhole records in --state-dir: atomic, readable back, bad files skipped."""

import json
import os
import subprocess

import pytest

from wormholed.state import RecordError, StateDir, StateLocked, check_wormhole_record


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


@pytest.mark.parametrize("content,why", [
    ("null", "not a JSON object"),
    ("[]", "not a JSON object"),
    ('{"id": 7, "words": ["url", ":1"]}', "is not its file's name"),
    ('{"id": "w", "words": "url :1"}', "not a list of strings"),
    ('{"id": "w", "words": ["url", 1]}', "not a list of strings"),
    ('{"id": "other", "words": []}', "is not its file's name"),
    ("[" * 100000, "unreadable"),
])
def test_records_of_the_wrong_shape_are_named_and_skipped(tmp_path, caplog, content, why):
    st = StateDir(str(tmp_path))
    st.ensure()
    (tmp_path / "wormholes" / "w.json").write_text(content)
    st.save("ok", {"id": "ok", "words": ["url", ":1"]})
    assert st.load(check=check_wormhole_record) == [{"id": "ok", "words": ["url", ":1"]}]
    logged = caplog.text
    assert "w.json" in logged and (why in logged or why == "unreadable")


@pytest.fixture
def read_only(tmp_path):
    """tmp_path/ro: a state dir on a read-only bind mount (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    ro = tmp_path / "ro"
    ro.mkdir()
    StateDir(str(ro)).ensure()
    StateDir(str(ro)).save("kept", {"id": "kept", "words": ["url", ":1"]})
    (ro / "wormholes" / "cut.json.tmp").write_text("{half")
    subprocess.run(["mount", "--bind", str(ro), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_a_read_only_state_dir_loads_and_refuses_changes_whole(read_only, caplog):
    st = StateDir(str(read_only))
    st.ensure()  # warns, does not fail
    assert "read-only" in caplog.text and not st.writable()
    assert [r["id"] for r in st.load(check=check_wormhole_record)] == ["kept"]  # the stale .tmp: logged
    assert "cut.json.tmp" in caplog.text
    with pytest.raises(RecordError, match="cannot write its record .*Read-only file system"):
        st.save("new", {"id": "new", "words": []})
    with pytest.raises(RecordError, match="cannot remove its record .*Read-only file system"):
        st.remove("kept")
    assert sorted(os.listdir(read_only / "wormholes")) == ["cut.json.tmp", "kept.json"]
    st.lock()  # a read-only dir can be locked (the pid file is skipped)
    st.unlock()


def test_one_daemon_per_state_dir(tmp_path):
    first, second = StateDir(str(tmp_path)), StateDir(str(tmp_path))
    first.ensure()
    first.lock()
    try:
        with pytest.raises(StateLocked, match=rf"in use by another wormholed \(pid {os.getpid()}\): "
                                              r"give this daemon its own --state-dir"):
            second.lock()
    finally:
        first.unlock()
    assert not (tmp_path / "daemon.pid").exists()
    second.lock()  # free again
    second.unlock()
