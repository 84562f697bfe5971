"""Everything that talks to vLLM over HTTP."""
