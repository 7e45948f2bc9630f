"""`elm bench`: the training-bottleneck study as a tool (grid, runner, cost model, report)."""
