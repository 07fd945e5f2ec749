"""Each default and figure has one owner in the code, and what shows it to users follows it."""

from __future__ import annotations

import re

from raylm.cli import build_parser
from raylm.use.generate import SamplingOptions


def test_generate_help_states_the_defaults_that_sampling_options_apply():
    """`raylm generate --help` names defaults; the numbers must be SamplingOptions's (the CLI passes
    only the options given, so the dataclass decides)."""
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    stated = {action.dest: float(m.group(1)) for action in generate._actions
              if action.help and (m := re.search(r"\(default ([0-9.]+)\)", action.help))}
    defaults = SamplingOptions()
    assert stated == {"temperature": defaults.temperature, "top_k": defaults.top_k, "top_p": defaults.top_p,
                      "max_new_tokens": defaults.max_new_tokens}
    args = build_parser().parse_args(["generate", "run", "--prompt", "x"])
    assert (args.temperature, args.top_k, args.top_p, args.max_new_tokens) == (None, None, None, None)
