"""`medlens` run in the test's own process: its exit code and what it printed."""

from __future__ import annotations

from engine.cli import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `medlens ARGV...`; each argument goes through str(), so paths may be passed."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
