"""`barkgpt <command> --help` describes every option of every command."""
from __future__ import annotations

import argparse

from barkgpt.cli import build_parser


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"validate", "train", "generate", "serve", "chat", "deploy"} <= set(commands)
    missing = [f"{name} {action.option_strings or action.dest}"
               for name, sub in [("barkgpt", parser), *commands.items()] for action in sub._actions
               if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) and not action.help]
    assert not missing, missing
    for sub in commands.values():
        sub.format_help()  # every %(default)s expands
