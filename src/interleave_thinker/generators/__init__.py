"""Image generator backends: the interface, diffusers in-process, OpenAI-compatible Images APIs."""
