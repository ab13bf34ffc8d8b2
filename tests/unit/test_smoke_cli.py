from vr.cli import build_parser


def test_every_subcommand_has_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    choices = sub.choices
    assert "update-config" in choices
    for name, p in choices.items():
        assert p.description, f"vr {name} has no description"
