"""The guest side: the image builder (host) and the agent that runs as PID 1 in each VM."""
