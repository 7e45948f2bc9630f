"""Helpers shared by the tests: the `elm` command as a subprocess, corpora, training
runs, checkpoints in other formats, chat servers, fine-tuning data and a loopback Hub."""
