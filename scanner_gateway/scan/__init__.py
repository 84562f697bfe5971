"""The retail scan domain: tasks, image intake, post-processing, the scan service. No HTTP."""
