"""Checkpoint savers: which LangGraph saver a URL names, and how it is opened and closed."""
