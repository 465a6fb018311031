"""The `lambdasplit` commands, by area; cli.py assembles them into one app (in --help order)."""
