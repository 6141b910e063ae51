"""Chat models for the planner and critic: profiles, in-process and served backends, stand-ins."""
