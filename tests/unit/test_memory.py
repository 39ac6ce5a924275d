"""available_memory_bytes reads the tighter of the cgroup's headroom and the node's MemAvailable."""

from __future__ import annotations

from pathlib import Path

from hlm import memory


def test_the_cgroup_limit_wins_when_it_is_tighter(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "memory.max").write_text("1000000\n")
    (tmp_path / "memory.current").write_text("400000\n")
    monkeypatch.setattr(memory, "_CGROUP_V2", tmp_path)
    monkeypatch.setattr(memory, "_CGROUP_V1", tmp_path / "absent")
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 8_000_000)
    assert memory.available_memory_bytes() == 600_000


def test_without_a_cgroup_limit_the_node_counts(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("400000\n")
    monkeypatch.setattr(memory, "_CGROUP_V2", tmp_path)
    monkeypatch.setattr(memory, "_CGROUP_V1", tmp_path / "absent")
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 8_000_000)
    assert memory.available_memory_bytes() == 8_000_000


def test_this_machine_reports_some_memory() -> None:
    assert memory.available_memory_bytes() > 0
