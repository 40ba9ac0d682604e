"""The section of a Markdown file that `make bench` and `make soak` rewrite with their figures."""

from __future__ import annotations

from pathlib import Path

from bench.harness import Metric, Series, table, write_section


def test_the_section_is_replaced_and_the_rest_kept(tmp_path: Path) -> None:
    report = tmp_path / "BENCHMARKS.md"
    report.write_text(
        "# Benchmarks\n\nHow.\n\n<!-- bench:results -->\nold\ntable\n<!-- /bench:results -->\n\n"
        "## After\n"
    )
    write_section(report, "bench:results", ["new", "", "| table |"])
    assert report.read_text() == (
        "# Benchmarks\n\nHow.\n\n<!-- bench:results -->\nnew\n\n| table |\n"
        "<!-- /bench:results -->\n\n## After\n"
    )


def test_a_file_without_the_section_gets_it_at_its_end(tmp_path: Path) -> None:
    report = tmp_path / "RELIABILITY.md"
    report.write_text("# Reliability\n\n<!-- bench:results -->\nnot this one\n")
    write_section(report, "soak:results", ["figures"])
    assert report.read_text() == (
        "# Reliability\n\n<!-- bench:results -->\nnot this one\n\n"
        "<!-- soak:results -->\nfigures\n<!-- /soak:results -->\n"
    )
    missing = tmp_path / "new.md"
    write_section(missing, "soak:results", ["figures"])
    assert missing.read_text() == "<!-- soak:results -->\nfigures\n<!-- /soak:results -->\n"


def test_a_pipeline_in_a_name_does_not_split_its_cell() -> None:
    ours, peer = Series("dd", [2.0], cpu=[3.0]), Series("curl | sha512sum", [1.0], cpu=[5.0])
    lines = table([Metric("read, vs curl | sha512sum", "MB/s", True, ours, peer, 1.5)]).splitlines()
    assert "read, vs curl \\| sha512sum" in lines[2]
    assert {line.replace("\\|", "").count("|") for line in lines} == {10}
    assert "| 2.00x | >= 1.5x | PASS | 3.00 " in lines[2]
