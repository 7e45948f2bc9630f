"""The `elm` command line and the programs a person runs."""
