"""The CLI's bad-input contract, asserted the same way by every CLI test: exit 2 and one sentence."""

from refusal_lab.cli import main


def one_sentence_error(capsys, argv, match: str) -> str:
    """Run ``refusal-lab argv``: exit code 2 and one sentence on stderr (no traceback) containing ``match``."""
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("refusal-lab: error: ") and err.endswith("."), err
    assert match in err, err
    return err
