"""docs/configuration.md is what `make docs` writes from the config models today."""

import pytest

from serve.config_reference import REFERENCE, document, main


def test_configuration_reference_matches_the_config_models():
    if REFERENCE.read_text() != document():
        pytest.fail(f"{REFERENCE} is out of date with the config models: run `make docs`")


def test_check_mode_fails_on_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text("# Configuration reference\n")
    assert main(["--check", "--output", str(stale)]) == 1
    assert "make docs" in capsys.readouterr().out
    assert main(["--output", str(stale)]) == 0
    assert main(["--check", "--output", str(stale)]) == 0
