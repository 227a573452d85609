"""One module per command-line verb; each exposes ``add_parser(verbs)`` and a plain function."""
