"""The section of a Markdown file that `make bench` and `make soak` rewrite with their figures."""

from __future__ import annotations

from pathlib import Path

from bench.harness import write_section


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
