"""The guest side: the agent that runs as PID 1 in each VM (backends/image/ builds its image)."""
