"""LangChain tools: the image generator as a tool, and a whole interleaved run as a tool."""
