"""`python -m reaper` runs the CLI."""

from reaper.cli import main

if __name__ == "__main__":
    main()
