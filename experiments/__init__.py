"""Entry points: run (train), evaluate, benchmark."""
