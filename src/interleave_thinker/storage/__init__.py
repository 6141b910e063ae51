"""Where run data lives: the content-addressed image store, the generation ledger, atomic writes."""
