"""Jobs: the queue, the plan for a series, and the processor that runs and sends them."""
