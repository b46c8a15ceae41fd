"""The `selfinstruct` command line: commands parse arguments, call `tasks/` and `flows/`, and print."""
