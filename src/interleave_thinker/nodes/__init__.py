"""Graph nodes: planner, generator, critic, compose and the human reviews, with the rules they share."""
