"""The command-line parser every entry point and script uses (light: no torch, so that scripts start fast)."""
import argparse
import difflib
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit status 2) instead of the usage block, an abbreviated
    flag is refused (`--max-step` would otherwise quietly mean `--max-steps`, and a flag added later could make it
    mean another one), and an unknown flag comes with the closest known one."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        # before argparse, which would first complain about a required flag that the mistyped one was meant to be
        known = self._known_flags()
        for arg in args:
            if arg == "--":  # what follows is for another program
                break
            flag = arg.split("=", 1)[0]
            if flag.startswith("--") and flag not in known:
                close = difflib.get_close_matches(flag[2:], [k[2:] for k in known], n=1)
                if close:
                    self.exit(2, f"error: unrecognized argument {flag} (did you mean --{close[0]}?)\n")
                self.error(f"unrecognized argument {flag}")
        return super().parse_args(args, namespace)

    def _known_flags(self):
        """The long flags of this parser and of its subcommands."""
        parsers = [self] + [sub for action in self._actions if isinstance(action, argparse._SubParsersAction)
                            for sub in action.choices.values()]
        return {flag for parser in parsers for flag in parser._option_string_actions if flag.startswith("--")}
