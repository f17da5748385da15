"""Setpoint advice: the plan that costs the least energy within the effluent limits, searched over the model's
plans graph (``optimizer.search``). Torch-free and web-free: the service runs it on its own lane."""
