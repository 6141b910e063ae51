"""Interleaved text-image generation: planner, generator and critic on a resumable LangGraph."""
