"""HTTP layer: thin routes that validate, call one service function, and map errors."""
