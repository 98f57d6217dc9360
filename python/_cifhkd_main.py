"""What every script in this folder does: run a cifhkd module's main() with the command
line, or, where cifhkd is not installed (an install older than it mapped only cifops),
say what to run instead of a bare ModuleNotFoundError."""
import importlib
import sys


def run(module: str):
    try:
        main = importlib.import_module(f"cifhkd.{module}").main
    except ModuleNotFoundError as e:
        if e.name != "cifhkd":
            raise
        sys.exit("cifhkd is not installed: run `pip install --no-build-isolation -e '.[train]'` "
                 "in the repository (or `make build`)")
    result = main()
    # decode's main returns its scores, the others an exit status (or None)
    sys.exit(result if result is None or isinstance(result, int) else 0)
