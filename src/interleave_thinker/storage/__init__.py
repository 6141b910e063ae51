"""Where run data lives: the content-addressed image store, the generation and verdict ledgers."""
