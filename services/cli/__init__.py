"""The `pdserve` command line: one subcommand per tool."""
