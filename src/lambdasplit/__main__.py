"""`python -m lambdasplit`: the `lambdasplit` command (the same app, one-line errors and exit codes),
for an environment whose scripts directory is not on PATH."""

from lambdasplit.cli import main

if __name__ == "__main__":
    main()
